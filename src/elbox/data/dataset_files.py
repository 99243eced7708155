"""Reading the built-in datasets' files.

IDX files (fashion-mnist, mnist): uint8 arrays, plain or gzipped (recognized by the gzip magic bytes;
a file named .gz must be gzipped), checked structurally: header, dtype, dims against the payload size. The
header's dims fix how many bytes are read, so a gzip bomb is refused without being expanded.

CIFAR-10 binary batches (the binary version's .bin files; the Python version is never read, so nothing
is ever unpickled): fixed-size records of one label byte and the image's pixel bytes, checked for whole
records, the expected record count and labels 0-9.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from elbox.core.errors import ElboxError
from elbox.core.options import short_repr
from elbox.core.system import allocatable_bytes, format_bytes
from elbox.data.user_images import one_line

# -- IDX files

_IDX_DTYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
_GZIP_MAGIC = b"\x1f\x8b"
_READ_PIECE = 1 << 20  # bytes read from a stream at a time


def read_bytes(path: Path, kind: str) -> bytes:
    """Whole file contents; `kind` ("CIFAR batch file") names the file in error messages. A file larger than the
    memory this process can allocate (allocatable_bytes) is refused before reading."""
    try:
        size, (room, limit) = path.stat().st_size, allocatable_bytes()
        if size > room:
            raise ElboxError(f"{kind} {path} is {format_bytes(size)}, more than the {format_bytes(room)} of {limit}")
        return path.read_bytes()
    except FileNotFoundError:
        raise ElboxError(f"{kind} not found: {path}") from None
    except OSError as e:
        raise ElboxError(f"cannot read {kind} {path}: {e.strerror or e}") from None


def _read_at_most(stream: BinaryIO, n: int) -> bytes:
    """Up to n bytes of `stream`, read in pieces: no more memory is taken than the bytes that arrive."""
    pieces = []
    while n > 0 and (piece := stream.read(min(n, _READ_PIECE))):
        pieces.append(piece)
        n -= len(piece)
    return b"".join(pieces)


def read_file_bytes(path: Path) -> bytes:
    """An IDX file's header and payload, decompressed if gzipped. The header's dims fix the payload's size, and
    at most one byte more is read: a file holding more (a gzip bomb) is refused without being expanded."""
    try:
        with open(path, "rb") as raw:
            is_gzip = raw.read(2) == _GZIP_MAGIC
            size = None if is_gzip else os.fstat(raw.fileno()).st_size
            if size == 0:
                raise ElboxError(f"IDX file {path} is empty")
            if path.name.endswith(".gz") and not is_gzip:
                raise ElboxError(f"IDX file {path} is named .gz but is not a gzip file")
            raw.seek(0)
            if not is_gzip:
                return _read_idx_stream(raw, path, size)
            try:
                return _read_idx_stream(gzip.GzipFile(fileobj=raw), path, None)
            except (OSError, EOFError, zlib.error) as e:
                raise ElboxError(f"IDX file {path} is a corrupt gzip stream ({one_line(e)})") from None
    except FileNotFoundError:
        raise ElboxError(f"IDX file not found: {path}") from None
    except OSError as e:
        raise ElboxError(f"cannot read IDX file {path}: {e.strerror or e}") from None


def _read_idx_stream(stream: BinaryIO, path: Path, size: int | None) -> bytes:
    """Header and payload from an IDX stream; `size` is the file's size for a plain file, None for a gzip stream."""
    header = _read_at_most(stream, 4)
    if not header:
        raise ElboxError(f"IDX file {path} is empty (after decompression)")
    if len(header) == 4:
        header += _read_at_most(stream, 4 * header[3])
    dims = _idx_dims(header, path)
    expected = math.prod(dims)
    if size is not None and size != len(header) + expected:  # a plain file: its size is known before reading
        _check_payload_size(size - len(header), expected, dims, path)
    room, limit = allocatable_bytes()
    if expected > room:
        raise ElboxError(
            f"IDX file {path} declares dims {short_repr(dims)}, {format_bytes(expected)} of data, "
            f"more than the {format_bytes(room)} of {limit}"
        )
    payload = _read_at_most(stream, expected + 1)
    if len(payload) > expected:
        raise ElboxError(
            f"IDX file {path} holds more than the {expected} bytes of data its dims {short_repr(dims)} "
            "declare (read after decompression); refused as corrupt or a decompression bomb"
        )
    _check_payload_size(len(payload), expected, dims, path)
    return header + payload


def _idx_dims(data: bytes, path: Path) -> tuple[int, ...]:
    """The dims an IDX header (the start of `data`) declares, after checking its magic number and dtype."""
    if len(data) < 4:
        raise ElboxError(f"IDX file {path} is truncated: {len(data)} bytes, too short for a header")
    if data[:2] != b"\x00\x00":
        raise ElboxError(f"IDX file {path} has a bad magic number {data[:4].hex()} (expected 0000 then type and ndim)")
    code, ndim = data[2], data[3]
    if code != 0x08:
        kind = _IDX_DTYPES.get(code, "unknown")
        raise ElboxError(
            f"IDX file {path} has unsupported dtype code 0x{code:02x} ({kind}); only 0x08 (uint8) is supported"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ElboxError(
            f"IDX file {path} is truncated: header needs {header_len} bytes for {ndim} dims, file has {len(data)}"
        )
    return tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))


def _check_payload_size(found: int, expected: int, dims: tuple[int, ...], path: Path) -> None:
    if found < expected:
        raise ElboxError(
            f"IDX file {path} is truncated: dims {short_repr(dims)} need {expected} data bytes, found {found}"
        )
    if found > expected:
        raise ElboxError(
            f"IDX file {path} has {found - expected} trailing bytes after the data for dims {short_repr(dims)}"
        )


def parse_idx(data: bytes, path: Path) -> np.ndarray:
    """Parse IDX bytes (header + payload) into a read-only array."""
    dims = _idx_dims(data, path)
    header_len = 4 + 4 * len(dims)
    _check_payload_size(len(data) - header_len, math.prod(dims), dims, path)
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a uint8 IDX file (plain or gzipped) into a read-only numpy array."""
    path = Path(path)
    return parse_idx(read_file_bytes(path), path)


# -- CIFAR-10 binary batch files

CIFAR_CLASSES = 10


def parse_cifar_batch(data: bytes, path: Path, image_shape: tuple[int, ...], expected_records: int) -> np.ndarray:
    """Check a CIFAR binary batch; return its records as a read-only uint8 array [N, 1 + C*H*W].

    Each record is one label byte (0-9) and then the image channel by channel (for CIFAR-10:
    1024 red, 1024 green, 1024 blue bytes), each channel a row-major 32x32 plane.
    """
    record = 1 + math.prod(image_shape)
    if not data:
        raise ElboxError(f"CIFAR batch file {path} is empty")
    if len(data) % record:
        raise ElboxError(
            f"CIFAR batch file {path} is truncated or corrupt: {len(data)} bytes is not a whole number of "
            f"{record}-byte records (1 label byte + {record - 1} pixel bytes)"
        )
    n = len(data) // record
    if n != expected_records:
        raise ElboxError(f"CIFAR batch file {path} holds {n} records, expected {expected_records}")
    records = np.frombuffer(data, dtype=np.uint8).reshape(n, record)
    bad = np.flatnonzero(records[:, 0] >= CIFAR_CLASSES)
    if bad.size:
        i = int(bad[0])
        raise ElboxError(
            f"CIFAR batch file {path} is corrupt: record {i} has label byte {records[i, 0]}, "
            f"expected 0-{CIFAR_CLASSES - 1}"
        )
    return records
