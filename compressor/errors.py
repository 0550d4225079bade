"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class CompressorError(Exception):
    """Bad input (model, recipe, option, path): a message meant for the user, not a bug report."""


class StateRefused(CompressorError):
    """Durable state ``--resume`` cannot verify or use: the line says to start over, so no note of the kept
    folder (which would say to resume it) is added (``note_left``: the first note, empty here, stands)."""

    left = ""


class CompressorWarning(UserWarning):
    """Something the run will do that the user may not want (``Plan.warnings``); the CLI prints it as one
    ``warning:`` line on stderr before the run starts, the API issues it through ``warnings.warn``."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (the CLI installs the handler): cleaned up like Ctrl-C."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (multi-line messages of ``transformers`` joined, not cut)."""
    text = " ".join(part.strip() for part in str(exc).strip().splitlines() if part.strip())
    return text or type(exc).__name__


QUOTE_LIMIT = 100  # characters of a user's value an error line quotes


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error line, cut to ``limit`` characters with the full length said, so that a
    huge value (a megabyte of regex, a list of thousands of targets) cannot make a huge line."""
    text = value if isinstance(value, str) else None
    shown = repr(text[: limit + 1] if text is not None else value)
    if text is None and len(shown) > limit:  # a container: repr of the whole, then cut (bounded by the reader)
        return f"{shown[:limit]}… ({len(shown):,} characters)"
    if text is not None and len(text) > limit:
        return f"{repr(text[:limit])[:-1]}…' ({len(text):,} characters)"
    return shown


def note_left(exc: BaseException, what: str) -> None:
    """Say on ``exc`` what the failure leaves on disk (a streamed run's kept layers, an output already
    placed); the CLI adds it to the error line. The first note stands: the nearest to the failure knows most."""
    if getattr(exc, "left", None) is None:
        try:
            exc.left = what  # type: ignore[attr-defined]
        except AttributeError:  # an exception type without __dict__
            pass


def left_by(exc: BaseException) -> str | None:
    """What ``note_left`` said about ``exc`` (None: nothing was noted)."""
    return getattr(exc, "left", None)


def rank_label() -> str:
    """``rank R/N: `` in a process that torchrun started as one of several (what its error lines start
    with, so that the one line names the rank), else empty. From the environment alone: no torch import."""
    import os

    size = os.environ.get("WORLD_SIZE", "1") or "1"
    return f"rank {os.environ.get('RANK', '?')}/{size}: " if size.isdigit() and int(size) > 1 else ""
