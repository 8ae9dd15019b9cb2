"""The house's plan holds: every package imports only what its ``__init__`` says it may, and the
packages and top-level modules import one another without a loop."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "imgx3d"


def _imports(path: Path) -> set[str]:
    """Every ``imgx3d`` module ``path`` imports, at the top or inside a function (``from imgx3d import x``
    counts as ``imgx3d.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "imgx3d":
            if node.module == "imgx3d":
                found |= {f"imgx3d.{alias.name}" for alias in node.names}
            else:
                found |= {f"{node.module}.{alias.name}" if (PACKAGE.parent / node.module.replace(".", "/") /
                                                              f"{alias.name}.py").is_file() else node.module
                          for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "imgx3d"}
    return found


def _may_import(package: Path) -> set[str]:
    """The names in double backticks of the package docstring's "May import:" sentence."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8"))) or ""
    match = re.search(r"May import:(.*?)(?:\.\s|\.$|;\s)", re.sub(r"``[^`]*``", lambda m: m.group(0).replace(".", "·"),
                                                                   doc), flags=re.S)
    assert match, f"{package.name}/__init__.py: its docstring states no 'May import:' line"
    return {name.replace("·", ".") for name in re.findall(r"``([^`]+)``", match.group(1))}


def _unit(module: str) -> str:
    """The package (or top-level module) a dotted module path belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "imgx3d"


def test_every_package_imports_only_what_its_init_allows():
    wrong = []
    for package in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        allowed = _may_import(package)
        assert allowed, f"{package.name}: an empty 'May import:' line"
        for path in sorted(package.rglob("*.py")):
            for module in sorted(_imports(path)):
                inside = module.split(".")[1:]
                if inside[0] == package.name:
                    continue
                dotted = ".".join(inside)
                if not any(dotted == name or dotted.startswith(name + ".") for name in allowed):
                    wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {module}; {package.name} may import "
                                 f"{', '.join(sorted(allowed))}")
    assert not wrong, "\n".join(wrong)


def test_packages_and_top_level_modules_import_one_another_without_a_loop():
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        source = _unit(module)
        edges.setdefault(source, set()).update(u for u in map(_unit, _imports(path)) if u != source)
    state: dict[str, str] = {}

    def visit(unit: str, trail: list[str]) -> None:
        if state.get(unit) == "done":
            return
        assert state.get(unit) != "open", "import loop: " + " → ".join([*trail, unit])
        state[unit] = "open"
        for other in sorted(edges.get(unit, ())):
            visit(other, [*trail, unit])
        state[unit] = "done"

    for unit in sorted(edges):
        visit(unit, [])
    assert {"config", "files", "registry", "checkpoint"} <= set(edges)  # the bottom layer is seen


def test_every_discovered_method_keeps_the_registry_contract():
    """Each method module is found without a list to edit, and each registered method is complete: its name
    is its config's default name, its config is a MethodConfig, its plan a TrainingPlan, and a trained run
    of it can do something (at least one role)."""
    import dataclasses
    import pkgutil

    import imgx3d.methods
    from imgx3d.config import MethodConfig
    from imgx3d.methods.base import Codec, Generator, Method, Segmenter, SelfValidating, TrainingPlan
    from imgx3d.registry import METHODS, discover, method_class

    discover()
    modules = {m.name for m in pkgutil.iter_modules(imgx3d.methods.__path__)} - {"base", "masks"}
    assert {cls.__module__.rsplit(".", 1)[1] for cls in METHODS.values()} == modules, "a module registers nothing"
    for name, cls in METHODS.items():
        assert method_class(name) is cls and issubclass(cls, Method)
        assert issubclass(cls.Config, MethodConfig) and dataclasses.is_dataclass(cls.Config)
        assert cls.Config().name == name, f"{name}: its config's default name is {cls.Config().name!r}"
        assert cls.spatial_dims in (2, 3) and isinstance(cls.plan, TrainingPlan)
        roles = [role for role in (Segmenter, Generator, Codec, SelfValidating) if issubclass(cls, role)]
        assert roles, f"{name}: a trained run of it has no role"
