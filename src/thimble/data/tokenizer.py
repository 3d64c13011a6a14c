"""Tokenizer stage: a byte-level BPE trained with the ``tokenizers`` library, and corpus encoding."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from thimble.data.digests import verify_digest
from thimble.errors import DataError
from thimble.util.files import atomic_output, write_json

log = logging.getLogger(__name__)


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE of exactly ``vocab_size`` tokens (if the texts allow)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text``, encoded whole as the seed notebook did."""
    return np.asarray(tokenizer.encode(text).ids, dtype=np.int32)


def token_texts(path: str | Path, vocab_size: int) -> list[str]:
    """The text of every token id 0..vocab_size-1 as the tokenizer at ``path`` decodes it alone (byte-level
    BPE marks a leading space as 'Ġ'; decoded, it is a space). A vocabulary of another size is a DataError:
    the tokenizer is not the one the ids come from."""
    tokenizer = Tokenizer.from_file(str(path))
    if tokenizer.get_vocab_size() != vocab_size:
        raise DataError(f"{path} has {tokenizer.get_vocab_size()} tokens, the recording {vocab_size}: it is not "
                        "the tokenizer the run was trained with; rebuild the dataset's data stages")
    return [tokenizer.decode([token]) for token in range(vocab_size)]


def read_text(path: str | Path) -> str:
    with open(path, encoding="utf-8", newline="") as handle:
        return handle.read()


def train_bpe_on_text(text: str, vocab_size: int) -> Tokenizer:
    # lines, as Tokenizer.train(files) would read them; the trainer works on them in parallel
    return train_bpe(text.splitlines(keepends=True), vocab_size)


def too_few_tokens(where: str, supported: int, vocab_size: int) -> str:
    """The message for a vocab_size larger than the texts support: BPE stops merging when no pair is left,
    so ``supported`` (what training for ``vocab_size`` reached) is the largest that fits."""
    return (f"{where}: the tokenizer texts only support {supported} BPE tokens, fewer than vocab_size {vocab_size}; "
            f"lower the dataset's vocab_size (to {supported} at most) or add tokenizer texts")


#: part of the vocab check's cache key: change it with ``train_bpe``'s settings
BPE_FORMAT = 1


def supported_vocab_size(text: str, vocab_size: int, cache_dir: Path) -> int:
    """min(vocab_size, the most BPE tokens ``text`` supports), remembered in ``cache_dir`` by the text's hash:
    checking a config trains the tokenizer once, not at every `snakemake -n` (an unwritable cache only
    costs the training again)."""
    import tokenizers

    key_text = f"{BPE_FORMAT}\0{tokenizers.__version__}\0{vocab_size}\0{text}"
    cached = cache_dir / f"vocab-{hashlib.sha256(key_text.encode()).hexdigest()[:20]}.json"
    try:
        return int(json.loads(cached.read_text())["supported"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    supported = train_bpe_on_text(text, vocab_size).get_vocab_size()
    try:
        write_json(cached, {"vocab_size": vocab_size, "supported": supported})
    except OSError as error:
        log.warning("could not cache the vocab_size check in %s (%s)", cache_dir, error)
    return supported


def built_vocab_size(path: Path) -> int | None:
    """The vocabulary size of a saved tokenizer.json, or None when it cannot be read."""
    try:
        return Tokenizer.from_file(str(path)).get_vocab_size()
    except Exception:  # tokenizers raises its own exception type for a damaged file
        return None


def write_tokenizer(tokenizer_texts: str, vocab_size: int, output: str) -> None:
    verify_digest(tokenizer_texts, "corpus")
    tokenizer = train_bpe_on_text(read_text(tokenizer_texts), vocab_size)
    got = tokenizer.get_vocab_size()
    if got != vocab_size:
        raise DataError(too_few_tokens(tokenizer_texts, got, vocab_size))
    with atomic_output(output) as tmp:
        tokenizer.save(str(tmp))
    log.info("trained BPE tokenizer: %d tokens -> %s", got, output)


def load_token_ids(path: str | Path, vocab_size: int) -> np.ndarray:
    """The token ids of ``tokens.npy``: a 1-D integer array of ids in [0, vocab_size), or a DataError
    naming the file and the fix; one that no longer matches the sha256 the encode stage wrote beside it is
    refused (``thimble.data.digests``)."""
    fix = "rebuild it with `thimble encode` (snakemake reruns it when you delete it)"
    verify_digest(path, "encode")
    try:
        ids = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; {fix}") from None
    except ValueError as error:  # a pickled object array, or not an .npy file at all
        raise DataError(f"{path} is not a plain .npy array of token ids ({error}); {fix}") from None
    except (OSError, EOFError) as error:
        raise DataError(f"{path} cannot be read ({error}); {fix}") from None
    if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise DataError(f"{path} holds {getattr(ids, 'dtype', type(ids).__name__)} of shape "
                        f"{getattr(ids, 'shape', '?')}, not a 1-D array of integer token ids; {fix}")
    if ids.size:
        outside = np.flatnonzero((ids < 0) | (ids >= vocab_size))
        if outside.size:
            raise DataError(f"{path}: {outside.size} token ids lie outside the vocabulary [0, {vocab_size}) (the "
                            f"first, at position {outside[0]}, is {ids[outside[0]]}); was it encoded with another "
                            f"tokenizer or vocab_size? {fix}")
    return ids


def write_encoded(tokenizer_path: str, model_corpus: str, output: str, digest: str | None = None) -> None:
    """Encode the model corpus into ``output`` (and its sha256 into ``digest``, by which the workflow
    compares the file's content rather than its modification time)."""
    from thimble.util.files import write_digest

    verify_digest(model_corpus, "corpus")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    ids = encode(tokenizer, read_text(model_corpus))
    with atomic_output(output) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, ids)
    if digest is not None:
        write_digest(output, digest)
    log.info("encoded model corpus: %d tokens -> %s", ids.size, output)
