"""Safe writes: atomic file replace, whole-line appends, a run-dir lock, output folders that never
replace a run dir, damaged JSON and OS errors (disk full, permissions) as one-line messages."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from jaxgpt.errors import JaxgptError

LOCK_NAME = ".jaxgpt.lock"  # not ".lock": other tools (pytest, for one) use that name
OUTPUT_MARKER = ".jaxgpt-output"  # names the command that created an output folder, so it may replace it
_WALK_LIMIT = 100_000  # entries examined before --force gives up looking for run dirs inside a folder


# ---- atomic writes ---------------------------------------------------------------------------------

def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one line with a single write, so a reader never sees two records run together."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):  # a short write means the disk filled up mid-line
            raise OSError(errno.ENOSPC, "short write (disk full?)", str(path))
    finally:
        os.close(fd)


def read_json(path: str | Path, fix: str = "restore it from a backup or start a new run dir") -> Any:
    """json.loads of a file, with an empty or cut-off file as a one-line error naming it."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        what = "empty" if not text.strip() else f"cut off or not JSON ({e.msg} at line {e.lineno})"
        raise JaxgptError(f"'{path}' is damaged ({what}); {fix}") from None


# ---- run dirs and the lock -------------------------------------------------------------------------

def is_run_dir(path: str | Path) -> bool:
    """A jaxgpt run dir: config.json next to checkpoints/, tokenizer/, metrics.jsonl or a lock file."""
    p = Path(path)
    if (p / LOCK_NAME).is_file():
        return True
    return (p / "config.json").is_file() and any(
        (p / name).exists() for name in ("checkpoints", "tokenizer", "metrics.jsonl"))


def enclosing_run_dir(path: str | Path) -> Path | None:
    """The run dir that is `path` or one of its parents, if any."""
    p = Path(path).resolve()
    for candidate in (p, *p.parents):
        if is_run_dir(candidate):
            return candidate
    return None


def run_dir_inside(folder: str | Path) -> Path | None:
    """A run dir somewhere below `folder` (symlinks not followed), if any."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        if is_run_dir(dirpath):
            return Path(dirpath)
        seen += len(dirnames) + len(filenames)
        if seen > _WALK_LIMIT:
            raise JaxgptError(f"'{folder}' holds over {_WALK_LIMIT} files, too many to check for run dirs; "
                              "choose a new, empty output folder")
    return None


class RunDirLock:
    """An exclusive lock on a run dir (RUN_DIR/.lock holds the PID); released when the process dies."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "RunDirLock":
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise JaxgptError(f"run dir '{self.path.parent}' is in use by process {holder} (lock {self.path}); "
                              "wait for it to finish or stop it, then run again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing releases the flock
            self.fd = None
            if self.created and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
                shutil.rmtree(self.path.parent)  # a start that failed before writing anything leaves no run dir


# ---- output folders --------------------------------------------------------------------------------

def check_output_folder(out: str | Path, kind: str, force: bool = False, flag: str = "--out") -> None:
    """Refuse to write `out` where that could destroy something: see `output_folder`."""
    out = Path(out)
    resolved = out.resolve()
    run_dir = enclosing_run_dir(resolved)
    if run_dir is not None:
        where = "is the run dir" if run_dir == resolved else f"is inside the run dir '{run_dir}'"
        raise JaxgptError(f"{flag} '{out}' {where}; jaxgpt never writes into a run dir it was not asked to "
                          "change: choose a folder outside it")
    if resolved == Path(resolved.anchor) or resolved in (Path.cwd().resolve(), *Path.cwd().resolve().parents) \
            or resolved == Path.home().resolve():
        raise JaxgptError(f"{flag} '{out}' is the filesystem root, your home or a parent of the current folder; "
                          "choose a new folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise JaxgptError(f"{flag} '{out}' exists and is not a folder; choose a new folder")
    if not any(out.iterdir()):
        return
    marker = out / OUTPUT_MARKER
    if marker.is_file() and marker.read_text().strip() == kind:
        return  # our own earlier output: replacing it is what the user asked for
    if not force:
        raise JaxgptError(f"{flag} '{out}' exists, is not empty and was not written by `jaxgpt {kind}`; "
                          "choose a new folder or pass --force to replace it")
    inner = run_dir_inside(out)
    if inner is not None:
        raise JaxgptError(f"{flag} '{out}' holds the run dir '{inner}'; --force never removes a run dir: "
                          "choose another folder")


@contextmanager
def output_folder(out: str | Path, kind: str, force: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a temp folder to fill; on success it replaces `out` in one rename. `out` may be new, empty,
    an earlier output of the same `kind`, or (with force) any folder that holds no run dir."""
    out = Path(out)
    check_output_folder(out, kind, force, flag)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.absolute().parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(kind + "\n")
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.absolute().parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- OS errors as one line -------------------------------------------------------------------------

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")
_DENIED_TEXT = ("Permission denied", "Read-only file system", "Operation not permitted")


def os_error_message(exc: BaseException) -> str | None:
    """One line for a disk-full or permission error anywhere in `exc`'s chain; None for other errors."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL + _DENIED:
            return _message(e.errno in _FULL, e.filename or e.filename2, e.strerror)
        text = str(e)
        for phrases, full in ((_FULL_TEXT, True), (_DENIED_TEXT, False)):
            hit = next((p for p in phrases if p in text), None)
            if hit:  # tensorstore (Orbax) reports OS errors as text
                return _message(full, _quoted_path(text), hit)
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


def _quoted_path(text: str) -> str | None:
    for quote in ('"', "'"):
        parts = text.split(quote)
        paths = [p for p in parts[1::2] if p.startswith("/")]
        if paths:
            return paths[0]
    return None


def _message(full: bool, path: str | None, reason: str) -> str:
    where = f"writing '{path}'" if path else "writing files"
    if full:
        return (f"disk full {where} ({reason}); free space (or raise the quota) and run the same command again: "
                "the run dir stays resumable")
    return (f"permission denied {where} ({reason}); make it writable (chmod/chown, or remount read-write) or "
            "choose another folder, then run the same command again")
