"""Files on disk: atomic writes, sha256 of a file, and writing the CelebA `list_attr` layout.

Every write goes to a temp file in the destination's folder, is fsynced and then renamed
over the destination, so a reader, a CI gate or a resumed run sees either the old file or
the whole new one, and a failed write (a full disk, Ctrl-C) leaves no temp file behind.
The `list_attr` reader is `sia_cli.data.read_attributes`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

CHUNK = 1 << 20

# mkstemp creates 0600 files; ours should get the permissions any other new file would.
_UMASK = os.umask(0)
os.umask(_UMASK)
_NEW_FILE_MODE = 0o666 & ~_UMASK


# ---------------------------------------------------------------- atomic writes

def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, hence best effort.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces `path` when the block ends without an exception.

    On any exception the temp file is removed and `path` is left as it was; an OSError that
    names no file (or the temp file) is raised again naming `path`, the file the user knows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _NEW_FILE_MODE)
        os.replace(tmp_name, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError) and exc.filename in (None, tmp_name):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    _fsync_directory(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    with atomic_output(path) as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`write_bytes_atomic` of `text` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def json_ready(value: Any) -> Any:
    """Plain JSON types; NaN/inf become null because strict JSON readers (jq, browsers) reject them."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        return json_ready(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Atomic, indented, strict JSON (non-finite floats written as null, numpy values as plain numbers)."""
    text = json.dumps(json_ready(data), indent=2, allow_nan=False)
    write_text_atomic(path, text + "\n")


# ---------------------------------------------------------------- checksums

def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- CelebA list_attr

def format_list_attr(attributes: Sequence[str], files: Sequence[str], rows: Sequence[Sequence[int]]) -> str:
    """CelebA `list_attr` text: the image count, the attribute names, then `file v1 v2 ...`
    with each value (1 or -1) right-aligned in two characters."""
    lines = [str(len(files)), " ".join(attributes)]
    lines += [name + " " + " ".join(f"{v:2d}" for v in row) for name, row in zip(files, rows)]
    return "\n".join(lines) + "\n"
