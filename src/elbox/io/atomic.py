"""Atomic file writes: a crash at any moment leaves the previous file or the new one, never a partial file.

elbox writes only regular files: a path that exists as anything else (a symbolic link, a device, a FIFO, a
directory) is refused, never replaced or written through. Every OS error of a write is an ElboxError naming the path.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from elbox.core.errors import ElboxError, shown


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
_KINDS = [
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
]


def write_error(path: str | Path, error: OSError) -> ElboxError:
    """The one-line error of a failed write: 'cannot write PATH: <strerror>'."""
    return ElboxError(f"cannot write {shown(path)}: {error.strerror or error}")


def refuse_non_regular(path: str | Path) -> None:
    """ElboxError unless `path` is absent or a regular file (lstat: a symlink is refused, not followed)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:  # ENAMETOOLONG, ENOTDIR, EACCES, ...
        raise write_error(path, e) from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise ElboxError(f"cannot write {shown(path)}: it is {kind}; elbox writes only regular files")


def _temporary(path: Path) -> tuple[int, str]:
    """A new temporary file beside `path`, named .NAME.*.tmp (NAME cut so that a long name still fits)."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=".tmp")


def check_output_file(path: str | Path) -> Path:
    """For an output file the user names, checked before any work: ElboxError unless `path` is absent or a regular
    file, its directory exists, and a file can be created there (a probe file, removed at once)."""
    path = Path(path)
    refuse_non_regular(path)
    if not path.parent.is_dir():
        problem = "is not a directory" if path.parent.exists() else "does not exist"
        raise ElboxError(f"cannot write {shown(path)}: its directory {shown(path.parent)} {problem}")
    try:
        fd, tmp = _temporary(path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:  # a read-only file system, no permission, no inodes left
        raise ElboxError(
            f"cannot write {shown(path)}: no file can be created in {shown(path.parent)} ({e.strerror or e})"
        ) from None
    return path


# What marks a file as one elbox wrote, by its first bytes and marks within its first or last 64 KiB. Each output
# carries its mark: the image grids a PNG text chunk "Software: elbox", the CSVs their full header (the samples' first
# column is "elbox_sample"), the feature archives and JSON results a "written_by" entry, the reports a generator tag.
PNG_SOFTWARE = "elbox"
WRITTEN_BY = "elbox"  # the value of the written_by entry
SCORES_HEADER = ("index", "name", "log_likelihood_nats", "log_likelihood_stderr_nats", "bits_per_dim", "estimate")
SAMPLES_FIRST_COLUMN = "elbox_sample"
_OWN_MARKS = {  # suffix: the marks of each kind of file elbox writes with it
    ".png": [(b"\x89PNG\r\n\x1a\n", b"Software\x00" + PNG_SOFTWARE.encode())],
    ".csv": [(",".join(SCORES_HEADER).encode(),), (SAMPLES_FIRST_COLUMN.encode() + b",",)],  # + anomaly columns
    ".npz": [(b"PK", b"written_by.npy")],
    ".json": [(b"{", f'"written_by": "{WRITTEN_BY}'.encode())],
    ".html": [(b"<!doctype html>", f"<meta name='generator' content='{WRITTEN_BY}'>".encode())],
    ".md": [(f"<!-- generator: {WRITTEN_BY} -->".encode(),)],
}
# The outputs earlier elbox versions wrote into a run directory without a mark, by name: still elbox's own there
# when they have that output's format (its first bytes, and a key of its content)
_EARLIER_OUTPUTS = [
    (re.compile(r"samples\.png|reconstructions\.png"), (b"\x89PNG\r\n\x1a\n",)),
    (re.compile(r"scores\.csv"), (b"index,name,log_likelihood_nats,",)),
    (re.compile(r"(eval|tighten)-[a-z-]+\.json"), (b"{", b'"model":')),
    (re.compile(r"report\.html"), (b"<!doctype html>",)),
    (re.compile(r"report\.md"), (b"# ",)),
]


def written_by_elbox(path: Path) -> bool:
    """True if the regular file at `path` is one of elbox's outputs (an image grid, scores, features, a JSON result, a
    report), recognized by its content (_OWN_MARKS) or, in a run directory, as an earlier elbox's unmarked output of
    that name and format (_EARLIER_OUTPUTS), so that elbox may replace it."""
    marks = list(_OWN_MARKS.get(path.suffix.lower(), []))
    if (path.parent / "config.json").is_file() and (path.parent / "model.safetensors").is_file():
        marks += [mark for name, mark in _EARLIER_OUTPUTS if name.fullmatch(path.name)]
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            f.seek(max(len(head), os.fstat(f.fileno()).st_size - (1 << 16)))
            tail = f.read(1 << 16)
    except OSError:
        return False
    return any(head.startswith(first) and all(mark in head + tail for mark in rest) for first, *rest in marks)


def check_replaceable(path: str | Path, overwrite: bool = False) -> Path:
    """ElboxError if `path` is a file elbox did not write (written_by_elbox) and `overwrite` is not given: elbox never
    replaces a user's file by mistake. Absent paths pass; so does anything with overwrite (refuse_non_regular still
    guards symbolic links, devices and directories)."""
    path = Path(path)
    refuse_non_regular(path)
    if overwrite or not path.exists() or written_by_elbox(path):
        return path
    raise ElboxError(
        f"{shown(path)} exists and is not an output elbox wrote; elbox will not replace it: choose another "
        "name, or give --overwrite to replace it"
    )


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same directory (created if missing), fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a partial file. ElboxError, with the
    previous file intact and no temporary file left, if `path` is not a regular file or any step fails.
    """
    path = Path(path)
    refuse_non_regular(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temporary(path)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    """fsync a directory so that a rename in it survives a crash (skipped where the file system cannot)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # the file is in place; some file systems cannot sync a directory
    finally:
        os.close(dir_fd)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_jsonl(path: str | Path, records: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
