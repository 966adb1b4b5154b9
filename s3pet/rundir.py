"""The run directory of a stage: checked before work starts, created, locked, cleaned on failure.

Every stage (search, retrain, baseline, transfer, the main job) goes through here, so one
module decides what a run folder may be:

1. ``check`` (nothing is created): ``--out`` is not a file, its parent can be written, it holds
   no finished run (``metrics.json``; ``summary.json`` for the main job) unless ``overwrite``
   or ``resume``, and no live process holds its lock. Stages call it first, then validate
   model, space, task and data, and only then open the folder.
2. ``RunDir`` (a context manager): creates the folder, takes the lock (a second process gets a
   one-line error naming the holder's pid), removes the files of an older run (unless
   resuming), and on an error inside removes exactly what this run made: the folder if it
   created it, else the run files it wrote. A resumed run keeps its files on error (its
   checkpoint is what the user resumes from); a kill or Ctrl-C keeps them too (no
   ``metrics.json`` is written before the end, so nothing looks finished).

The lock is an ``fcntl`` lock on ``.s3pet.lock`` inside the folder: the kernel drops it when
its holder dies, so a stale lock of a killed process is taken over without a word.

While the run holds the folder, ``log.txt`` in it receives the lines of the console's log (the
root logger's records, in the console's format), and the periodic progress lines also when the
console draws a bar (``s3pet.progress``). A stage inside the main job writes its own
``log.txt``; the main job's holds every stage's lines.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import sys
from pathlib import Path

from s3pet import dist
from s3pet.configs.search import SELECTS
from s3pet.errors import ConfigError
from s3pet.io import create_readable

log = logging.getLogger(__name__)

LOCK = ".s3pet.lock"
LOG = "log.txt"
RUN_LOG = "s3pet.runlog"  # the logger of lines only run logs receive (progress beside a bar)
# Files a stage writes into its folder; a new (not resumed) run removes an older run's copies,
# so a new config.json never stands beside old weights.
RUN_FILES = ("config.json", "history.jsonl", "metrics.json", "structure.json", "alphas.csv", "search.pt",
             "delta.safetensors", "summary.json", "train.pt", LOG) + tuple(f"structure-{r}.json" for r in SELECTS)
RUN_DIRS = ("tb",)  # folders of run files (TensorBoard events), removed as the files are


def holder(out: Path) -> int | None:
    """The pid of the live process holding ``out``'s lock, or None when it is free."""
    lock = out / LOCK
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a stale lock or staging folder has none)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _busy(out: Path, pid: int) -> ConfigError:
    who = f"pid {pid}" if pid > 0 else "another process"
    return ConfigError(f"--out {out} is in use by another s3pet run ({who}); wait for it to end or choose "
                       f"another --out")


def check(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
          finished: str = "metrics.json") -> Path:
    """Check that a stage may write into ``out``; creates nothing. Returns ``out`` as a Path.

    Raises ConfigError: ``out`` is a file (or below one), cannot be created or written, holds a
    finished run (``finished`` present) and neither ``overwrite`` nor ``resume`` is set, or is
    locked by a live process.
    """
    out = Path(out)
    if not dist.is_main():  # rank 0 checks and owns the folder; the others would see its lock
        return out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; choose another --out")
    parent = out
    while not parent.exists():  # the nearest existing ancestor decides whether out can be made
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, so the folder cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {parent} is not writable; choose another --out")
    if out.is_dir():
        if (out / finished).exists() and not (overwrite or resume):
            raise ConfigError(f"--out {out} holds a finished run ({finished}); pass --overwrite to replace it "
                              f"or choose another --out")
        pid = holder(out)
        if pid is not None:
            raise _busy(out, pid)
    return out


class RunDir:
    """Context manager owning a stage's folder for the duration of the run (see the module doc)."""

    def __init__(self, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                 finished: str = "metrics.json"):
        self.path = Path(out)
        self.resume, self.overwrite, self.finished = resume, overwrite, finished
        self._created: Path | None = None  # the topmost folder this run created
        self._fd: int | None = None
        self._log: logging.Handler | None = None
        self._log_size = 0  # log.txt's size before a resumed run appended to it

    def __enter__(self) -> "RunDir":
        check(self.path, resume=self.resume, overwrite=self.overwrite, finished=self.finished)
        if not dist.is_main():  # only rank 0 writes (io.py); the other ranks share its folder
            return self
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {self.path}: cannot create the folder ({e.strerror})") from e
        self._created = missing[-1] if missing else None
        try:
            self._lock()
            for tmp in self.path.glob(".*.tmp"):  # half-written files of a killed run (we hold the lock)
                tmp.unlink(missing_ok=True)
            if not self.resume:
                _remove_run_files(self.path)  # an older, unfinished (or overwritten) run's
            log_file = self.path / LOG
            self._log_size = log_file.stat().st_size if log_file.is_file() else 0
            self._log = _attach_log(log_file)
        except BaseException:
            self._release()
            self._remove_created()
            raise
        return self

    def _lock(self) -> None:
        lock = self.path / LOCK
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                pid = _read_pid(fd)
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise _busy(self.path, pid or -1) from None
                raise ConfigError(f"--out {self.path}: cannot lock the folder ({e.strerror})") from e
            # The holder may have removed the file between our open and flock: then we locked
            # an unlinked file and must retry on the new one.
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return
            os.close(fd)

    def _release(self) -> None:
        if self._fd is None:
            return
        (self.path / LOCK).unlink(missing_ok=True)  # unlink first: nobody may lock a file we still hold
        os.close(self._fd)
        self._fd = None

    def _remove_created(self) -> None:
        if self._created is not None and self._created.exists():
            shutil.rmtree(self._created, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc is not None and isinstance(exc, Exception) and dist.is_main():
                # A failed run leaves nothing that could pass for a result (Ctrl-C and kills keep
                # files: no metrics.json means unfinished, and a search resumes from search.pt).
                self._detach_log()
                if self._created is not None:
                    self._remove_created()
                elif not self.resume:
                    _remove_run_files(self.path)
                else:  # a failed resume leaves the folder as it was, its log included
                    with open(self.path / LOG, "r+b") as f:
                        f.truncate(self._log_size)
                log.debug("removed the files of the failed run in %s", self.path)
        finally:
            self._detach_log()
            self._release()
        return False

    def _detach_log(self) -> None:
        if self._log is not None:
            for name in (None, RUN_LOG):
                logging.getLogger(name).removeHandler(self._log)
            self._log.close()
            self._log = None


def _remove_run_files(folder: Path) -> None:
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        if (folder / name).is_dir():
            shutil.rmtree(folder / name, ignore_errors=True)


def _attach_log(path: Path) -> logging.Handler:
    """A handler writing the console's log lines to ``path`` (created 0644), on the root logger
    and the run-log-only logger (``RUN_LOG``)."""
    create_readable(path)
    handler = logging.FileHandler(path, encoding="utf-8")
    console = [h for h in logging.getLogger().handlers
               if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.stdout)]
    handler.setFormatter(console[0].formatter if console and console[0].formatter
                         else logging.Formatter("%(message)s"))
    for name in (None, RUN_LOG):
        logging.getLogger(name).addHandler(handler)
    return handler
