"""File helpers shared by the stages: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | Path):
    """Yield a temporary path beside ``path``; rename it into place only on success.

    A crash leaves at most a ``*.partial`` file, never a truncated file under
    the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_path(path: str | Path) -> None:
    """Put a file's bytes on disk (before a rename gives it its final name)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_directory(directory: str | Path) -> None:
    """Put the renames in ``directory`` on disk."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def write_digest(path: str | Path, digest_path: str | Path) -> str:
    """Write ``path``'s sha256 to ``digest_path`` in ``sha256sum``'s format (``sha256sum -c`` checks it
    from the folder); return the digest. The workflow compares a large file's content by it (Snakemake
    checksums only files up to 1 MB and compares the rest by modification time)."""
    digest = sha256_file(path)
    write_text(digest_path, f"{digest}  {Path(path).name}\n")
    return digest


def read_digest(digest_path: str | Path) -> str:
    """The sha256 that ``write_digest`` wrote."""
    return Path(digest_path).read_text().split()[0]


def write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) written whole or not at all."""
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(path: str | Path, value, **dumps) -> None:
    """``value`` as JSON (``json.dumps(value, **dumps)`` and a newline), written whole or not at all."""
    write_text(path, json.dumps(value, **dumps) + "\n")
