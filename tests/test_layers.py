"""The package's folders are layers: each room imports only from rooms below it (the order written in
CONTRIBUTING.md), and no two modules import each other. Read from the source with ``ast`` (imports inside
functions count too), so a violation fails naming the file, the line and the import."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = {"__init__", "__main__"}  # the package's facade and ``python -m compressor``: above every room


def layer_order() -> list[str]:
    """The rooms, bottom first, as CONTRIBUTING.md's "Layers" block lists them (one ``room  what`` per line)."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    block = re.search(r"## Layers.*?```\n(.*?)```", text, re.S)
    assert block, "CONTRIBUTING.md has no '## Layers' section with a fenced list of rooms"
    lines = block.group(1).splitlines()  # a room's line starts at the margin; indented lines continue it
    return [line.split()[0].rstrip("/").removesuffix(".py") for line in lines if line.strip() and not line[0].isspace()]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str:
    """``compressor.walk.layers`` → ``walk``; ``compressor.api`` → ``api``; the package itself → ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of the package in ``path``; ``from X import y`` yields
    ``X.y`` when that is a module of the package, else ``X``."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "compressor"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "compressor":
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_module = (root / Path(*sub.split("."))).with_suffix(".py").is_file() \
                    or (root / Path(*sub.split(".")) / "__init__.py").is_file()
                found.append((node.lineno, sub if is_module else target))
    return found


def package_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / "compressor").rglob("*.py") if "__pycache__" not in p.parts)


def violations(order: list[str], root: Path = ROOT) -> list[str]:
    rank = {room: i for i, room in enumerate(order)}
    bad = []
    for path in package_files(root):
        here = room_of(module_name(path, root))
        if here in TOP:
            continue
        assert here in rank, f"{path.relative_to(root)}: room {here!r} is not in CONTRIBUTING.md's layer order"
        for line, target in imports(path, root):
            there = room_of(target)
            if there == "__init__" or (there in rank and rank[there] > rank[here]):
                bad.append(f"{path.relative_to(root)}:{line} ({here}) imports {target} ({there}), "
                           "a room above it")
    return bad


def test_every_room_is_in_the_written_order():
    order = layer_order()
    rooms = {room_of(module_name(p)) for p in package_files()} - TOP
    assert not rooms - set(order), f"rooms missing from CONTRIBUTING.md's layer order: {sorted(rooms - set(order))}"
    assert len(order) == len(set(order)), "a room is listed twice"


def test_no_import_runs_against_the_layer_order():
    bad = violations(layer_order())
    assert not bad, bad[0]


def test_no_two_modules_import_each_other():
    graph = {module_name(p): {target for _, target in imports(p)} for p in package_files()}
    pairs = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets
                    if b != a and a in graph.get(b, set()) and room_of(a) not in TOP and room_of(b) not in TOP})
    assert not pairs, f"{pairs[0][0]} and {pairs[0][1]} import each other"


def test_the_check_names_an_upward_import(tmp_path):
    """The checker itself, on a package of three files: a low room importing a high one is reported by file,
    line and import; an import downwards is not."""
    order = layer_order()
    assert order.index("kernels") < order.index("api")
    (tmp_path / "compressor" / "kernels").mkdir(parents=True)
    (tmp_path / "compressor" / "__init__.py").write_text("")
    (tmp_path / "compressor" / "kernels" / "__init__.py").write_text("")
    (tmp_path / "compressor" / "kernels" / "probe.py").write_text("import torch\n\nfrom ..api import compress\n")
    (tmp_path / "compressor" / "api.py").write_text("from .kernels import probe\n")
    bad = violations(order, tmp_path)
    assert bad == ["compressor/kernels/probe.py:3 (kernels) imports compressor.api (api), a room above it"], bad
