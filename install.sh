#!/usr/bin/env bash
# Install attnlab (editable) into a virtual environment, .venv beside this file, with the extras
# named in $1 (default: analysis,nvml); then run it as .venv/bin/attnlab or .venv/bin/python.
# Nothing is written into the Python that creates the environment (Debian's python3 refuses
# that anyway, PEP 668):
#   - where that Python already imports torch (a GPU box), .venv sees its packages
#     (--system-site-packages, and those of a virtual environment it runs in), so the box's torch
#     and Triton are kept and only what is missing is installed;
#   - elsewhere .venv gets the pinned CPU set of requirements-ci.txt (torch 2.13.0 CPU, Triton 3.9).
# PYTHON picks the Python that creates it (default python3), ATTNLAB_VENV the folder (default .venv).
# ATTNLAB_INSTALL_DRY_RUN=1 creates the environment and prints the pip commands without running them.
set -euo pipefail
cd "$(dirname "$0")"
extras=${1:-analysis,nvml}
python=${PYTHON:-python3}
venv=${ATTNLAB_VENV:-.venv}

step() { echo "install.sh: $*"; }
fail() { echo "install.sh: error: $*" >&2; exit 1; }
pip_in_venv() {
    if [ -n "${ATTNLAB_INSTALL_DRY_RUN:-}" ]; then
        echo "install.sh: would run: $venv/bin/python -m pip $*"
    else
        "$venv/bin/python" -m pip "$@"
    fi
}

torch_version() { "$1" -c "import torch; print(torch.__version__)" 2>/dev/null; }

command -v "$python" >/dev/null || fail "PYTHON: '$python' is not a command; expected a Python 3.10 or newer"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || fail "PYTHON: $("$python" -V 2>&1) at $(command -v "$python"); attnlab needs Python 3.10 or newer"

# Where the creating Python imports torch, the paths the environment must see to keep it: its
# site-packages, and those of the virtual environment it runs in (which --system-site-packages
# alone does not reach: venv builds on the base interpreter).
# Written as a .pth line that adds them as site directories, so that their own .pth files count.
outer_site_packages() {
    "$python" - <<'EOF'
import site, sys
if sys.prefix != sys.base_prefix:
    print(f"import site; list(map(site.addsitedir, {site.getsitepackages()!r}))")
EOF
}

# A Debian python3 without the python3-venv package lacks ensurepip: create the environment
# without pip, then give it pip from the creating Python's pip (run for the environment, it
# installs there) or from virtualenv where either is at hand.
create_venv() {
    local flags=("$@") err
    err=$(mktemp)
    if "$python" -m venv ${flags[@]+"${flags[@]}"} "$venv" 2>"$err"; then
        rm -f "$err"
        return
    fi
    step "$python -m venv failed ($(grep -v '^$' "$err" | tail -n 1)); trying without ensurepip"
    rm -rf "$venv" "$err"
    if "$python" -m pip --version >/dev/null 2>&1; then
        "$python" -m venv --without-pip ${flags[@]+"${flags[@]}"} "$venv"
        step "giving $venv pip with $python's own pip (installed into $venv only)"
        "$python" -m pip --python "$venv/bin/python" install pip
    elif "$python" -m virtualenv --version >/dev/null 2>&1; then
        "$python" -m virtualenv ${flags[@]+"${flags[@]}"} "$venv"
    else
        fail "$python can create no virtual environment: it has neither ensurepip nor pip nor virtualenv. " \
             "On Debian or Ubuntu: apt-get install python3-venv (or python3-pip); or run with PYTHON= naming another Python"
    fi
}

if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ]; then
    fail "ATTNLAB_VENV: $venv exists and is not a virtual environment; remove it or name another folder"
fi
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "" 2>/dev/null; then
    step "using the virtual environment $venv ($("$venv/bin/python" -V 2>&1))"
else
    flags=()
    if version=$(torch_version "$python"); then
        step "$python imports torch $version: keeping it"
        flags=(--system-site-packages)
    fi
    step "creating the virtual environment $venv with $("$python" -V 2>&1) ($(command -v "$python"))"
    rm -rf "$venv"
    create_venv ${flags[@]+"${flags[@]}"}
    if [ ${#flags[@]} -gt 0 ]; then
        outer=$(outer_site_packages)
        if [ -n "$outer" ]; then
            echo "$outer" > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/attnlab-outer-env.pth"
        fi
    fi
fi
"$venv/bin/python" -m pip --version >/dev/null 2>&1 || fail "$venv has no pip: remove $venv and run install.sh again"

if version=$(torch_version "$venv/bin/python"); then
    step "torch $version is there: keeping it and its Triton"
else
    heavy=$(grep -E '^(torch|triton)==' requirements-ci.txt | tr '\n' ' ')
    step "installing $heavy(CPU build, pinned in requirements-ci.txt; the largest step, a minute or two)"
    pip_in_venv install --progress-bar off $heavy
    step "installing the rest of requirements-ci.txt"
    pip_in_venv install --progress-bar off -r requirements-ci.txt
fi
step "installing attnlab (editable) with the extras [$extras]"
pip_in_venv install --progress-bar off -e ".[$extras]"
step "done: run $venv/bin/attnlab (or $venv/bin/python -m attnlab); 'source $venv/bin/activate' puts both first on PATH"
