"""Rechunk, ΔW′ from a real (tiny) recording, and the bitwise AdamW replay."""

import csv
import json

import h5py
import numpy as np
import pytest
import torch

from conftest import VOCAB, rewrite_steps, run_train, tiny_settings
from thimble.numerics.bf16 import BFLOAT16
from thimble.analysis.delta_w import write_delta_w_lattice
from thimble.numerics.lattice import delta_w_lattice
from thimble.record.rechunk import RechunkError, rechunk_stream
from thimble.sizes import steps_per_chunk
from thimble.record.format import TENSORS
from thimble.record.reader import read_steps
from thimble.record.stream_reader import open_stream
from thimble.analysis.replay import replay_recording


@pytest.fixture(scope="module")
def rechunked(recorded, tmp_path_factory):
    out = tmp_path_factory.mktemp("rechunk") / "recording.h5"
    rechunk_stream(recorded, out, 8, 2**31)
    return out


def test_rechunked_file_matches_the_stream_bit_for_bit(recorded, rechunked):
    with open_stream(recorded) as stream, h5py.File(rechunked, "r") as out:
        for name in TENSORS:
            assert out[name].chunks == (8, VOCAB, 8)  # 31 rows: three full chunks and an edge chunk
            np.testing.assert_array_equal(read_steps(out[name]).view(np.uint16), read_steps(stream[name]).view(np.uint16))
            np.testing.assert_array_equal(out[name][...], stream[name][...])
            assert len(out[name].attrs["sha256"]) == 64
        for name in ("losses", "live_mask", "dead_mask", "live_ids", "dead_ids"):
            np.testing.assert_array_equal(out[name][...], stream[name][...])
        assert out.attrs["steps_per_chunk"] == 8 and out.attrs["num_steps"] == stream.attrs["num_steps"]


def test_rechunk_fails_loudly_when_bits_differ(recorded, tmp_path, monkeypatch):
    import thimble.record.rechunk as rechunk

    original = rechunk.compress_shuffled

    def corrupt(raw, level, threads):
        flipped = raw.copy()
        flipped.reshape(-1)[0] ^= 1
        return original(flipped, level, threads)

    monkeypatch.setattr(rechunk, "compress_shuffled", corrupt)
    with pytest.raises(RechunkError, match="differ from the source"):
        rechunk_stream(recorded, tmp_path / "bad.h5", 8, 2**31)
    assert not (tmp_path / "bad.h5").exists() and not list(tmp_path.iterdir())


def test_auto_chunks_and_whole_run_chunks(recorded, tmp_path):
    row_bytes = VOCAB * 8 * 2
    rechunk_stream(recorded, tmp_path / "auto.h5", "auto", 10 * row_bytes)
    with h5py.File(tmp_path / "auto.h5", "r") as out:
        assert out["W"].chunks[0] == steps_per_chunk(31, row_bytes, "auto", 10 * row_bytes) == 8
    rechunk_stream(recorded, tmp_path / "one.h5", 1500, 2**31)
    with h5py.File(tmp_path / "one.h5", "r") as out:
        assert out["W"].chunks[0] == 31


def test_delta_w_lattice_of_a_recording(rechunked, tmp_path):
    summary = write_delta_w_lattice(str(rechunked), str(tmp_path / "delta.h5"))
    with h5py.File(rechunked, "r") as source, h5py.File(tmp_path / "delta.h5", "r") as out:
        w = read_steps(source["W"])
        delta = out["delta_w_lattice"][...]
        assert out["delta_w_lattice"].chunks == source["W"].chunks
        assert delta.dtype == np.int16 and summary["dtype"] == "int16"
        np.testing.assert_array_equal(delta[0], 0)
        np.testing.assert_array_equal(delta[1:], delta_w_lattice(w[:-1], w[1:]))
        # replaying the steps from W[0] gives back every W[t] exactly
        from thimble.numerics.lattice import from_ordinal, ordinal
        rebuilt = from_ordinal(ordinal(w[0]) + np.cumsum(delta.astype(np.int32), axis=0))
        np.testing.assert_array_equal(rebuilt.astype(np.float32), w.astype(np.float32))
        moves = out["moves_per_step"][...]
        np.testing.assert_array_equal(moves, np.count_nonzero(delta, axis=(1, 2)))
        assert moves[0] == 0 and moves.sum() == summary["moves"] > 0
        assert 0 <= summary["crossed_binade_fraction"] < 1


def test_delta_w_lattice_names_a_nonfinite_step_and_element(rechunked, tmp_path):
    import shutil

    from thimble.numerics.lattice import NonFiniteError

    copy = tmp_path / "recording.h5"
    shutil.copy(rechunked, copy)
    with h5py.File(copy, "r+") as handle:
        bits = read_steps(handle["W"], 17, 18).view(np.uint16).copy()
        bits[0, 5, 3] = 0x7FC0  # NaN, stored through thimble's checksummed codec
        rewrite_steps(handle["W"], 17, bits)
    with pytest.raises(NonFiniteError, match=r"nan at step 17, element \(5, 3\)"):
        write_delta_w_lattice(str(copy), str(tmp_path / "delta.h5"))
    assert not (tmp_path / "delta.h5").exists()


def test_float16_recordings_give_the_delta_w_of_their_stored_values_and_a_replay_that_counts(data, tmp_path):
    stream = run_train(data, tmp_path / "stream", tiny_settings(dtype="float16"))
    rechunk_stream(stream, tmp_path / "recording.h5", 8, 2**31)
    summary = write_delta_w_lattice(str(tmp_path / "recording.h5"), str(tmp_path / "delta.h5"))
    assert summary["source_storage"] == "float16" and not summary["exact"]
    with h5py.File(tmp_path / "recording.h5", "r") as recording, h5py.File(tmp_path / "delta.h5", "r") as delta:
        stored = torch.from_numpy(read_steps(recording["W"]))
        as_bf16 = stored.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).view(BFLOAT16)
        np.testing.assert_array_equal(delta["delta_w_lattice"][1:], delta_w_lattice(as_bf16[:-1], as_bf16[1:]))
        assert not delta["delta_w_lattice"].attrs["exact"]
    replay = replay_recording(str(stream), str(tmp_path / "replay.csv"), str(tmp_path / "replay.json"),
                           str(tmp_path / "ratio.csv"))
    assert replay["storage_dtype"] == "float16"
    from thimble.analysis.freeze import analyse

    settings = tiny_settings(dtype="float16")
    outputs = {name: str(tmp_path / f"{name}.out") for name in
               ("freeze", "cycles", "tokens", "classes", "lattice_positions", "variance", "token_steps", "summary")}
    summary = analyse(str(tmp_path / "recording.h5"), settings, outputs, delta_path=str(tmp_path / "delta.h5"))
    assert summary["delta_w_exact"] is False
    # exp_avg_sq of these steps lies far below float16's range: stored as 0, the replay says so
    assert replay["total_mismatches"]["variance_mismatches"] > 0 and not replay["bitwise_match"]


def test_float16_to_bfloat16_bits_equal_torchs_cast_for_every_pattern():
    from thimble.numerics.bf16 import bfloat16_bits_from_float16_bits

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours = bfloat16_bits_from_float16_bits(bits)
    theirs = torch.from_numpy(bits.view(np.float16)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(bits.view(np.float16))
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(ours[nan].view(BFLOAT16).astype(np.float32)).all()


def test_replay_of_a_recording_matches_with_zero_mismatches(recorded, tmp_path):
    summary = replay_recording(str(recorded), str(tmp_path / "replay.csv"), str(tmp_path / "replay.json"),
                            str(tmp_path / "ratio.csv"))
    assert summary == json.loads((tmp_path / "replay.json").read_text())
    histogram = np.loadtxt(tmp_path / "ratio.csv", delimiter=",", skiprows=1, usecols=range(1, 36))
    assert histogram.shape == (30, 1 + 34)
    assert {row["tensor"] for row in csv.DictReader(open(tmp_path / "ratio.csv"))} == {"transformer.wte.weight"}
    assert (histogram[:, 1:].sum(axis=1) == VOCAB * 8).all()  # every element in one bin, every step
    assert summary["same_kernel"] and summary["bitwise_match"]
    rows = list(csv.DictReader(open(tmp_path / "replay.csv")))
    assert [int(row["step"]) for row in rows] == list(range(1, 31))
    for row in rows:
        assert row["W_mismatches"] == row["momentum_mismatches"] == row["variance_mismatches"] == "0"
        # the criterion, with ties resolved as rounding resolves them, is exact on the recording's own kernel
        assert row["criterion_disagreements"] == "0" and float(row["freeze_agreement"]) == 1.0
        assert row["predicted_frozen"] == row["observed_frozen"] == row["replay_frozen"]
    criterion = summary["freeze_criterion"]
    assert criterion["disagreements"] == 0 and criterion["agreement"] == 1.0 and criterion["listed"] == []
    assert sum(int(row["observed_frozen"]) for row in rows) > 0  # the criterion met frozen elements


@pytest.mark.parametrize("implementation", ["single_tensor", "foreach", "fused"])
def test_each_optimizer_implementation_is_recorded_and_replayed_bit_for_bit(data, tmp_path, implementation):
    settings = tiny_settings()
    settings["training"]["optimizer_impl"] = implementation
    settings["training"]["steps"] = 12
    stream = run_train(data, tmp_path / "stream", settings)
    with open_stream(stream) as handle:
        assert handle.attrs["optimizer_impl"] == implementation
    summary = replay_recording(str(stream), str(tmp_path / "replay.csv"), str(tmp_path / "replay.json"),
                            str(tmp_path / "ratio.csv"), threads=2, block_steps=5)
    assert summary["bitwise_match"] and summary["replayed_on"]["optimizer_impl"] == implementation
    assert summary["total_mismatches"] == {"W_mismatches": 0, "momentum_mismatches": 0, "variance_mismatches": 0}
    if implementation != "fused":  # the criterion follows the bf16 arithmetic of the other two
        assert summary["freeze_criterion"]["disagreements"] == 0
    for listed in summary["freeze_criterion"]["listed"]:
        assert "fused kernel" in listed["reason"]


def test_replay_counts_mismatches_of_a_tampered_recording(recorded, tmp_path):
    import shutil

    copy = tmp_path / "stream"
    shutil.copytree(recorded, copy)
    segment = sorted(copy.glob("segment_*.h5"))[1]  # steps 7..13
    with h5py.File(segment, "r+") as handle:
        values = read_steps(handle["W"])
        values[3, 0, :5] = (values[3, 0, :5].astype(np.float32) * 1.5).astype(BFLOAT16)  # step 10
        rewrite_steps(handle["W"], 3, values[3:4].view(np.uint16))
    summary = replay_recording(str(copy), str(tmp_path / "replay.csv"), str(tmp_path / "replay.json"),
                            str(tmp_path / "ratio.csv"))
    rows = {int(row["step"]): row for row in csv.DictReader(open(tmp_path / "replay.csv"))}
    assert not summary["bitwise_match"]
    assert int(rows[10]["W_mismatches"]) == 5  # step 10 predicted from 9 no longer matches
    assert int(rows[11]["W_mismatches"]) > 0   # and step 11 starts from the tampered W[10]
    assert all(int(rows[t]["W_mismatches"]) == 0 for t in rows if t not in (10, 11))


@pytest.mark.parametrize("steps_per_chunk", [7, 31])
def test_replay_of_recording_h5_equals_the_replay_of_its_stream(recorded, tmp_path, steps_per_chunk):
    """The replay rule reads recording.h5 (the stream is temporary by default): the same tables, byte for
    byte, as from the stream it was rechunked from, with chunks shorter and longer than a replay block."""
    rechunk_stream(recorded, tmp_path / "recording.h5", steps_per_chunk, 2**31)
    outputs = {}
    for label, source in (("stream", recorded), ("recording", tmp_path / "recording.h5")):
        paths = [tmp_path / f"{label}.{name}" for name in ("replay.csv", "replay.json", "ratio.csv")]
        replay_recording(str(source), *map(str, paths), block_steps=4)
        summary = json.loads(paths[1].read_text())
        read = summary.pop("provenance")["computed_from"]["file"]  # the one difference: which file was read
        outputs[label] = [paths[0].read_bytes(), summary, paths[2].read_bytes(), read]
    assert outputs["recording"][:3] == outputs["stream"][:3]
    assert (outputs["stream"][3], outputs["recording"][3]) == ("stream.h5", "recording.h5")


def test_recording_rows_are_read_in_order(recorded, tmp_path):
    from thimble.record.format import open_h5
    from thimble.record.reader import RecordedTensor

    rechunk_stream(recorded, tmp_path / "recording.h5", 7, 2**31)
    with open_h5(tmp_path / "recording.h5") as handle:
        rows, out = RecordedTensor.of_recording(handle, "W").in_order(3), np.empty((5, *handle["W"].shape[1:]), np.uint16)
        rows.read(4, 9, out)
        np.testing.assert_array_equal(out, read_steps(handle["W"])[4:9].view(np.uint16))
        with pytest.raises(ValueError, match="read in order"):
            rows.read(2, 4, out[:2])


@pytest.mark.parametrize("block_rows", [16, 5])
def test_freeze_summaries_from_the_stored_delta_w_equal_those_computed_from_w(recorded, tmp_path, block_rows):
    """freeze reads ΔW′ from the lattice stage's file; what it reads is what W gives, bit for bit (blocks that
    do not divide the chunks included)."""
    import dataclasses

    from thimble.analysis.freeze import group_masks, read_token_steps

    rechunk_stream(recorded, tmp_path / "recording.h5", 8, 2**31)
    write_delta_w_lattice(str(tmp_path / "recording.h5"), str(tmp_path / "delta.h5"))
    with h5py.File(tmp_path / "recording.h5", "r") as recording:
        dead = group_masks(recording["dead_mask"][...].astype(bool))
    read = read_token_steps(str(tmp_path / "recording.h5"), dead, block_rows, threads=2,
                            delta_path=str(tmp_path / "delta.h5"))
    computed = read_token_steps(str(tmp_path / "recording.h5"), dead, block_rows, threads=2)
    for field in dataclasses.fields(computed):
        np.testing.assert_array_equal(getattr(read, field.name), getattr(computed, field.name), err_msg=field.name)
    assert read.moved[1:].sum() > 0


def test_replay_accepts_stream_as_the_old_name_of_recording():
    from thimble.cli import build_parser

    common = ["--table", "r.csv", "--summary", "r.json", "--ratio-table", "u.csv"]
    old = build_parser().parse_args(["replay", "--stream", "X", *common])
    new = build_parser().parse_args(["replay", "--recording", "X", *common])
    assert vars(old) == vars(new) and old.recording == "X" and not hasattr(old, "stream")


def test_one_place_decides_where_a_runs_rows_come_from(recorded, rechunked, tmp_path):
    from thimble.record.reader import RecordingSource

    assert RecordingSource.of_path(recorded) == RecordingSource(recorded, True)
    assert RecordingSource.of_path(rechunked) == RecordingSource(rechunked, False)
    results = tmp_path / "results" / "x"
    assert RecordingSource.in_results(results) is None
    (results / "stream").mkdir(parents=True)
    (results / "stream" / "stream.h5").write_bytes(b"")
    assert RecordingSource.in_results(results) == RecordingSource(results / "stream", True)
    assert RecordingSource.in_results(results, "recording") == RecordingSource(results / "recording.h5", False)
    (results / "recording.h5").write_bytes(b"")
    assert RecordingSource.in_results(results) == RecordingSource(results / "recording.h5", False)
    assert RecordingSource.in_results(results, "stream").file == results / "stream" / "stream.h5"
    with RecordingSource.of_path(recorded).open() as stream, RecordingSource.of_path(rechunked).open() as out:
        assert stream.attrs["complete"] and out["W"].shape == stream["W"].shape
