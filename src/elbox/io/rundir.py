"""Run directories as elbox's own: created or reused only when safe, locked while a process writes them.

A new run goes into a directory that does not exist, is empty, or holds a run that never saved a checkpoint (a
config.json and nothing trained: a run killed in its first epoch before any checkpoint, or a mixture fit killed
part-way, restarts there). A directory of other files is refused, so elbox never writes over, or deletes, a file
it did not create.

While `elbox train` or `--resume` runs, it holds an exclusive lock (flock) on the directory itself, so a second
writer of the same directory stops with a clear message instead of mixing one run's config with the other's
weights. The lock is released when the process ends, however it ends; it leaves no file behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path

from elbox.core.errors import ElboxError
from elbox.io.checkpoint import (
    BEST_WEIGHTS_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    STATE_FILE,
    STATE_IN_EPOCH_FILE,
    WEIGHTS_FILE,
)

TRAINED_FILES = (WEIGHTS_FILE, BEST_WEIGHTS_FILE, STATE_FILE, STATE_IN_EPOCH_FILE)
TRAINING_FILES = (CONFIG_FILE, *TRAINED_FILES, METRICS_FILE, "samples.png")
# elbox.io.atomic's temporary files: ".NAME." + tempfile's 8 random characters + ".tmp"
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def check_new_run_directory(out: Path) -> None:
    """ElboxError unless `out` (an existing directory) may take a new run."""
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if CONFIG_FILE not in entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ElboxError(
            f"--out {out} is not empty ({shown}) and is not an elbox run; elbox writes a new run only "
            "into a new or empty directory"
        )
    if any(name in entries for name in TRAINED_FILES):
        raise ElboxError(
            f"{out} already holds a run ({CONFIG_FILE} and its weights); choose another output "
            f"directory, or continue it with elbox train --resume {out} (elbox.resume in Python)"
        )
    others = [name for name in entries if name not in TRAINING_FILES and not _TEMPORARY.fullmatch(name)]
    if others:
        raise ElboxError(
            f"{out} holds a run that saved no checkpoint and files elbox did not write "
            f"({', '.join(others[:3])}); choose another output directory"
        )


@contextlib.contextmanager
def run_directory(out: Path, new: bool, lock: bool = True) -> Iterator[Path]:
    """`out` locked for this process (lock=False: under torchrun, for the processes other than the first, which
    write nothing). new: create it (with its parents) and check that it may take a new run; an error inside the
    block before the run saved a checkpoint removes what the run wrote and the directories this call created.
    Otherwise `out` must exist."""
    if not lock:
        yield out
        return
    created = [path for path in (out, *out.parents) if not path.exists()][::-1] if new else []
    try:
        for path in created:
            path.mkdir()
    except OSError as e:
        raise ElboxError(f"cannot create the run directory {out}: {e.strerror}") from None
    if not out.is_dir():
        raise ElboxError(
            f"{'--out' if new else 'run directory'} {out} "
            + ("is not a directory" if out.exists() else "does not exist")
        )
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            lock_directory(fd, out)
            if new:
                check_new_run_directory(out)
        except BaseException:  # another process's run, or files that are not ours: touch nothing in it
            if new:
                remove_created_directories(created)
            raise
        try:
            yield out
        except BaseException:
            if new:
                remove_unfinished_run(out, created)
            raise
    finally:
        os.close(fd)  # releases the lock


def remove_unfinished_run(out: Path, created: list[Path]) -> None:
    """After a new run failed: if it saved no checkpoint, remove what it wrote (its config.json, metrics), and the
    directories `created` for it that are then empty. A run with a checkpoint is left whole, for --resume."""
    with contextlib.suppress(OSError):
        if any((out / name).exists() for name in TRAINED_FILES):
            return
        for path in out.iterdir():
            if (
                (path.name in TRAINING_FILES or _TEMPORARY.fullmatch(path.name))
                and path.is_file()
                and not path.is_symlink()
            ):
                path.unlink()
    remove_created_directories(created)


def remove_created_directories(created: list[Path]) -> None:
    """Remove the directories `created` for a run, deepest first, where they are empty."""
    with contextlib.suppress(OSError):
        for path in reversed(created):
            path.rmdir()  # only if empty


def lock_directory(fd: int, out: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ElboxError(
                f"run directory {out} is in use by another elbox process (training or resuming it); "
                "wait for it to finish, or choose another directory"
            ) from None
        raise ElboxError(f"cannot lock the run directory {out}: {e.strerror}") from None


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporary files of training writes that a crash interrupted, and nothing else: elbox.io.atomic
    names them .NAME.XXXXXXXX.tmp, and only those of the files training writes are removed."""
    for path in run_dir.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if match and match["name"] in TRAINING_FILES and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
