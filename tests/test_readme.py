"""The README against the code: its implementation table names every in-tree implementation
with its modes, its two commands are the ones install.sh and CI make work, and what it says of
the cpu-small preset's lengths is what the preset holds."""
import re
from pathlib import Path

from attnlab import text as fmt
from attnlab.bench.workloads import preset
from attnlab.kernels import implementations
from paths import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
RUNNABLE_MODES = ("prefill", "decode")    # the table's column; training modes are shown by `attnlab kernels`


def implementation_table() -> dict:
    """{name: modes} from the rows of the README's table of implementations."""
    rows = {}
    for line in README.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3:
            for name in re.findall(r"`([^`]+)`", cells[0]):
                rows[name] = {mode.strip() for mode in cells[1].split(",")}
    return rows


def in_tree() -> dict:
    """{name: Implementation} of those registered by a file of kernels/impls/."""
    impls = (ROOT / "kernels" / "impls").resolve()
    return {impl.name: impl for impl in implementations()
            if impl.origin and Path(impl.origin).resolve().parent == impls}


def test_the_implementation_table_names_every_in_tree_implementation_and_its_modes():
    table = implementation_table()
    registered = in_tree()
    assert "triton" in registered and "naive" in registered
    missing = sorted(set(registered) - set(table))
    assert not missing, f"README's implementation table lacks {missing}"
    for name, impl in registered.items():
        modes = {mode for mode in impl.modes if mode in RUNNABLE_MODES}
        assert modes <= table[name], f"README gives {name} the modes {table[name]}, it serves {modes}"
    assert not set(table) - set(registered), "README's table names an implementation nothing registers"


def commands() -> list:
    block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_two_commands_use_the_environment_install_sh_creates():
    main_job, tests = commands()
    for command in (main_job, tests):
        words = command.split(" && ")
        assert words[0].startswith("./install.sh")
        assert all(w.startswith((".venv/bin/attnlab ", ".venv/bin/python ")) for w in words[1:]), command
    assert 'venv=${ATTNLAB_VENV:-.venv}' in (ROOT / "install.sh").read_text()


def test_ci_runs_the_readme_test_command():
    assert commands()[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_cpu_small_has_one_meaning_the_presets():
    lengths = preset("cpu-small").seq_lens
    span = f"from {fmt.k(min(lengths))} to {fmt.k(max(lengths))}"
    said = re.findall(r"`cpu-small`[^.]*?from (\S+) to (\S+?)[ ,;)]", README)
    assert said and all(f"from {a} to {b}" == span for a, b in said), (said, span)
