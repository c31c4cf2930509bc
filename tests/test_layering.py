"""The package's layering (README: How it fits together): stages import only downward, and
no dymu module imports another in a loop. Read from the source with ``ast``, every import
counted (module level, inside functions, under TYPE_CHECKING)."""

import ast
import importlib
from pathlib import Path

import pytest

import dymu

PACKAGE = Path(dymu.__file__).parent
# stages in data-flow order; the modules directly in dymu/ are the ground floor
STAGES = [
    "ground",
    "sources",
    "towers",
    "engine",
    "encoder",
    "calibration",
    "lm",
    "integrations",
    "cli",
]
# dymu/__init__.py is the public API: it names every stage (lazily) and is above them all
# (``__version__`` lives on the ground, in _version). _moved maps old paths to new ones.
ABOVE_ALL = {"dymu", "dymu._moved"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 2 and module not in ABOVE_ALL and f"{module}" not in _packages():
        return STAGES.index("ground")
    return STAGES.index(parts[1])


def _packages() -> set[str]:
    return {m for m, p in MODULES.items() if p.name == "__init__.py"}


def imports(module: str) -> set[str]:
    """The dymu modules ``module`` imports (a ``from pkg import name`` of a submodule counts
    as that submodule)."""
    path = MODULES[module]
    here = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dymu"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "dymu":
                target = node.module
            else:
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & MODULES.keys()
            found |= subs or {target}
    return {m for m in found if m in MODULES} - {module}


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_belongs_to_a_declared_stage():
    for module in MODULES:
        if module not in ABOVE_ALL:
            assert stage(module) >= 0, module
    assert len([m for m in MODULES if m.count(".") == 1 and m not in _packages()]) <= 12


@pytest.mark.parametrize("module", sorted(set(MODULES) - ABOVE_ALL))
def test_no_stage_imports_a_higher_one(module):
    upward = [t for t in GRAPH[module] if t not in ABOVE_ALL and stage(t) > stage(module)]
    assert not upward, f"{module} ({STAGES[stage(module)]}) imports higher stages: {upward}"


def test_nothing_below_the_public_api_imports_it():
    importers = sorted(m for m, targets in GRAPH.items() if "dymu" in targets and m != "dymu")
    assert not importers, f"import the package root, which sits above every stage: {importers}"


def test_no_import_loops():
    graph = {m: GRAPH[m] - ABOVE_ALL for m in MODULES if m not in ABOVE_ALL}
    state: dict[str, int] = {}  # 1 visiting, 2 done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                loop = path[path.index(t) :] + [t]
                raise AssertionError("import loop: " + " -> ".join(loop))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_a_loop_or_an_upward_import_would_be_caught():
    """The reader above sees relative and absolute imports alike (checked on two modules
    whose imports are known)."""
    assert "dymu.errors" in GRAPH["dymu.engine.schedule"]
    assert "dymu.engine.blocks" in GRAPH["dymu.encoder.model"]
    assert stage("dymu.cli.find") > stage("dymu.calibration.job") > stage("dymu.errors")


@pytest.mark.parametrize(
    "old, new",
    [
        ("dymu.vtu", "dymu.lm.vtu"),
        ("dymu.job", "dymu.calibration.job"),
        ("dymu.adapters.base", "dymu.towers.base"),
        ("dymu.data", "dymu.sources.stream"),
    ],
)
def test_old_module_paths_are_the_new_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_public_api_is_unchanged():
    for name in dymu.__all__:
        assert getattr(dymu, name) is not None, name
    from dymu.encoder import DyMUEncoder, EncoderOutput
    from dymu.integrations import hf_llava, llava  # noqa: F401

    assert DyMUEncoder is dymu.DyMUEncoder and EncoderOutput is dymu.EncoderOutput
