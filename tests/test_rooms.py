"""The service's rooms (issue 23): every import in ``service/`` points down or sideways, never back up, and the
two processes' rooms never import each other.

The layers, from the bottom (``service/__init__.py`` says the same):

0. ``contract`` (frames, errors, the sampling schema), ``parsers``, ``logs``, ``procs``: imported by both
   processes, importing nothing of the service above them;
1. ``settings``;
2. ``pipeline``: prompting, routing, balancing, post-processing (pure; the measurement tools use it too);
3. the worker's leaves (``worker.progress``, ``worker.faults``), then ``worker.backends``, then the worker's
   answering (``worker.answer``, ``worker.completer``, ``worker.local``), then ``worker.main``;
   on the API side ``pool``, then ``http``;
4. the entry points: ``asgi``, ``__main__``, ``preflight``.

Imports inside functions count as much as those at the top.  Parsed with ``ast``: nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"
MAX_LINES = 400

# (prefix, rank, side): the longest matching prefix wins.  A module may import ranks <= its own, and a side
# ("api", "worker") never the other side.
ROOMS: tuple[tuple[str, int, str | None], ...] = (
    ("service.contract", 0, None),
    ("service.parsers", 0, None),
    ("service.logs", 0, None),
    ("service.procs", 0, None),
    ("service.settings", 1, None),
    ("service.pipeline", 2, None),
    ("service.worker.progress", 3, "worker"),
    ("service.worker.faults", 3, "worker"),
    ("service.worker.backends", 4, "worker"),
    ("service.worker.answer", 5, "worker"),
    ("service.worker.completer", 5, "worker"),
    ("service.worker.local", 6, "worker"),
    ("service.worker", 7, "worker"),  # __init__, main, __main__
    ("service.pool", 3, "api"),
    ("service.http", 5, "api"),
    ("service.asgi", 8, None),
    ("service.__main__", 8, None),
    ("service.preflight", 8, None),
    ("service", 0, None),  # the package itself
)


def room(module: str) -> tuple[str, int, str | None]:
    for prefix, rank, side in sorted(ROOMS, key=lambda r: -len(r[0])):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank, side
    raise AssertionError(f"{module} is in no room of tests/test_rooms.py: give it one")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a ``service`` module in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "service"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "service":
                continue
            for alias in node.names:  # `from service.pool import progress` imports the module service.pool.progress
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if _is_module(candidate) else base))
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


MODULES = sorted(SERVICE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down_and_stay_in_their_process(path: Path) -> None:
    me = module_name(path)
    _, my_rank, my_side = room(me)
    wrong = []
    for line, target in imports(path):
        _, rank, side = room(target)
        if target == me:
            continue
        if rank > my_rank:
            wrong.append(f"line {line}: {target} (layer {rank}) is above {me} (layer {my_rank})")
        if my_side and side and side != my_side:
            wrong.append(f"line {line}: {target} runs in the {side} process, {me} in the {my_side} process")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_is_over_400_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module_name(path)} has {lines} lines; split it (at most {MAX_LINES})"


def test_the_rooms_check_sees_an_arrow_back_up(tmp_path: Path) -> None:
    """The check itself can fail: a pipeline module importing the pool, a pool module importing the worker."""
    assert room("service.pipeline.prompting")[1] < room("service.pool.client")[1]
    assert room("service.pool.client")[2] == "api" and room("service.worker.main")[2] == "worker"
    assert room("service.contract.wire")[1] < room("service.settings")[1]
    with pytest.raises(AssertionError, match="no room"):
        room("somewhere.else")
