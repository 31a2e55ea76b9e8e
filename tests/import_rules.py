"""The package's rooms and the one rule between them: a module imports only from its own room
or from rooms below it. Also: no circle of imports, and no module over
MAX_LINES lines.

Run it to see the rooms, their line counts and any violation (exit 1 when there is one)::

    python tests/import_rules.py

``tests/test_architecture.py`` runs the same checks in the suite, so the layout cannot rot.
Every import counts, including those inside functions (they only defer the cost) and those
under ``TYPE_CHECKING`` (a type from a higher room is still a dependency on it). The circle
check counts them too: a deferred import cannot deadlock an import, but two modules that
import each other, however late, are one unit that cannot be understood, tested or moved
apart; a name both need belongs in a lower module.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "maskdist"
MAX_LINES = 450

# Bottom to top. A name is a module or a package; a module belongs to the room of the
# longest name that prefixes it.
ROOMS: list[tuple[str, tuple[str, ...], str]] = [
    ("floor", ("maskdist", "maskdist.errors", "maskdist.shards.format"), "user-facing errors; every constant of the shard format"),
    ("system", ("maskdist.system",), "processes that die with their owner, atomic files, the process group, lazy exports"),
    ("config", ("maskdist.config",), "the one typed training configuration and its presets"),
    ("data", ("maskdist.data",), "samples: labels, layout, folds, images, transforms, the synthetic stand-in"),
    ("metrics", ("maskdist.metrics",), "macro, per-class and part F1"),
    ("shards", ("maskdist.shards",), "the on-disk format: tar I/O, the manifest, build, check"),
    ("streams", ("maskdist.streams",), "shards read as class-balanced and exactly-once streams"),
    ("model", ("maskdist.model",), "what learns: the timm factory, heads, losses, mixing, EMA"),
    ("train", ("maskdist.train",), "the Accelerate loop, the resumable state, preemption, k-fold"),
    ("infer", ("maskdist.infer",), "the fold ensemble, submission, pseudo-labels, scores"),
    ("report", ("maskdist.report",), "one self-contained page of experiments: plan, curves, OOF figures, calibration, audit"),
    ("bench", ("maskdist.bench",), "every speed claim as a ratio measured in one run"),
    ("top", ("maskdist.cli", "maskdist.demo", "maskdist.__main__", "maskdist.stream", "maskdist.transforms"),
     "the click commands, the demo, and the two old names that warn and re-export"),
]


def room_of(module: str) -> int:
    best, rank = -1, None
    for i, (_name, prefixes, _job) in enumerate(ROOMS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise KeyError(f"{module} belongs to no room: add it to ROOMS in {Path(__file__).name}")
    return rank


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_module(name: str, known: dict[str, Path]) -> bool:
    return name in known


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    top_level: bool  # executed when the module is imported (not in a function or TYPE_CHECKING)


def imports(known: dict[str, Path] | None = None) -> list[Import]:
    """Every import of a maskdist module by a maskdist module."""
    known = known or modules()
    found = []
    for source, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        deferred: set[int] = set()
        for node in ast.walk(tree):
            inside = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
            if inside:
                deferred.update(id(n) for n in ast.walk(node) if n is not node)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.split(".")[0] == "maskdist"]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "maskdist" and not node.level:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.append(full if _is_module(full, known) else node.module)
            for target in targets:
                found.append(Import(source, target, node.lineno, id(node) not in deferred))
    return found


def upward(found: list[Import]) -> list[Import]:
    """Imports from a lower room into a higher one."""
    return [i for i in found if room_of(i.target) > room_of(i.source)]


def circles(found: list[Import]) -> list[list[str]]:
    """Cycles of imports, deferred ones included (each once, as the list of its modules); a
    module importing its own package (``maskdist.x.y`` -> ``maskdist.x``) is no circle."""
    graph: dict[str, set[str]] = {}
    for i in found:
        if i.target != i.source and not i.source.startswith(i.target + "."):
            graph.setdefault(i.source, set()).add(i.target)
    seen_cycles, out = set(), []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):]
                key = frozenset(cycle)
                if key not in seen_cycles:
                    seen_cycles.add(key)
                    out.append(cycle + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return out


def long_modules(known: dict[str, Path] | None = None) -> dict[str, int]:
    known = known or modules()
    sizes = {name: len(path.read_text().splitlines()) for name, path in known.items()}
    return {name: n for name, n in sizes.items() if n > MAX_LINES}


def report() -> tuple[str, bool]:
    known = modules()
    found = imports(known)
    lines = [f"{'room':<8} {'modules':>7} {'lines':>6}  may import", ""]
    for rank, (name, _prefixes, _job) in enumerate(ROOMS):
        members = [m for m in known if room_of(m) == rank]
        size = sum(len(known[m].read_text().splitlines()) for m in members)
        below = ", ".join(r[0] for r in ROOMS[:rank]) or "-"
        lines.append(f"{name:<8} {len(members):>7} {size:>6}  {below}")
    largest = max(known, key=lambda m: len(known[m].read_text().splitlines()))
    lines.append("")
    lines.append(f"{len(known)} modules, {len(found)} imports between them; largest module {largest}"
                 f" ({len(known[largest].read_text().splitlines())} lines)")
    bad = upward(found)
    loops = circles(found)
    big = long_modules(known)
    for i in bad:
        lines.append(f"UPWARD  {i.source}:{i.line} imports {i.target} ({ROOMS[room_of(i.source)][0]} -> {ROOMS[room_of(i.target)][0]})")
    for cycle in loops:
        lines.append("CIRCLE  " + " -> ".join(cycle))
    for name, n in sorted(big.items()):
        lines.append(f"LONG    {name}: {n} lines (at most {MAX_LINES})")
    ok = not (bad or loops or big)
    lines.append("import rules hold: no upward import, no circle, no long module" if ok else "import rules broken")
    return "\n".join(lines), ok


if __name__ == "__main__":
    text, ok = report()
    print(text)
    sys.exit(0 if ok else 1)
