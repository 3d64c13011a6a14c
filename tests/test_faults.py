"""Faults injected into a tiny run: each one is a one-line error naming the file, or a recovery
bitwise identical to a clean run. Nothing here may exit 0 with wrong numbers.

The tiny run uses a local corpus written by the test (no download): data stages, training,
rechunk, ΔW′, replay, freeze tables and figures, through snakemake once per module.
"""

import errno
import json
import os
import re
import shutil

import h5py
import hdf5plugin  # noqa: F401  (the zstd filter)
import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, lock_held, run_snakemake
from thimble import cli
from thimble.config import load_config
from thimble.errors import DataError
from thimble.record.format import TENSORS
from thimble.record.reader import read_steps
from thimble.record.stream_reader import open_stream
from thimble.training.checkpoint import CHECKPOINT, CHECKPOINT_SHA256, PREVIOUS_CHECKPOINT
from thimble.training.train import train
from thimble.update_rules import STATE_KEYS

EXPERIMENT = "tiny"
TINY = {"model": {"hidden_dim": 8, "n_layers": 1, "n_heads": 2, "max_seq_len": 8},
        "training": {"steps": 40, "batch_size": 4, "device": "cpu"},
        # the faults are injected into the stream too: keep it (the default deletes it after rechunk)
        "record": {"segment_steps": 10}, "rechunk": {"steps_per_chunk": 16, "keep_stream": True},
        "analysis": {"trend_window_steps": 5}}


def write_texts(folder):
    """A few kB of deterministic pseudo-English: enough for a 300-token BPE."""
    rng = np.random.default_rng(7)
    letters = np.array(list("etaoinshrdlucmfwyp"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(150)]
    folder.mkdir(parents=True)
    for name in ("one.txt", "two.txt"):
        picks = rng.zipf(1.4, size=2500) % len(words)
        (folder / name).write_text(" ".join(words[i] for i in picks) + "\n", encoding="utf-8")


def tiny_config(**experiment):
    return {"datasets": {"toy": {"source": {"local": "texts"}, "tokenizer_texts": ["*.txt"],
                                 "model_texts": ["one.txt"], "vocab_size": 300}},
            "experiments": {EXPERIMENT: {"dataset": "toy", "description": "fault suite", **TINY, **experiment}}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run: every stage's output, built through snakemake."""
    root = tmp_path_factory.mktemp("faults")
    write_texts(root / "texts")
    (root / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    run_snakemake(root, "--cores", "2", f"results/{EXPERIMENT}/figures/loss.png")
    return root


def settings(root):
    return load_config(root / "config.yaml")["experiments"][EXPERIMENT]


def thimble(capsys, *args):
    """Run a thimble command in this process: (exit status, its stderr)."""
    capsys.readouterr()
    status = cli.main([str(arg) for arg in args])
    return status, capsys.readouterr().err


def error_line(err: str, command: str) -> str:
    """The command's one-line error; there must be exactly one, and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"thimble {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def stream_bits(directory):
    with open_stream(directory) as stream:
        return {name: read_steps(stream[name]).view(np.uint16).copy() for name in TENSORS} | \
            {"losses": stream["losses"][...]}


def assert_same_stream(a, b):
    first, second = stream_bits(a), stream_bits(b)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def flip_chunk_bytes(path, dataset, chunk=0, at=None, count=8):
    """XOR ``count`` stored bytes of one chunk (default: in its middle) with 0xFF, outside HDF5."""
    with h5py.File(path, "r") as handle:
        info = handle[dataset].id.get_chunk_info(chunk)
    offset = info.byte_offset + (info.size // 2 if at is None else at)
    with open(path, "r+b") as raw:
        raw.seek(offset)
        original = raw.read(count)
        raw.seek(offset)
        raw.write(bytes(byte ^ 0xFF for byte in original))
    return info


# -- 1. a missing or truncated stream segment -----------------------------------------------------

def rechunk_args(root, stream, output):
    text = json.dumps(settings(root))
    return ["rechunk", "--settings", text, "--stream", stream, "--output", output, "--threads", "2"]


def test_a_missing_segment_is_an_error_at_every_stage(run, tmp_path, capsys):
    stream = tmp_path / "stream"
    shutil.copytree(run / f"results/{EXPERIMENT}/stream", stream)
    (stream / "segment_000010-000019.h5").unlink()
    with pytest.raises(DataError, match=r"segment_000010-000019\.h5.*steps 10\.\.19.*missing"):
        open_stream(stream)
    status, err = thimble(capsys, *rechunk_args(run, stream, tmp_path / "recording.h5"))
    line = error_line(err, "rechunk")
    assert status == 1 and "segment_000010-000019.h5" in line and "steps 10..19" in line
    assert "W: verified" not in err and not (tmp_path / "recording.h5").exists()
    status, err = thimble(capsys, "replay", "--recording", stream, "--table", tmp_path / "r.csv", "--summary",
                          tmp_path / "r.json", "--ratio-table", tmp_path / "ratio.csv")
    assert status == 1 and "segment_000010-000019.h5" in error_line(err, "replay")


def test_the_rechunk_reads_no_step_twice_and_none_from_a_missing_segment(run, tmp_path):
    from thimble.record.stream_reader import read_stream_rows
    from thimble.util.workers import WorkerPool

    stream = tmp_path / "stream"
    shutil.copytree(run / f"results/{EXPERIMENT}/stream", stream)
    (stream / "segment_000020-000029.h5").unlink()
    out = np.zeros((16, 300, 8), np.uint16)
    with WorkerPool(2) as pool, pytest.raises(DataError, match=r"no segment file holds steps 20\.\.29"):
        read_stream_rows(stream, "W", 16, 32, out, pool)


def test_a_truncated_segment_is_an_error_naming_it(run, tmp_path, capsys):
    stream = tmp_path / "stream"
    shutil.copytree(run / f"results/{EXPERIMENT}/stream", stream)
    segment = stream / "segment_000030-000039.h5"
    os.truncate(segment, segment.stat().st_size // 2)
    status, err = thimble(capsys, *rechunk_args(run, stream, tmp_path / "recording.h5"))
    assert status == 1 and "segment_000030-000039.h5" in error_line(err, "rechunk")


# -- 2. flipped bytes in a stored chunk of each file kind -----------------------------------------

W_PATH = f"params/transformer.wte.weight/{STATE_KEYS['W']}"


def test_flipped_bytes_in_a_stream_segment_are_an_error_naming_file_dataset_and_step(run, tmp_path, capsys):
    stream = tmp_path / "stream"
    shutil.copytree(run / f"results/{EXPERIMENT}/stream", stream)
    flip_chunk_bytes(stream / "segment_000010-000019.h5", "W", chunk=3)  # step 13
    status, err = thimble(capsys, *rechunk_args(run, stream, tmp_path / "recording.h5"))
    line = error_line(err, "rechunk")
    # the embedding's W is stored as params/transformer.wte.weight/value (W links to it)
    assert status == 1 and f"segment_000010-000019.h5:/{W_PATH} steps 13..13" in line and "damaged" in line
    assert not (tmp_path / "recording.h5").exists()
    # the replay decodes the segments' frames itself and verifies the same checksum
    status, err = thimble(capsys, "replay", "--recording", stream, "--table", tmp_path / "r.csv", "--summary",
                          tmp_path / "r.json", "--ratio-table", tmp_path / "ratio.csv")
    line = error_line(err, "replay")
    assert status == 1 and "segment_000010-000019.h5" in line and "steps 13..13" in line
    # the stream checked on its own; an intact stream passes
    status, err = thimble(capsys, "verify-stream", "--stream", stream, "--threads", "2")
    line = error_line(err, "verify-stream")
    assert status == 1 and f"segment_000010-000019.h5:/{W_PATH} steps 13..13" in line
    assert thimble(capsys, "verify-stream", "--stream", run / f"results/{EXPERIMENT}/stream")[0] == 0


@pytest.mark.parametrize("dataset, chunk, steps", [("W", 1, "16..31"), ("variance_W", 2, "32..40")])
def test_flipped_bytes_in_the_recording_are_an_error(run, tmp_path, capsys, dataset, chunk, steps):
    recording = tmp_path / "recording.h5"
    shutil.copy(run / f"results/{EXPERIMENT}/recording.h5", recording)
    flip_chunk_bytes(recording, dataset, chunk=chunk)
    if dataset == "W":
        status, err = thimble(capsys, "lattice", "--recording", recording, "--output", tmp_path / "delta.h5")
        line = error_line(err, "lattice")
        assert not (tmp_path / "delta.h5").exists()
    else:
        status, err = freeze(run, capsys, tmp_path, recording=recording)
        line = error_line(err, "freeze")
    # errors name the dataset as stored: the embedding's under params/ (the seed's names link to it)
    stored = f"params/transformer.wte.weight/{STATE_KEYS[dataset]}"
    assert status == 1 and f"recording.h5:/{stored} steps {steps}" in line
    # the freeze drivers read every tensor through the same checksummed reader
    status, err = thimble(capsys, "freeze-drivers", "--recording", recording, "--table", tmp_path / "drivers.csv",
                          "--summary", tmp_path / "drivers.json")
    line = error_line(err, "freeze-drivers")
    assert status == 1 and f"recording.h5:/{stored} steps {steps}" in line
    assert not (tmp_path / "drivers.csv").exists() and not (tmp_path / "drivers.json").exists()


def freeze(root, capsys, tmp_path, recording=None, delta=None):
    results = root / f"results/{EXPERIMENT}"
    outputs = [arg for name in ("freeze", "cycles", "tokens", "classes", "lattice-positions", "variance",
                                "token-steps", "summary")
               for arg in (f"--{name}", tmp_path / f"{name}.out")]
    return thimble(capsys, "freeze", "--settings", json.dumps(settings(root)), "--delta",
                   delta or results / "delta_w_lattice.h5", "--recording", recording or results / "recording.h5",
                   *outputs)


def test_flipped_bytes_in_delta_w_are_an_error(run, tmp_path):
    """ΔW′'s reader (the notebook API through record.read_steps) verifies the frame checksum, which
    HDF5's own zstd filter does not."""
    import thimble
    from thimble.errors import DataError

    results = tmp_path / "results" / EXPERIMENT
    results.mkdir(parents=True)
    for name in ("recording.h5", "delta_w_lattice.h5"):
        shutil.copy(run / f"results/{EXPERIMENT}/{name}", results / name)
    flip_chunk_bytes(results / "delta_w_lattice.h5", "delta_w_lattice", chunk=1)
    delta = thimble.open_run(results).delta_w_lattice
    assert delta[3].shape[0] > 0  # the first chunk is intact
    with pytest.raises(DataError, match=r"delta_w_lattice.h5:/delta_w_lattice steps 16..31.*checksum"):
        delta[20]


def test_freeze_reads_delta_w_and_names_its_damage(run, tmp_path, capsys):
    """freeze's ΔW′ is the lattice stage's file (the DAG's edge is true): damage there stops it, naming
    the file, dataset and steps, and nothing is written."""
    delta = tmp_path / "delta_w_lattice.h5"
    shutil.copy(run / f"results/{EXPERIMENT}/delta_w_lattice.h5", delta)
    flip_chunk_bytes(delta, "delta_w_lattice", chunk=1)
    status, err = freeze(run, capsys, tmp_path, delta=delta)
    line = error_line(err, "freeze")
    assert status == 1 and "delta_w_lattice.h5:/params/transformer.wte.weight/delta_w_lattice steps 16..31" in line, line
    assert not list(tmp_path.glob("*.out"))


def test_flipped_bytes_in_the_token_displacement_are_an_error(run, tmp_path, capsys):
    results = run / f"results/{EXPERIMENT}"
    token_steps = tmp_path / "token_displacement.h5"
    shutil.copy(results / "token_displacement.h5", token_steps)
    flip_chunk_bytes(token_steps, "norm")
    status, err = thimble(capsys, "figures", "--freeze", results / "freeze.csv", "--summary", results / "summary.json",
                          "--token-steps", token_steps, "--exp-avg-sq", results / "exp_avg_sq.csv", "--ratio",
                          results / "update_ratio.csv", "--lattice-positions", results / "lattice_positions.csv",
                          "--drivers", results / "freeze_drivers.csv", "--outdir", tmp_path)
    assert status == 1 and str(token_steps) in error_line(err, "figures")


@pytest.mark.parametrize("xor, problem", [(0x04, "carries no checksum"), (0x20, "not a zstd frame")])
def test_a_flipped_frame_header_names_file_and_step(run, tmp_path, capsys, xor, problem):
    """0x04 at byte 4 clears the checksum flag (the frame would still decode); byte 0 is the magic number."""
    recording = tmp_path / "recording.h5"
    shutil.copy(run / f"results/{EXPERIMENT}/recording.h5", recording)
    with h5py.File(recording, "r") as handle:
        info = handle["W"].id.get_chunk_info(0)
    with open(recording, "r+b") as raw:
        at = info.byte_offset + (4 if xor == 0x04 else 0)
        raw.seek(at)
        byte = raw.read(1)[0]
        raw.seek(at)
        raw.write(bytes([byte ^ xor]))
    status, err = thimble(capsys, "lattice", "--recording", recording, "--output", tmp_path / "delta.h5")
    line = error_line(err, "lattice")
    assert status == 1 and f"recording.h5:/{W_PATH} steps 0..15" in line and problem in line


def test_a_flipped_loss_is_an_error(run, tmp_path, capsys):
    recording = tmp_path / "recording.h5"
    shutil.copy(run / f"results/{EXPERIMENT}/recording.h5", recording)
    flip_chunk_bytes(recording, "losses", at=8, count=4)
    status, err = freeze(run, capsys, tmp_path, recording=recording)
    assert status == 1 and "recording.h5:/losses" in error_line(err, "freeze")


def test_a_truncated_recording_is_an_error_naming_it(run, tmp_path, capsys):
    recording = tmp_path / "recording.h5"
    shutil.copy(run / f"results/{EXPERIMENT}/recording.h5", recording)
    os.truncate(recording, recording.stat().st_size // 3)
    status, err = thimble(capsys, "lattice", "--recording", recording, "--output", tmp_path / "delta.h5")
    assert status == 1 and str(recording) in error_line(err, "lattice")


# -- 3-5. resume only the same run; one trainer per .partial; a corrupt checkpoint -----------------

def data_paths(root):
    data = root / "results/data/toy"
    return data / "tokens.npy", data / "live_dead_tokens.safetensors"


def interrupted_run(root, out, run_settings, monkeypatch):
    """Train to the end but stop before the stream is written: a .partial with a checkpoint at every segment."""
    import thimble.training.train as train_module

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    tokens, masks = data_paths(root)
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "write_stream_file", stop)
        with pytest.raises(KeyboardInterrupt):
            train(run_settings, str(tokens), str(masks), str(out), str(out) + ".partial")
    partial = out.with_name(out.name + ".partial")
    assert (partial / CHECKPOINT).exists() and not out.exists()
    return partial


def test_changed_tokens_under_a_partial_discard_it(run, tmp_path, monkeypatch, caplog):
    run_settings = settings(run)
    out = tmp_path / "stream"
    interrupted_run(run, out, run_settings, monkeypatch)
    tokens, masks = data_paths(run)
    changed = tmp_path / "tokens.npy"
    np.save(changed, np.load(tokens)[::-1].copy())  # same ids, other order: other batches
    caplog.set_level("INFO")
    train(run_settings, str(changed), str(masks), str(out), str(out) + ".partial")
    discarded = [r.getMessage() for r in caplog.records if "discarding" in r.getMessage()]
    assert len(discarded) == 1 and "inputs.tokens_sha256" in discarded[0]
    assert "resuming" not in caplog.text
    train(run_settings, str(changed), str(masks), str(tmp_path / "clean"), str(tmp_path / "clean.partial"))
    assert_same_stream(out, tmp_path / "clean")


def test_other_math_threads_restart_rather_than_mix(run, tmp_path, monkeypatch, caplog):
    run_settings = settings(run)
    out = tmp_path / "stream"
    interrupted_run(run, out, run_settings, monkeypatch)
    more = json.loads(json.dumps(run_settings))
    more["training"]["math_threads"] = 2
    caplog.set_level("INFO")
    tokens, masks = data_paths(run)
    train(more, str(tokens), str(masks), str(out), str(out) + ".partial")
    assert "training.math_threads: 1 -> 2" in caplog.text and "resuming" not in caplog.text
    with open_stream(out) as stream:
        assert stream.attrs["torch_threads"] == stream.attrs["math_threads"] == 2


def test_a_partial_of_the_same_run_resumes_bitwise(run, tmp_path, monkeypatch, caplog):
    run_settings = settings(run)
    out = tmp_path / "stream"
    interrupted_run(run, out, run_settings, monkeypatch)
    caplog.set_level("INFO")
    tokens, masks = data_paths(run)
    train(run_settings, str(tokens), str(masks), str(out), str(out) + ".partial")
    assert "resuming tiny after step 40" in caplog.text and "discarding" not in caplog.text
    assert_same_stream(out, run / f"results/{EXPERIMENT}/stream")


def flip_tensor_bytes(checkpoint, tensor_name, count=8):
    """XOR ``count`` bytes in the middle of one model tensor's stored bytes inside ``checkpoint`` with 0xFF."""
    stored = torch.load(checkpoint, weights_only=False)["model"][tensor_name].contiguous().view(torch.uint8)
    raw = bytearray(checkpoint.read_bytes())
    offset = raw.find(bytes(stored.numpy()))
    assert offset > 0 and raw.find(bytes(stored.numpy()), offset + 1) < 0  # found once
    middle = offset + stored.numel() // 2
    raw[middle:middle + count] = bytes(byte ^ 0xFF for byte in raw[middle:middle + count])
    checkpoint.write_bytes(bytes(raw))


def discarded_checkpoints(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("discarding the checkpoint")]


def test_a_damaged_checkpoint_is_discarded_and_the_previous_one_resumed(run, tmp_path, monkeypatch, caplog):
    """8 flipped bytes inside a transformer weight: torch.load reads them without complaint; the
    checksum does not match, so the run resumes from the checkpoint before, bit for bit."""
    run_settings = settings(run)
    out = tmp_path / "stream"
    partial = interrupted_run(run, out, run_settings, monkeypatch)
    assert (partial / PREVIOUS_CHECKPOINT).exists() and (partial / CHECKPOINT_SHA256).exists()
    flip_tensor_bytes(partial / CHECKPOINT, "transformer.h.0.mlp.c_fc.weight")
    torch.load(partial / CHECKPOINT, weights_only=False)  # still loads: only the checksum tells
    caplog.set_level("INFO")
    tokens, masks = data_paths(run)
    train(run_settings, str(tokens), str(masks), str(out), str(out) + ".partial")
    [discarded] = discarded_checkpoints(caplog)
    assert str(partial / CHECKPOINT) in discarded and "sha256 matches no checksum" in discarded
    assert "resuming tiny after step 39" in caplog.text
    assert_same_stream(out, run / f"results/{EXPERIMENT}/stream")


def test_with_both_checkpoints_damaged_training_restarts_from_step_0(run, tmp_path, monkeypatch, caplog):
    run_settings = settings(run)
    out = tmp_path / "stream"
    partial = interrupted_run(run, out, run_settings, monkeypatch)
    checkpoint = partial / CHECKPOINT
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])  # truncated
    flip_tensor_bytes(partial / PREVIOUS_CHECKPOINT, "transformer.h.0.attn.c_proj.weight")
    caplog.set_level("INFO")
    tokens, masks = data_paths(run)
    train(run_settings, str(tokens), str(masks), str(out), str(out) + ".partial")
    assert len(discarded_checkpoints(caplog)) == 2 and "resuming" not in caplog.text
    assert "training from step 0: none of its checkpoints passes its checksum" in caplog.text
    assert_same_stream(out, run / f"results/{EXPERIMENT}/stream")


def test_a_checkpoint_without_its_checksum_is_not_resumed(run, tmp_path, monkeypatch, caplog):
    """A crash after the checkpoint's rename but before its checksum, or a checkpoint of an older thimble."""
    run_settings = settings(run)
    out = tmp_path / "stream"
    partial = interrupted_run(run, out, run_settings, monkeypatch)
    (partial / CHECKPOINT_SHA256).unlink()
    caplog.set_level("INFO")
    tokens, masks = data_paths(run)
    train(run_settings, str(tokens), str(masks), str(out), str(out) + ".partial")
    discarded = discarded_checkpoints(caplog)
    assert len(discarded) == 2 and all("no checksum vouches for it" in line for line in discarded)
    assert "resuming" not in caplog.text
    assert_same_stream(out, run / f"results/{EXPERIMENT}/stream")


def test_a_second_trainer_on_a_locked_partial_is_refused(run, tmp_path, capsys):
    out = tmp_path / "stream"
    lock = tmp_path / "stream.partial.lock"
    tokens, masks = data_paths(run)
    with lock_held(lock) as holder:
        status, err = thimble(capsys, "train", "--settings", json.dumps(settings(run)), "--tokens", tokens,
                              "--masks", masks, "--output", out, "--partial", str(out) + ".partial")
        line = error_line(err, "train")
        assert status == 1 and f"PID {holder.pid}" in line and "stream.partial" in line
        assert not (tmp_path / "stream.partial").exists() and not out.exists()
    # the kernel drops a dead holder's lock: the next trainer runs
    status, _ = thimble(capsys, "train", "--settings", json.dumps(settings(run)), "--tokens", tokens,
                        "--masks", masks, "--output", out, "--partial", str(out) + ".partial")
    assert status == 0 and not lock.exists()  # a finished run leaves no lock behind
    assert_same_stream(out, run / f"results/{EXPERIMENT}/stream")


def test_a_checkpoint_is_written_under_a_unique_temporary_name_and_then_its_checksum(tmp_path, monkeypatch):
    from thimble.util.files import sha256_file
    from thimble.training.checkpoint import read_checkpoint_checksums, save_checkpoint

    renamed = []
    original = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append((os.path.basename(src),
                                                                         os.path.basename(dst))), original(src, dst)))
    save_checkpoint(tmp_path, {"step": 1})
    save_checkpoint(tmp_path, {"step": 2})
    temporary = [src for src, dst in renamed if src.endswith(".tmp")]
    assert len(set(temporary)) == len(temporary) == 4
    # per save: the checkpoint under its final name before its checksum, the previous kept aside first
    assert [dst for _, dst in renamed] == [CHECKPOINT, CHECKPOINT_SHA256, PREVIOUS_CHECKPOINT, CHECKPOINT,
                                           CHECKPOINT_SHA256]
    assert torch.load(tmp_path / CHECKPOINT)["step"] == 2 and torch.load(tmp_path / PREVIOUS_CHECKPOINT)["step"] == 1
    assert read_checkpoint_checksums(tmp_path) == {name: sha256_file(tmp_path / name)
                                                   for name in (CHECKPOINT, PREVIOUS_CHECKPOINT)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, PREVIOUS_CHECKPOINT, CHECKPOINT_SHA256])


def test_a_crash_in_the_middle_of_a_save_leaves_a_verified_checkpoint(tmp_path, monkeypatch):
    from thimble.training.checkpoint import read_checkpoint_checksums, save_checkpoint, verified_checkpoint

    save_checkpoint(tmp_path, {"step": 1, "resume_key": {}})
    save_checkpoint(tmp_path, {"step": 2, "resume_key": {}})
    original = os.replace

    def crash_before_the_new_one_is_in_place(src, dst):
        if os.path.basename(dst) == CHECKPOINT:
            raise KeyboardInterrupt
        original(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash_before_the_new_one_is_in_place)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, {"step": 3, "resume_key": {}})
    assert not (tmp_path / CHECKPOINT).exists()  # step 2 was moved aside, step 3 never arrived
    assert verified_checkpoint(tmp_path)["step"] == 2
    # the next save keeps step 2 as the previous one, still vouched for
    save_checkpoint(tmp_path, {"step": 4, "resume_key": {}})
    assert set(read_checkpoint_checksums(tmp_path)) == {CHECKPOINT, PREVIOUS_CHECKPOINT}
    (tmp_path / CHECKPOINT).write_bytes(b"damaged")
    assert verified_checkpoint(tmp_path)["step"] == 2


# -- bad inputs and a full disk: one line, exit 1 ------------------------------------------------

@pytest.mark.parametrize("kind, message", [
    ("pickled", "not a plain .npy array"),
    ("float", "not a 1-D array of integer token ids"),
    ("outside", "token ids lie outside the vocabulary [0, 300)"),
])
def test_a_bad_tokens_file_is_one_line_naming_it(run, tmp_path, capsys, kind, message):
    tokens, masks = data_paths(run)
    bad = tmp_path / "tokens.npy"
    ids = np.load(tokens)
    if kind == "pickled":
        np.save(bad, np.array([list(ids[:10])], dtype=object), allow_pickle=True)
    elif kind == "float":
        np.save(bad, ids.astype(np.float32))
    else:
        np.save(bad, np.append(ids, 300).astype(np.int32))
    status, err = thimble(capsys, "masks", "--tokens", bad, "--vocab-size", 300, "--output", tmp_path / "m.st")
    line = error_line(err, "masks")
    assert status == 1 and str(bad) in line and message in line
    status, err = thimble(capsys, "train", "--settings", json.dumps(settings(run)), "--tokens", bad, "--masks", masks,
                          "--output", tmp_path / "stream", "--partial", tmp_path / "stream.partial")
    assert status == 1 and message in error_line(err, "train")


def test_a_full_disk_is_one_line_naming_the_file(run, tmp_path, capsys, monkeypatch):
    from thimble.analysis import delta_w

    target = tmp_path / "delta.h5"

    def full(recording, output, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(output) + ".partial")

    monkeypatch.setattr(delta_w, "write_delta_w_lattice", full)
    status, err = thimble(capsys, "lattice", "--recording", run / f"results/{EXPERIMENT}/recording.h5",
                          "--output", target)
    line = error_line(err, "lattice")
    assert status == 1 and f"the disk is full writing {target}.partial" in line
    assert re.search(r"\(\d+(\.\d\d)? (B|kB|MB|GB|TB) free in ", line), line


def test_a_full_disk_in_the_recorder_thread_says_what_training_needs(run, tmp_path, capsys, monkeypatch):
    from thimble.record import writer

    def full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer._Segment, "commit", full)
    tokens, masks = data_paths(run)
    status, err = thimble(capsys, "train", "--settings", json.dumps(settings(run)), "--tokens", tokens,
                          "--masks", masks, "--output", tmp_path / "stream", "--partial", tmp_path / "stream.partial")
    line = error_line(err, "train")
    assert status == 1 and "the disk is full writing" in line and "it needs about" in line


def test_a_bug_keeps_its_traceback(run, tmp_path, monkeypatch):
    from thimble.analysis import delta_w

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(delta_w, "write_delta_w_lattice", bug)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["lattice", "--recording", str(run / f"results/{EXPERIMENT}/recording.h5"), "--output",
                  str(tmp_path / "delta.h5")])


def test_a_missing_local_corpus_folder_stops_the_dry_run(tmp_path):
    config = tiny_config()
    config["datasets"]["toy"]["source"]["local"] = "no/such/folder"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "-n", f"results/{EXPERIMENT}/stream", check=False)
    assert result.returncode != 0
    assert "config key datasets.toy.source.local: folder no/such/folder does not exist" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_a_batch_larger_than_the_corpus_stops_the_dry_run(run):
    config = tiny_config()
    config["experiments"]["huge_batch"] = {"dataset": "toy", **TINY, "training": {**TINY["training"],
                                                                                  "batch_size": 10**6}}
    (run / "huge.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(run, "-n", "results/huge_batch/stream", "--configfile", str(run / "huge.yaml"),
                           check=False)
    assert result.returncode != 0
    assert re.search(r"experiments\.huge_batch\.training\.batch_size: 1000000 is more than the corpus's \d+ windows",
                     result.stdout + result.stderr)


# -- 5-6. results independent of --cores; a config edit reruns only what reads it -----------------

@pytest.fixture(scope="module")
def mini_by_cores(mini_data, tmp_path_factory):
    """thimble_mini trained under --cores 1 and --cores 2, from the same data."""
    runs = {}
    for cores in ("1", "2"):
        workdir = tmp_path_factory.mktemp(f"cores{cores}")
        shutil.copy(REPO / "config.yaml", workdir / "config.yaml")
        shutil.copytree(mini_data / "results/data", workdir / "results/data")
        run_snakemake(workdir, "--cores", cores, "results/thimble_mini/freeze.csv")
        runs[cores] = workdir
    return runs


@pytest.mark.workflow
def test_cores_1_and_2_give_bitwise_identical_runs(mini_by_cores):
    one, two = (mini_by_cores[c] / "results/thimble_mini" for c in ("1", "2"))
    assert_same_stream(one / "stream", two / "stream")
    for name in ("freeze.csv", "summary.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    with open_stream(one / "stream") as a, open_stream(two / "stream") as b:
        assert a.attrs["torch_threads"] == b.attrs["torch_threads"] == 1  # training.math_threads
        assert a.attrs["compression_threads"] == 1 and b.attrs["compression_threads"] == 2


def planned(output: str) -> set[str]:
    return set(re.findall(r"^rule (\w+):", output, re.M)) | set(re.findall(r"^localrule (\w+):", output, re.M))


@pytest.mark.workflow
@pytest.mark.parametrize("edit, expected", [
    (lambda exp: exp.update(description="a new description"), set()),
    (lambda exp: exp.setdefault("analysis", {}).update(solid_max=4), {"freeze"}),
    (lambda exp: exp.setdefault("rechunk", {}).update(steps_per_chunk=30),
     {"rechunk", "freeze_drivers", "lattice", "freeze"}),
    (lambda exp: exp["training"].update(learning_rate=2e-3), {"train", "rechunk", "freeze_drivers", "lattice", "freeze"}),
])
def test_a_config_edit_plans_only_the_stages_that_read_it(mini_by_cores, edit, expected):
    workdir = mini_by_cores["2"]
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    edit(config["experiments"]["thimble_mini"])
    (workdir / "edited.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, "-n", "results/thimble_mini/freeze.csv", "--configfile",
                           str(workdir / "edited.yaml"))
    assert planned(result.stdout) == expected, result.stdout


# -- the SLURM profile asks for a GPU only where training uses one ----------------------

def slurm_dry_run_gpus(workdir, config) -> dict[str, str]:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, "-n", "--profile", str(REPO / "workflow/profiles/slurm"),
                           *[f"results/{name}/stream" for name in config["experiments"]])
    jobs = re.findall(r"^rule train:\n(.*?)(?:\n\n|\nShell command)", result.stdout, re.M | re.S)
    gpus = {}
    for job in jobs:
        experiment = re.search(r"wildcards: experiment=(\w+)", job).group(1)
        gpus[experiment] = re.search(r"resources: .*", job).group(0)
    return gpus


def test_the_slurm_dry_run_of_a_cpu_experiment_asks_for_no_gpu(tmp_path):
    config = tiny_config()
    experiment = config["experiments"][EXPERIMENT]
    config["experiments"]["on_cuda"] = {**experiment, "training": {**experiment["training"], "device": "cuda"}}
    config["experiments"]["on_auto"] = {**experiment, "training": {**experiment["training"], "device": "auto"}}
    write_texts(tmp_path / "texts")
    resources = slurm_dry_run_gpus(tmp_path, config)
    assert re.search(r"\bgpu=0\b", resources[EXPERIMENT]), resources
    assert re.search(r"\bgpu=1\b", resources["on_cuda"]) and re.search(r"\bgpu=1\b", resources["on_auto"])
    config["cluster"] = {"auto_device_requests_gpu": False}
    resources = slurm_dry_run_gpus(tmp_path, config)
    assert re.search(r"\bgpu=0\b", resources["on_auto"]) and re.search(r"\bgpu=1\b", resources["on_cuda"])
