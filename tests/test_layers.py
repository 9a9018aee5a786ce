"""The picture of the package's imports: subpackages import only from the layers below their own (the README's
Architecture says which), nothing in the package imports a script, no two modules import each other in a cycle, and
the README's table of subsystems lists every module. Every import counts, those inside functions and under
TYPE_CHECKING included."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fourdnex"
SCRIPTS = {path.stem for path in ROOT.glob("*.py")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def subpackage(module: str) -> str:
    """``model`` for ``fourdnex.model.loading`` and ``fourdnex.model``; ``fourdnex`` for the root's modules."""
    parts = module.split(".")
    is_package = (PACKAGE.joinpath(*parts[1:]) / "__init__.py").is_file()
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and is_package) else "fourdnex"


def imports(path: Path, modules: set[str]) -> list[tuple[str, int]]:
    """Every module of ``modules`` (or script) that ``path`` imports, with the line: ``from a.b import c`` counts as
    ``a.b.c`` where that is a module, else ``a.b``."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules and name.split(".")[0] not in SCRIPTS:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.append((name, node.lineno))
                break
    return found


def the_graph() -> dict[str, list[tuple[str, int]]]:
    paths = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    return {module: imports(path, set(paths)) for module, path in paths.items()}


def readme_layers() -> list[set[str]]:
    """The layers the README's Architecture names, lowest first (``a``, ``b`` < ``c`` < ...)."""
    text = (ROOT / "README.md").read_text()
    (line,) = re.findall(r"^Layers, lowest first: (.+)$", text, re.MULTILINE)
    return [set(re.findall(r"`([a-z]+)`", layer)) for layer in line.rstrip(".").split(" < ")]


def test_the_readme_names_every_subpackage_in_one_layer():
    layers = readme_layers()
    named = [name for layer in layers for name in layer]
    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert sorted(named) == sorted(subpackages | {"fourdnex"}), named
    assert layers[0] == {"fourdnex"}  # config, errors, files, cli: what every subsystem shares


def test_subpackages_import_only_from_the_layers_below():
    level = {name: i for i, layer in enumerate(readme_layers()) for name in layer}
    wrong = []
    for module, found in the_graph().items():
        here = subpackage(module)
        for target, line in found:
            if target.split(".")[0] in SCRIPTS:
                wrong.append(f"{module}:{line} imports the script {target}")
            elif subpackage(target) != here and level[subpackage(target)] >= level[here]:
                wrong.append(f"{module}:{line} imports {target}, which is not below {here}")
    assert not wrong, "\n".join(wrong)


def a_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """Some modules that import each other round a cycle (the first module again at the end), or None: a depth-first
    walk meets a module it is still inside."""
    done, inside = set(), []

    def visit(module: str) -> list[str] | None:
        if module in inside:
            return [*inside[inside.index(module) :], module]
        if module in done:
            return None
        inside.append(module)
        for target in graph[module]:
            cycle = visit(target)
            if cycle:
                return cycle
        inside.pop()
        done.add(module)
        return None

    return next((cycle for module in graph if (cycle := visit(module))), None)


def test_no_modules_import_each_other_in_a_cycle():
    graph = {module: sorted({target for target, _ in found}) for module, found in the_graph().items()}
    assert a_cycle(graph) is None, " -> ".join(a_cycle(graph))
    assert a_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]  # the walk finds one


def test_the_readme_table_lists_every_module_of_each_subpackage():
    text = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `fourdnex/(\w*)/?` \| ([^|]+) \|", text, re.MULTILINE))
    for name, cell in rows.items():
        folder = PACKAGE / name if name else PACKAGE
        listed = set(re.findall(r"`(\w+)`", cell))
        present = {path.stem for path in folder.glob("*.py")} - {"__init__"}
        assert listed == present, (name or "fourdnex", sorted(listed ^ present))
    assert set(rows) == {path.parent.name for path in PACKAGE.glob("*/__init__.py")} | {""}
