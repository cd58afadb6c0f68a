"""No module of attnlab imports, however indirectly, a module that imports it: each layer (kernels,
bench, analysis, cli, distributed) stands on the ones below it. Every import counts, at the top
of a file or inside a function, since a cycle hidden in a function still ties the two modules."""
import ast
from pathlib import Path

from paths import ROOT


def package_folders() -> dict:
    """setup.py's PACKAGES: import package -> its folder in the repository."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    found = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "PACKAGES" for t in node.targets))
    return ast.literal_eval(found)


def modules() -> dict:
    """Every module of the distribution by dotted name -> its file."""
    found = {}
    for package, folder in package_folders().items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imported(name: str, path: Path, known: dict) -> dict:
    """The attnlab modules `name` imports -> the line of the first such import."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    edges = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:      # a name imported from a module: that module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.setdefault(target, node.lineno)
    return edges


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_through_others():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    described = [[f"{a} -> {b} ({known[a].relative_to(ROOT)}:{line})"
                  for a in component for b, line in graph[a].items() if b in component]
                 for component in cycles(graph)]
    assert not described, "import cycles:\n" + "\n".join("\n".join(edges) for edges in described)


def test_the_check_finds_a_cycle_and_only_its_members():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_an_import_inside_a_function_counts(tmp_path):
    path = tmp_path / "one.py"
    path.write_text("from .two import run\n\ndef later():\n    from attnlab.pkg import three\n")
    known = {"attnlab.pkg.one": path, "attnlab.pkg.two": None, "attnlab.pkg.three": None}
    assert imported("attnlab.pkg.one", path, known) == {"attnlab.pkg.two": 1, "attnlab.pkg.three": 4}
