"""The one output-directory guard: ``--out`` reserved at the start of a run, replaced only at its end.

``OutputDirectory(out, overwrite, inputs)`` is what every writer goes through (``compress`` holds one for
the whole run; ``io.save`` makes its own when called alone):

- on entry, before any weight is read: ``out`` must be absent, an empty directory, or (``overwrite``) a
  directory; never a symbolic link, a mount point, the current directory or one above it, a directory
  holding one of the run's ``inputs`` (the model being read), or a name longer than the file system allows.
  Then the run's lock ``.NAME.lock`` (``RunLock``: ``flock`` on a file holding the PID) is taken: a second
  run on the same ``out`` is refused at once, naming the first; the kernel drops the lock of a process
  that dies, so a lock left by a killed run is taken over. Temporary siblings left by processes that no longer exist
  (``.NAME.tmp-PID-*``, killed by SIGKILL or a power cut) are removed. Then the temporary sibling
  ``.NAME.tmp-PID-XXXXXXXX`` is created in the same directory (same file system: the final rename is
  atomic), so an output that cannot be written (read-only or virtual file system, a name too long) fails
  here, not after the run;
- ``commit()`` (on a clean exit of the block) renames the temporary directory to ``out`` only if ``out`` is
  as it was at the start: a file or directory that appeared meanwhile (another run given the same
  ``--out``, a user) is never deleted; the run fails instead and its result is discarded;
- on an error or a signal (the CLI turns SIGTERM into ``Terminated``) the temporary directory and any
  parent directories it created are removed, and the lock released; the file system full (``ENOSPC``) is
  one line with the path and the bytes free. What a failure leaves (a streamed run's kept folder, an output
  already placed when the signal came) is said on the exception (``errors.note_left``).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import CompressorError, left_by, note_left, quote
from .faults import pause_for_tests

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the final rename still never replaces what appeared meanwhile)
    fcntl = None  # type: ignore[assignment]

TMP, OLD, LOCK = "tmp", "old", "lock"
_NAME_LIMIT = 200  # characters of --out's name kept in a sibling's name (255 is the usual limit)
_NAME_MAX = 255  # bytes of one path component, where the file system does not say


def sibling_prefix(out: Path, kind: str) -> str:
    """``.NAME.tmp-`` / ``.NAME.old-``: how temporary siblings of ``out`` are named (then PID-random)."""
    return f".{out.name[:_NAME_LIMIT]}.{kind}-"


def _owner(entry: Path, prefix: str) -> int | None:
    pid = entry.name[len(prefix):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` whose owner process is gone; the removed paths. An ``old``
    sibling (the previous output, moved aside for the final rename) is moved back if ``out`` is missing."""
    removed = []
    for kind in (TMP, OLD):
        prefix = sibling_prefix(out, kind)
        for entry in sorted(e for e in out.parent.iterdir() if e.name.startswith(prefix)):  # no glob: [ ] * ?
            pid = _owner(entry, prefix)
            if pid is None or pid == os.getpid() or _alive(pid) or not entry.is_dir():
                continue
            if kind == OLD and not os.path.lexists(out) and (entry / "x").is_dir():
                os.replace(entry / "x", out)  # died between the two renames of a replacement
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _state(out: Path) -> tuple | None:
    """What ``out`` is now (None: absent): identity, modification time and entries."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return None
    entries = tuple(sorted(os.listdir(out))) if os.path.isdir(out) and not os.path.islink(out) else None
    return st.st_dev, st.st_ino, st.st_mode, st.st_mtime_ns, entries


def partial_path(out: Path) -> Path:
    """Where a streamed run of ``out`` works (kept after an interruption, for ``--resume``)."""
    return out.parent / f".{out.name[:_NAME_LIMIT]}.partial"


def lock_path(out: Path) -> Path:
    """The lock of the runs writing ``out`` (``RunLock``)."""
    return out.parent / f"{sibling_prefix(out, LOCK)[:-1]}"


def _name_max(folder: Path) -> int:
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return _NAME_MAX


def check_name_length(out: Path) -> None:
    """Refuse a path component of ``out`` longer than its file system allows (ENAMETOOLONG otherwise, late)."""
    limit = _name_max(out.parent)
    for part in out.parts[1:]:
        size = len(os.fsencode(part))
        if size > limit:
            raise CompressorError(f"--out {quote(str(out))}: the name {quote(part)} is {size} bytes, longer than "
                                  f"the file system allows ({limit}); choose a shorter name")


def check_output(out: Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Fail early (before any work) if ``out`` cannot be (re)placed by this run."""
    out = Path(os.path.abspath(out))
    check_name_length(out)
    if out.is_symlink():
        raise CompressorError(f"--out {out} is a symbolic link (to {os.readlink(out)}), which the run would have to "
                              "replace; name the directory it points to, or a new path")
    here = Path.cwd().resolve()
    resolved = out.resolve()
    if resolved == here or resolved in here.parents:
        raise CompressorError(f"--out {out} is the current directory or holds it; name a new directory instead")
    for source in inputs:
        source = Path(source).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        if source == resolved or resolved in source.parents:
            raise CompressorError(f"--out {out} holds the input {source}, which the run reads; "
                                  "write the output elsewhere")
    if out.exists() and not out.is_dir():
        raise CompressorError(f"output path exists and is not a directory: {out}")
    if out.is_dir():
        if os.path.ismount(out):
            raise CompressorError(f"--out {out} is a mount point, which cannot be replaced; "
                                  "name a directory inside it")
        try:
            full = any(out.iterdir())
        except OSError as exc:
            raise CompressorError(f"cannot read --out {out}: {exc.strerror}") from None
        if full and not overwrite:
            raise CompressorError(f"output directory is not empty: {out} (use --overwrite to replace it)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CompressorError(f"cannot create {out}: {parent} is not a directory")
            break


@contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM held back for the block (the final renames), delivered after it."""
    if sys.platform == "win32" or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (ValueError, OSError):  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class RunLock:
    """One run per output directory: ``flock`` on ``.NAME.lock`` beside ``out``, a file holding its holder's
    PID (what a refused run names). ``release`` removes the file and drops the lock; the kernel drops the
    lock of a process that dies (SIGKILL), so the file such a run leaves is taken over by the next."""

    def __init__(self, out: Path) -> None:
        self.out, self.path = out, lock_path(out)
        self.fd: int | None = None

    def take(self) -> None:
        """Hold the lock, or refuse at once (``CompressorError``) naming the run that holds it."""
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise CompressorError(f"--out {self.out} is being written by another run (PID {holder}, lock "
                                      f"{self.path}); wait for it to finish, or choose another --out") from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return  # a file system without locks: the final rename still never replaces a newcomer
                raise
            if self._is_current(fd):
                break
            os.close(fd)  # removed by its holder between our open and flock: lock the new file instead
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def _is_current(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    @staticmethod
    def _holder(fd: int) -> str:
        """The PID written in a held lock (its holder may not have written it yet: waited for, briefly)."""
        for _ in range(20):
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if text:
                return text if text.isdigit() else "unknown"
            time.sleep(0.05)
        return "unknown"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self._is_current(self.fd):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # drops the lock
        self.fd = None


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the file system (or the user's quota) full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _bytes_under(folder: Path | None) -> int:
    if folder is None or not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


class OutputDirectory:
    """``with OutputDirectory(out, overwrite, inputs) as output:`` write into ``output.tmp``; on a clean exit
    it replaces ``out`` (``commit``), on an error or signal it is removed. ``expected_bytes``: what the
    writer expects the output to take (said when the disk fills)."""

    def __init__(self, out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> None:
        self.path = Path(os.path.abspath(Path(out).expanduser()))
        self.overwrite = overwrite
        self.inputs = list(inputs)
        self.tmp: Path | None = None
        self.placed = False  # the output is at ``path`` (committed)
        self.expected_bytes: int | None = None
        self.lock = RunLock(self.path)
        self._created: list[Path] = []  # parent directories this run made (removed again on failure)
        self._start: tuple | None = None

    def __enter__(self) -> "OutputDirectory":
        if self.path.parent.is_dir():  # first: a previous output moved back counts for the checks below
            try:
                remove_stale(self.path)
            except OSError:
                pass
        check_output(self.path, self.overwrite, self.inputs)
        try:
            missing = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
            for parent in reversed(missing):
                parent.mkdir()
                self._created.append(parent)
            self.lock.take()  # before any work: a second run on this --out stops here
            self.tmp = self.work_folder()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output is an ordinary directory
        except OSError as exc:
            self._close()
            reason = exc.strerror or str(exc)
            raise CompressorError(f"cannot write the output beside --out {self.path}: {reason}") from None
        except BaseException:
            self._close()
            raise
        self._start = _state(self.path)
        return self

    def work_folder(self) -> Path:
        """Create the folder the run writes into: a fresh temporary sibling of ``out``."""
        prefix = f"{sibling_prefix(self.path, TMP)}{os.getpid()}-"
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.path.parent))

    def kept(self) -> bool:
        """Whether a failed run's folder is kept (not here: it is removed)."""
        return False

    def kept_note(self) -> str:
        """What the error line says of a kept folder (``kept``)."""
        return ""

    def commit(self) -> Path:
        """Replace ``out`` by the temporary directory, unless ``out`` changed since the start."""
        assert self.tmp is not None
        with deferred_signals():
            now = _state(self.path)
            if now != self._start:
                what = "appeared" if self._start is None else "changed"
                raise CompressorError(f"--out {self.path} {what} during the run (another run or program wrote "
                                      "there); it was left untouched and this run's result discarded")
            if now is not None and now[-1]:  # a non-empty directory (--overwrite): moved aside first
                old = Path(tempfile.mkdtemp(prefix=f"{sibling_prefix(self.path, OLD)}{os.getpid()}-",
                                            dir=self.path.parent))
                os.replace(self.path, old / "x")
                os.replace(self.tmp, self.path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.path)  # onto an empty directory, or where nothing is
            self.tmp, self.placed = None, True
        pause_for_tests("placed")  # the signal tests' hook: the output is complete at --out
        return self.path

    def _discard(self, exc: BaseException | None = None) -> None:
        """Remove the run's folder (or keep it, saying so on ``exc``) and the parents it made."""
        if self.tmp is not None and self.kept():
            if exc is not None:
                note_left(exc, self.kept_note())
            self.tmp = None
            return
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        for parent in reversed(self._created):
            try:
                parent.rmdir()
            except OSError:
                break
        self._created = []

    def _close(self, exc: BaseException | None = None) -> None:
        """The end of a run that does not commit: its folder discarded (or kept), the lock released."""
        try:
            if exc is not None:
                pause_for_tests("cleanup")
            self._discard(exc)
        finally:
            self.lock.release()

    def _disk_full(self, exc: OSError) -> CompressorError:
        """The one line for a full file system: where, what was written, what is free and needed."""
        where = exc.filename or self.tmp or self.path
        written = _bytes_under(self.tmp)
        self._close(exc)
        try:
            free = f"{shutil.disk_usage(self.path.parent).free:,} bytes are free"
        except OSError:
            free = "the free space is unknown"
        needed = f", the output needs about {self.expected_bytes:,}" if self.expected_bytes else ""
        failure = CompressorError(f"no space left on the device of --out {self.path} (writing {where}, after "
                                  f"{written:,} bytes): {free}{needed}; free some space or choose another --out")
        if left_by(exc):
            note_left(failure, left_by(exc))
        return failure

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc is not None:
            if disk_full(exc):
                raise self._disk_full(exc) from None
            self._close(exc)
            return
        try:
            self.commit()
        except BaseException as failure:
            if self.placed:  # a signal delivered once the output was in place
                note_left(failure, f"the complete output had been written to --out {self.path}")
            self._close(failure)
            raise
        self.lock.release()


class PartialOutputDirectory(OutputDirectory):
    """A streamed run's output directory: it works in ``.NAME.partial`` beside ``out`` (``partial_path``),
    which is kept after a failure once a layer is recorded in it (``io.resume``). A recorded run found there
    is continued with ``continue_recorded``, else refused: hours of work, perhaps, are never removed unasked.
    A folder with no layer recorded (a run that died before finishing one) is started over."""

    def __init__(self, out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = (),
                 continue_recorded: bool = False) -> None:
        super().__init__(out, overwrite, inputs)
        self.continue_recorded = continue_recorded

    def recorded(self, folder: Path) -> bool:
        return (folder / ".resume" / "state.json").is_file()

    def work_folder(self) -> Path:
        folder = partial_path(self.path)
        if self.recorded(folder) and not self.continue_recorded:
            raise CompressorError(f"an interrupted run of --out {self.path} is in {folder}: "
                                  "continue it with --resume, or remove that directory to start over")
        if folder.exists() and not self.recorded(folder):
            shutil.rmtree(folder)
        folder.mkdir(exist_ok=True)
        return folder

    def kept(self) -> bool:
        """A run with layers recorded is kept for ``--resume``."""
        return self.recorded(self.tmp)

    def kept_note(self) -> str:
        return (f"the finished layers are kept in {self.tmp}: run the same command with --resume to continue, "
                "or remove that directory to start over")
