"""install.sh puts attnlab into a virtual environment and nothing into the Python that creates it:
without torch the environment gets the pinned CPU set; where that Python imports torch (a GPU
box, or a virtual environment of its own) the environment sees and keeps it; a Debian Python
without ensurepip (no python3-venv) still gets an environment. Run with
ATTNLAB_INSTALL_DRY_RUN=1, which creates the environment and prints the pip commands it would run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from paths import ROOT

pytestmark = pytest.mark.slow       # each creates a virtual environment: seconds


def install(tmp_path, python, *extras, **env):
    venv = tmp_path / "venv"
    done = subprocess.run(["bash", str(ROOT / "install.sh"), *extras], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": str(python), "ATTNLAB_VENV": str(venv),
                               "ATTNLAB_INSTALL_DRY_RUN": "1", **env})
    assert done.returncode == 0, done.stdout + done.stderr
    return venv, done.stdout


def imports_torch(python) -> bool:
    return subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode == 0


def site_listing(python) -> list:
    """Every file under the creating Python's site-packages (and user site): nothing may be added."""
    code = "import site; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))"
    roots = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return sorted(str(p) for root in roots if Path(root).is_dir() for p in Path(root).rglob("*"))


def pip_lines(said: str) -> list:
    return [line.split("would run: ", 1)[1] for line in said.splitlines() if "would run: " in line]


def torchless_python():
    python = shutil.which("python3", path="/usr/bin")
    if not python or imports_torch(python):
        pytest.skip("needs a python3 in /usr/bin without torch (Debian's)")
    return Path(python)


def test_without_torch_the_environment_gets_the_pinned_cpu_set_and_the_system_nothing(tmp_path):
    python = torchless_python()
    before = site_listing(python)
    venv, said = install(tmp_path, python, "analysis,test")
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    commands = pip_lines(said)
    assert all(command.startswith(f"{venv}/bin/python -m pip install") for command in commands)
    assert "torch==2.13.0 triton==3.9.0" in commands[0] and "-r requirements-ci.txt" in commands[1]
    assert commands[2].endswith("-e .[analysis,test]")
    assert site_listing(python) == before
    assert sum(line.startswith("install.sh: ") for line in said.splitlines()) >= 4     # it says what it does


def test_a_python_without_ensurepip_still_gets_an_environment_with_pip(tmp_path):
    python = torchless_python()
    fake = tmp_path / "python3"       # as Debian's python3 without python3-venv: `-m venv` fails on ensurepip
    fake.write_text(f"#!/bin/bash\nif [ \"$1 $2\" = '-m venv' ] && [[ \" $* \" != *' --without-pip '* ]]; then\n"
                    f"  echo 'ensurepip is not available' >&2; exit 1\nfi\nexec {python} \"$@\"\n")
    fake.chmod(0o755)
    before = site_listing(python)
    venv, said = install(tmp_path, fake)
    assert "trying without ensurepip" in said
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"], check=True, capture_output=True)
    assert site_listing(python) == before


def test_where_python_imports_torch_the_environment_keeps_it(tmp_path):
    if not imports_torch(sys.executable):
        pytest.skip("this Python has no torch")
    venv, said = install(tmp_path, sys.executable)
    assert "keeping it" in said and not any("requirements-ci" in c for c in pip_lines(said))
    assert imports_torch(venv / "bin" / "python")


def test_torch_of_a_virtual_environment_is_kept_too(tmp_path):
    """A GPU box's torch often lives in a virtual environment: the new one reaches it, although
    venv builds on the base interpreter, which has none."""
    python = torchless_python()
    torch_site = next((p for p in map(Path, sys.path) if (p / "torch" / "__init__.py").is_file()), None)
    base_version = subprocess.run([str(python), "-c", "import sys; print(*sys.version_info[:2])"],
                                  capture_output=True, text=True, check=True).stdout.split()
    if torch_site is None or list(map(int, base_version)) != list(sys.version_info[:2]):
        pytest.skip("needs a torch built for /usr/bin/python3's version")
    outer = tmp_path / "outer"
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(outer)], check=True)
    outer_site = Path(subprocess.run([str(outer / "bin" / "python"), "-c",
                                      "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    (outer_site / "torch-here.pth").write_text(f"{torch_site}\n")     # the outer environment's torch
    assert imports_torch(outer / "bin" / "python")
    venv, said = install(tmp_path, outer / "bin" / "python")
    assert "keeping it" in said and imports_torch(venv / "bin" / "python")


def test_a_folder_that_is_not_an_environment_is_left_alone(tmp_path):
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "mine.txt").write_text("keep")
    done = subprocess.run(["bash", str(ROOT / "install.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ATTNLAB_VENV": str(tmp_path / "venv"), "ATTNLAB_INSTALL_DRY_RUN": "1"})
    assert done.returncode == 1 and "ATTNLAB_VENV" in done.stderr
    assert (tmp_path / "venv" / "mine.txt").read_text() == "keep"
