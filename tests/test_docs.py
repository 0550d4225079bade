"""The documentation stays true: links resolve, cited pages exist, shown commands are real.

- every relative Markdown link in README.md, CONTRIBUTING.md and docs/*.md points to an existing file, and an
  ``#anchor`` into a Markdown file names one of its headings (GitHub's slugs);
- every ``docs/<page>.md`` named in those pages or in the code (docstrings, comments, recipe comments) exists,
  and the code cites the methods' math and papers as ``docs/methods.md``, not as the research notes
  (``methods.md``, ``peers.md``) that are not part of the repository;
- every ``compressor <subcommand> ...`` line in a fenced code block uses a subcommand and options the CLI has
  (read from the typer app itself, so a renamed option fails here).
"""

from __future__ import annotations

import functools
import re
import shlex
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CODE_FOLDERS = ("compressor", "scripts", "calibration", "recipes")
CODE_SUFFIXES = (".py", ".yaml", ".yml")  # recipes ship inside the package; their comments cite pages too


def markdown_pages() -> list[Path]:
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md"))]
    return [page for page in pages if page.is_file()]


def code_files() -> list[Path]:
    files = []
    for folder in CODE_FOLDERS:
        if (ROOT / folder).is_dir():
            files += [path for path in sorted((ROOT / folder).rglob("*"))
                      if path.suffix in CODE_SUFFIXES and path.is_file() and "__pycache__" not in path.parts]
    return files


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --- Markdown structure ----------------------------------------------------------------------------------

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def split_fences(text: str) -> tuple[list[str], list[list[str]]]:
    """(the lines outside fenced code blocks, fenced lines blanked; the fenced blocks' lines)."""
    prose, blocks, block, opener = [], [], None, None
    for line in text.splitlines():
        match = FENCE.match(line)
        if block is None:
            if match:
                block, opener = [], match.group(1)
                prose.append("")
            else:
                prose.append(line)
        elif match and match.group(1)[0] == opener[0] and len(match.group(1)) >= len(opener) \
                and not line.strip()[len(match.group(1)):].strip():
            blocks.append(block)
            block = None
            prose.append("")
        else:
            block.append(line)
            prose.append("")
    if block is not None:
        blocks.append(block)
    return prose, blocks


HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"""<a\s[^>]*(?:name|id)=["']([^"']+)["']""")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text lowercased, punctuation dropped except - and _,
    spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = []
    for char in text:
        if char in "-_ " or char.isalpha() or unicodedata.category(char) in ("Nd", "Mn", "Mc", "Me", "Pc"):
            kept.append(char)
    return "".join(kept).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    """Every anchor of a Markdown file: its headings' slugs (repeats numbered -1, -2 as GitHub does) and
    explicit ``<a name=...>`` / ``id=...`` anchors."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(HTML_ANCHOR.findall(line))
    return frozenset(found)


INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^\"']*[\"'])?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link (and image) outside code."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    found = []
    for number, line in enumerate(prose, 1):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            found.append((number, target))
    return found


def broken_link(page: Path, target: str) -> str | None:
    """Why a link target from ``page`` is broken, or None. External links are not checked."""
    if SCHEME.match(target) or target.startswith("//"):
        return None  # http(s), mailto, ...
    path_part, _, anchor = target.partition("#")
    destination = (page.parent / unquote(path_part)).resolve() if path_part else page
    if not destination.exists():
        return f"{target}: no such file ({destination})"
    if anchor and destination.suffix == ".md" and destination.is_file() \
            and unquote(anchor) not in anchors(destination):
        return f"{target}: no heading with anchor #{anchor} in {page_id(destination)}"
    return None


@pytest.mark.parametrize("page", markdown_pages(), ids=page_id)
def test_relative_links_resolve(page):
    problems = [f"{page_id(page)}:{number}: {why}" for number, target in links(page)
                if (why := broken_link(page, target))]
    assert not problems, "\n".join(problems)


def test_link_checker_knows_broken_links(tmp_path):
    """The checker itself: GitHub slugs, numbered repeats, a missing file and a missing anchor."""
    assert slug("LoRD (`lord`)") == "lord-lord"
    assert slug("LQ-LoRA (`lqlora`)") == "lq-lora-lqlora"
    assert slug("Quantize or prune, then compensate") == "quantize-or-prune-then-compensate"
    assert slug("Keeping results: `--record`") == "keeping-results---record"
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Options\n\n## Options\n\n```\n# not a heading\n```\n"
                    "[a](page.md#options-1) [b](other.md) [c](#nope) [d](https://example.com/x.md#y)\n"
                    "`[e](inline-code.md)`\n", encoding="utf-8")
    assert anchors(page) == {"title", "options", "options-1"}
    assert [target for _, target in links(page)] == ["page.md#options-1", "other.md", "#nope",
                                                     "https://example.com/x.md#y"]
    assert [broken_link(page, target) is not None for _, target in links(page)] == [False, True, True, False]


# --- docs pages named anywhere -----------------------------------------------------------------------------

DOCS_PAGE = re.compile(r"(?<![\w/:.-])docs/[\w./-]+?\.md\b")
RESEARCH_NOTE = re.compile(r"(?<![\w/])(methods|peers)\.md")


def test_named_docs_pages_exist():
    """``docs/<page>.md`` in the pages and in the code (docstrings and comments) names a page that exists."""
    problems = []
    for path in markdown_pages() + code_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for name in DOCS_PAGE.findall(line):
                if not (ROOT / name).is_file():
                    problems.append(f"{page_id(path)}:{number}: {name} does not exist")
    assert not problems, "\n".join(problems)


def test_code_cites_docs_methods_not_research_notes():
    """The math and paper references the code points at are in docs/methods.md (and the other docs pages);
    ``methods.md §N`` / ``peers.md §N`` name research notes that are not in the repository."""
    problems = []
    for path in code_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if RESEARCH_NOTE.search(line):
                problems.append(f"{page_id(path)}:{number}: {line.strip()}")
    assert not problems, ("cite docs/<page>.md#anchor instead of the research notes:\n" + "\n".join(problems))


def test_docs_page_patterns():
    assert DOCS_PAGE.findall("see docs/methods.md#lord-lord and (docs/results.md).") == ["docs/methods.md",
                                                                                       "docs/results.md"]
    assert DOCS_PAGE.findall("ModelCloud/GPTQModel:docs/eora/README.md") == []
    assert RESEARCH_NOTE.search("methods.md §4.1") and RESEARCH_NOTE.search("(peers.md §16.1)")
    assert not RESEARCH_NOTE.search("docs/methods.md#eora-eora")


# --- commands shown in code blocks -------------------------------------------------------------------------


@functools.cache
def cli_commands() -> dict[str, dict[str, bool]]:
    """Subcommand → {option spelling: whether it takes a value}, from the typer app itself (typer may carry
    its own copy of click, so parameters are told apart by ``param_type_name``, not by class)."""
    import typer

    from compressor.cli import app

    group = typer.main.get_command(app)
    commands = {}
    for name, command in group.commands.items():
        options: dict[str, bool] = {}
        for param in command.params:
            if param.param_type_name == "option":
                takes_value = not (getattr(param, "is_flag", False) or getattr(param, "count", False))
                for spelling in (*param.opts, *param.secondary_opts):
                    options[spelling] = takes_value
        try:
            help_option = command.get_help_option(command.context_class(command))
            help_names = help_option.opts if help_option is not None else []
        except (AttributeError, TypeError):  # an API change in click: the default spelling
            help_names = ["--help"]
        for spelling in help_names:
            options[spelling] = False
        commands[name] = options
    return commands


INVOCATION = re.compile(r"(?:^|(?<=[\s/]))compressor\s+[A-Za-z]")
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}


def logical_lines(block: list[str]) -> list[str]:
    """The block's lines with backslash continuations joined and a leading ``$`` prompt removed."""
    lines, pending = [], ""
    for raw in block:
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    if pending:
        lines.append(pending)
    return [re.sub(r"^\s*\$\s+", "", line) for line in lines]


def tokens(line: str) -> list[str]:
    """Shell words of a line, ``#`` comments dropped, ``&&`` ``;`` ``|`` as words of their own."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # unbalanced quotes: not a shell line; words, comment dropped
        return re.sub(r"(^|\s)#.*$", "", line).split()


ENV_ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=\S*")


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """(subcommand, its arguments) of each ``compressor SUBCOMMAND ...`` in a shell line: the program that
    starts a command (after ``&&``, ``;``, ``|`` or environment assignments; ``.venv/bin/compressor`` too) or
    the module of ``-m`` (``python -m compressor``, ``torchrun ... -m compressor``). A ``compressor`` inside
    a sentence ("the compressor class") is not one."""
    if not INVOCATION.search(line):
        return []
    words = tokens(line)
    found = []
    start = 0  # first word of the current command
    for index, word in enumerate(words[:-1]):
        if word in SEPARATORS:
            start = index + 1
            continue
        if not (word == "compressor" or word.endswith("/compressor")) or words[index + 1] in SEPARATORS:
            continue
        before = words[start:index]
        if all(ENV_ASSIGNMENT.fullmatch(w) for w in before) or (before and before[-1] == "-m"):
            end = next((i for i in range(index + 1, len(words)) if words[i] in SEPARATORS), len(words))
            found.append((words[index + 1], words[index + 2:end]))
    return found


def command_problems(line: str) -> list[str]:
    """What in a shell line the CLI does not have: an unknown subcommand, an unknown option."""
    commands = cli_commands()
    problems = []
    for subcommand, arguments in invocations(line):
        if subcommand not in commands:
            problems.append(f"unknown subcommand {subcommand!r} (the CLI has {', '.join(sorted(commands))})")
            continue
        options = commands[subcommand]
        skip = False
        for argument in arguments:
            if skip:
                skip = False
                continue
            if argument.startswith("--") and argument != "--":
                name = argument.split("=", 1)[0]
                if name not in options:
                    problems.append(f"compressor {subcommand} has no option {name}")
                else:
                    skip = options[name] and "=" not in argument
            elif re.fullmatch(r"-[A-Za-z]", argument):
                if argument not in options:
                    problems.append(f"compressor {subcommand} has no option {argument}")
                else:
                    skip = options[argument]
    return problems


def shown_commands(page: Path) -> list[tuple[int, str]]:
    """(block number, logical line) of every line in the page's fenced blocks that invokes compressor."""
    _, blocks = split_fences(page.read_text(encoding="utf-8"))
    return [(number, line) for number, block in enumerate(blocks, 1) for line in logical_lines(block)
            if invocations(line)]


@pytest.mark.parametrize("page", markdown_pages(), ids=page_id)
def test_shown_commands_exist(page):
    problems = [f"{page_id(page)}, code block {number}: {line.strip()}\n    {problem}"
                for number, line in shown_commands(page) for problem in command_problems(line)]
    assert not problems, "\n".join(problems)


def test_readme_shows_commands():
    """The README's quick start and commands are found (the parser would otherwise pass on nothing)."""
    found = [invocation for _, line in shown_commands(ROOT / "README.md") for invocation in invocations(line)]
    subcommands = {subcommand for subcommand, _ in found}
    assert {"compress", "eval", "inspect", "compare", "methods"} <= subcommands
    quick = [line for _, line in shown_commands(ROOT / "README.md") if "scripts/setup.sh" in line]
    assert [sub for sub, _ in invocations(quick[0])] == ["compress", "eval"]


def test_command_checker_catches_made_up_options():
    bogus_eval = "compressor eval has no option --bogus"
    bogus_compress = "compressor compress has no option --bogus"
    for fine in ("compressor compress m --recipe lord --out o --set lord.ratio=0.4 -s x=1 --stream",
                 "compressor eval out/x   # --bogus in a comment is not an option",
                 "torchrun --nproc-per-node 2 -m compressor compress m --recipe lord --out o",
                 "compressor eval out --no-perplexity --tasks arc_easy --json r.json",
                 'model = compressor.load("out")  # or: compressor eval out --bogus',
                 "methods/   one file per method: the compressor class",
                 # --set takes a value, so a value that looks like an option is not checked as one
                 "compressor compress m --set --weird=1 --recipe r --out o"):
        assert command_problems(fine) == [], fine
    assert command_problems("scripts/setup.sh && .venv/bin/compressor compress m --recipe lord --out o "
                            "&& .venv/bin/compressor eval o --bogus") == [bogus_eval]
    assert command_problems("HF_HUB_OFFLINE=1 .venv/bin/compressor eval out --bogus") == [bogus_eval]
    assert command_problems("compressor compress m --recipe lord --bogus=1 -x") == [
        bogus_compress, "compressor compress has no option -x"]
    unknown = command_problems("compressor frobnicate out")
    assert len(unknown) == 1 and "unknown subcommand 'frobnicate'" in unknown[0]
    continued = logical_lines(["compressor compress m \\", "    --recipe lord \\", "    --bogus"])
    assert len(continued) == 1 and command_problems(continued[0]) == [bogus_compress]
