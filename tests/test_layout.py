"""The package layout, read from the source with `ast`: imports flow one way, load -> adapt ->
batch -> step -> save, and no two modules import each other, directly or round a loop.

    kernels   <- nothing of lowrank
    errors, files, host_memory (the top-level helpers) <- each other only
    models    <- helpers, kernels
    data      <- helpers
    adapters  <- helpers, kernels, models
    train     <- helpers, kernels, models, data, adapters
    lowrank/__init__.py (the public API) <- all of the above
    the command lines (`__main__` modules, lowrank/generate.py and lowrank/export.py) <- anything; nothing imports them

Every import counts, also one inside a function or under TYPE_CHECKING: a lazy import hides a
cycle from Python, not from a reader."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {  # layer -> the layers it may import
    "kernels": {"kernels"},
    "helpers": {"helpers"},
    "models": {"helpers", "kernels", "models"},
    "data": {"helpers", "data"},
    "adapters": {"helpers", "kernels", "models", "adapters"},
    "train": {"helpers", "kernels", "models", "data", "adapters", "train"},
    "api": {"helpers", "kernels", "models", "data", "adapters", "train"},
}
CLIS = {"lowrank.generate", "lowrank.export", "lowrank.plot"}


def sources() -> dict[str, tuple[str, bool]]:
    """module name -> (source, is a package __init__), for lowrank/ and kernels/ (lowrank.kernels)."""
    out = {}
    for folder, package in ((ROOT / "lowrank", "lowrank"), (ROOT / "kernels", "lowrank.kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (path.read_text(encoding="utf-8"), is_pkg)
    return out


def imports(module: str, source: str, is_pkg: bool, known: set[str]) -> set[str]:
    """The lowrank modules `module` imports: `from a import b` counts as a.b where that is a module."""
    package = module if is_pkg else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lowrank"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lowrank":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found |= subs or {target}
    return found - {module}


def layer(module: str) -> str:
    if module in CLIS or module.endswith(".__main__"):
        return "cli"
    if module == "lowrank":
        return "api"
    part = module.split(".")[1]
    return "helpers" if part in ("errors", "files", "host_memory") else part


def violations(srcs: dict[str, tuple[str, bool]]) -> list[str]:
    known = set(srcs)
    graph = {m: imports(m, s, p, known) for m, (s, p) in srcs.items()}
    bad = []
    for m, targets in graph.items():
        for t in sorted(targets):
            if t not in known:
                bad.append(f"{m} imports {t}, which does not exist")
            elif layer(t) == "cli":
                bad.append(f"{m} imports the command line {t}")
            elif layer(m) != "cli" and layer(t) not in LAYERS[layer(m)]:
                bad.append(f"{m} ({layer(m)}) imports {t} ({layer(t)}): against the direction")
    # cycles: a depth-first search that reports each back edge
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                bad.append("import cycle: " + " -> ".join(stack[stack.index(t):] + [m, t]))
            elif t in graph and t not in state:
                visit(t, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return bad


def test_imports_flow_one_way_without_cycles():
    srcs = sources()
    assert {"lowrank.models.checkpoint", "lowrank.data.tokenizer", "lowrank.train.loop",
            "lowrank.kernels.lora"} <= set(srcs)  # the layout the rules are written for
    assert set(layer(m) for m in srcs) <= set(LAYERS) | {"cli"}, sorted(set(layer(m) for m in srcs))
    assert violations(srcs) == []


@pytest.mark.parametrize("module,source,why", [
    ("lowrank.data.x", "from ..train import loop\n", "against the direction"),
    ("lowrank.models.x", "def f():\n    from lowrank.adapters import lora\n", "against the direction"),
    ("lowrank.kernels.x", "from ..errors import ConfigError\n", "against the direction"),
    ("lowrank.train.x", "from . import __main__\n", "command line"),
    ("lowrank.data.a", "from .b import f\n", "import cycle"),
])
def test_the_checker_catches_what_it_is_for(module, source, why):
    srcs = {**sources(), module: (source, False)}
    if module == "lowrank.data.a":
        srcs["lowrank.data.b"] = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import g\n", False)
    assert any(why in v for v in violations(srcs)), violations(srcs)
