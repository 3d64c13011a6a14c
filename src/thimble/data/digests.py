"""A data file against the sha256 its stage wrote beside it (``<file>.sha256``, ``sha256sum``'s format).

The corpus stage writes one beside ``tokenizer_texts.txt`` and ``model_corpus.txt``, the encode stage beside
``tokens.npy``. Nothing else writes these files, so one whose bytes no longer match its digest was damaged or
edited by hand: it is refused, never read as a new input. A file without a digest beside it (made outside the
workflow, or before digests were written) is read as it is.
"""

from __future__ import annotations

from pathlib import Path

from thimble.errors import DataError
from thimble.util.files import sha256_file


def digest_of(path: str | Path) -> Path:
    """Where the stage that writes ``path`` puts its sha256."""
    return Path(f"{path}.sha256")


def digest_problem(path: str | Path, stage: str) -> str | None:
    """Why ``path`` cannot be trusted, or None: its bytes differ from the sha256 that ``stage`` wrote beside it
    (None too when either file is missing: a missing file is its reader's error, a missing digest no evidence)."""
    digest = digest_of(path)
    try:
        words = digest.read_text(encoding="utf-8", errors="replace").split()
        actual = sha256_file(path)
    except FileNotFoundError:
        return None
    recorded = words[0] if words else "(nothing)"
    if recorded == actual:
        return None
    return (f"{path} does not match the sha256 that the {stage} stage wrote beside it in {digest} (recorded "
            f"{recorded[:16]}..., the file now has {actual[:16]}...): it was damaged or edited by hand since. It is "
            f"not read as it is: delete {path} and run snakemake again, and the {stage} stage writes it anew")


def verify_digest(path: str | Path, stage: str) -> None:
    """A ``DataError`` when ``path`` does not match its digest (``digest_problem``)."""
    problem = digest_problem(path, stage)
    if problem:
        raise DataError(problem)
