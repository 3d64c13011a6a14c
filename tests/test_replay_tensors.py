"""The replay of every recorded tensor: each update rule's recording of all parameters replays bit for bit,
tensor by tensor; the freeze criterion of a tensor whose updates all vanish; a tampered non-embedding tensor
named with its step; stochastic rounding's later parameters; a recording of the old layout."""

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import rewrite_steps, run_train, tiny_settings
from thimble.analysis.replay import COUNT_COLUMNS, RATIO_COLUMNS, replay_recording, rounding_draws
from thimble.analysis.tensors import row_shape
from thimble.numerics.bf16 import BFLOAT16
from thimble.record.format import RecordLayout
from thimble.record.reader import read_steps
from thimble.record.rechunk import rechunk_stream
from thimble.sizes import EMBEDDING, parameter_shapes
from thimble.update_rules import UPDATE_RULES

STEPS = 8
#: a parameter after the embedding, and 2-D
LATER = "transformer.h.0.mlp.c_fc.weight"


def all_tensor_settings(rule: str = "bf16", **training) -> dict:
    settings = tiny_settings(tensors=["*"])
    settings["training"].update(update_rule=rule, steps=STEPS, **training)
    return settings


def trained_recording(data, directory, settings) -> str:
    """A tiny run recording every parameter, rechunked into chunks of 5 steps (shorter than a run, longer
    than the replay's blocks below)."""
    stream = run_train(data, directory / "stream", settings)
    rechunk_stream(stream, directory / "recording.h5", 5, 2**31)
    return str(directory / "recording.h5")


def replay(recording, directory, **options) -> tuple[dict, list[dict], list[dict]]:
    """replay.json, replay.csv's rows and update_ratio.csv's rows of a replay written into ``directory``."""
    paths = [directory / name for name in ("replay.csv", "replay.json", "update_ratio.csv")]
    summary = replay_recording(str(recording), *map(str, paths), **options)
    assert summary == json.loads(paths[1].read_text())
    return summary, list(csv.DictReader(open(paths[0]))), list(csv.DictReader(open(paths[2])))


@pytest.fixture(scope="module")
def bf16_recording(data, tmp_path_factory):
    return trained_recording(data, tmp_path_factory.mktemp("bf16_all"), all_tensor_settings())


@pytest.mark.parametrize("rule", UPDATE_RULES)
def test_every_tensor_of_each_rule_replays_bit_for_bit(data, tmp_path, rule):
    settings = all_tensor_settings(rule)
    recording = trained_recording(data, tmp_path, settings)
    shapes = parameter_shapes(settings["model"])
    with h5py.File(recording) as handle:
        params = RecordLayout.of_file(handle).params
        changed = {(name, key): not np.array_equal(*read_steps(handle[param.paths[key]])[[0, -1]].view(np.uint16))
                   for name, param in params.items() for key in ("value", "exp_avg")}
    # every parameter, each trained: its moment at least (the layer norms' weights at 1.0 may not move in a few
    # steps, a half spacing above 1.0 being 2^-8), most values too
    assert list(params) == list(shapes)
    assert all(changed[name, "exp_avg"] for name in shapes) and sum(changed[name, "value"] for name in shapes) > 10
    summary, rows, ratio_rows = replay(recording, tmp_path, threads=2, block_steps=3)

    assert summary["bitwise_match"] and summary["not_replayed"] == {} and summary["steps"] == STEPS
    assert list(summary["tensors"]) == list(shapes)
    for name, tensor in summary["tensors"].items():
        assert tensor["bitwise_match"] and tensor["first_mismatch_step"] is None, (name, tensor)
        assert set(tensor["total_mismatches"].values()) == {0} and tensor["steps"] == STEPS
        assert tensor["shape"] == list(shapes[name]) and (tensor["rows"], tensor["columns"]) == row_shape(shapes[name])
        assert tensor["elements"] == np.prod(shapes[name])
    # the table: every tensor's steps, the embedding's first, in the model's order; no element differs
    assert [(row["tensor"], int(row["step"])) for row in rows] == [(name, step) for name in shapes
                                                                   for step in range(1, STEPS + 1)]
    mismatch_columns = [column for column in rows[0] if column.endswith("_mismatches")]
    assert len(mismatch_columns) == (3 if rule in ("bf16", "stochastic_rounding") else 4)
    assert all(row[column] == "0" for row in rows for column in mismatch_columns)
    if rule == "bf16":
        assert list(rows[0]) == ["tensor", "step", *COUNT_COLUMNS, "freeze_agreement", "elements"]
        for name, tensor in summary["tensors"].items():
            assert tensor["freeze_criterion"]["disagreements"] == 0, name
        assert summary["freeze_criterion"]["disagreements"] == 0
        assert summary["freeze_criterion"]["elements"] == STEPS * sum(int(np.prod(s)) for s in shapes.values())
        # every element of every tensor in one bin of the ratio histogram, every step
        assert [(row["tensor"], int(row["step"])) for row in ratio_rows] == [(row["tensor"], int(row["step"]))
                                                                             for row in rows]
        for ratio_row, row in zip(ratio_rows, rows):
            assert sum(int(ratio_row[column]) for column in RATIO_COLUMNS) == int(row["elements"])
    else:
        assert summary["freeze_criterion"]["applies"] is False and ratio_rows == []


def test_a_tensor_whose_updates_vanish_is_predicted_frozen_at_every_element(data, tmp_path):
    """The oracle: the final layer norm's weight starts at 1.0, where half the bf16 spacing is 2^-9 below and 2^-8
    above. AdamW moves it by lr · m̂/(√v̂ + ε), and with beta1 0.9, beta2 0.999 |m̂/√v̂| stays below 10, so at lr
    1e-6 every update is below 1e-5, far under half a spacing: every element stays put at every step, although
    most updates are not zero."""
    name = "transformer.ln_f.weight"
    recording = trained_recording(data, tmp_path, all_tensor_settings(learning_rate=1e-6))
    with h5py.File(recording) as handle:
        values = read_steps(handle[RecordLayout.of_file(handle).params[name].paths["value"]]).astype(np.float32)
    assert (values == 1.0).all()  # observed, from the recording alone
    summary, rows, ratio_rows = replay(recording, tmp_path)

    tensor = summary["tensors"][name]
    elements = tensor["elements"]
    criterion = tensor["freeze_criterion"]
    assert tensor["bitwise_match"]
    assert criterion["predicted_frozen"] == criterion["observed_frozen"] == STEPS * elements
    assert criterion["disagreements"] == 0 and criterion["agreement"] == 1.0
    for row in (row for row in rows if row["tensor"] == name):
        assert int(row["predicted_frozen"]) == int(row["observed_frozen"]) == int(row["replay_frozen"]) == elements
    # every update below half a spacing (ratio < 1: the negative bins), most of them not zero (the first bin
    # also takes a zero update, or one the float32 sum with 1.0 rounds away)
    counts = {int(column.removeprefix("log2ratio_")): 0 for column in RATIO_COLUMNS}
    for row in (row for row in ratio_rows if row["tensor"] == name):
        for column in RATIO_COLUMNS:
            counts[int(column.removeprefix("log2ratio_"))] += int(row[column])
    assert sum(counts.values()) == STEPS * elements
    assert sum(count for edge, count in counts.items() if edge >= 0) == 0
    assert counts[min(counts)] < STEPS * elements / 2
    # tensors that do move at this rate are not all frozen: the criterion tells them apart
    assert any(t["freeze_criterion"]["predicted_frozen"] < STEPS * t["elements"] for t in summary["tensors"].values())


def test_a_tampered_value_in_a_later_tensor_is_found_by_tensor_and_step(bf16_recording, tmp_path):
    copy = tmp_path / "recording.h5"
    shutil.copy(bf16_recording, copy)
    with h5py.File(copy, "r+") as handle:
        dataset = handle[RecordLayout.of_file(handle).params[LATER].paths["value"]]
        values = read_steps(dataset, 5, 6)
        values[0, 0, :3] = (values[0, 0, :3].astype(np.float32) * 1.5).astype(BFLOAT16)  # step 5
        rewrite_steps(dataset, 5, values.view(np.uint16))
    summary, rows, _ = replay(copy, tmp_path)

    assert not summary["bitwise_match"] and summary["steps_with_mismatches"] == 2
    tampered = summary["tensors"][LATER]
    assert not tampered["bitwise_match"] and tampered["first_mismatch_step"] == 5
    assert all(tensor["bitwise_match"] for name, tensor in summary["tensors"].items() if name != LATER)
    mismatches = {int(row["step"]): int(row["W_mismatches"]) for row in rows if row["tensor"] == LATER}
    assert mismatches[5] == 3  # step 5 predicted from 4 no longer matches
    assert mismatches[6] > 0   # and step 6 starts from the tampered value
    assert all(count == 0 for step, count in mismatches.items() if step not in (5, 6))
    assert all(row["W_mismatches"] == "0" for row in rows if row["tensor"] != LATER)


def test_every_tensor_of_a_stream_replays_as_of_its_recording(bf16_recording, tmp_path):
    """The replay reads each tensor's rows from the stream's segments as from recording.h5's chunks: the same
    tables and summary."""
    outputs = {}
    for label, source in (("stream", Path(bf16_recording).parent / "stream"), ("recording", bf16_recording)):
        (tmp_path / label).mkdir()
        summary, rows, ratio_rows = replay(source, tmp_path / label, threads=2, block_steps=4)
        summary.pop("provenance")  # names the file read
        outputs[label] = summary, rows, ratio_rows
    assert outputs["stream"] == outputs["recording"]
    assert len(outputs["stream"][0]["tensors"]) == 16 and outputs["stream"][0]["bitwise_match"]


@pytest.fixture(scope="module")
def stochastic_recording(data, tmp_path_factory):
    return trained_recording(data, tmp_path_factory.mktemp("sr_all"), all_tensor_settings("stochastic_rounding"))


def test_stochastic_rounding_replays_a_later_tensor_only_after_the_earlier_tensors_draws(
        stochastic_recording, tmp_path, monkeypatch):
    """Each parameter's rounding bits follow those the parameters before it drew from the step's seed: without
    drawing them first, the embedding (first) still matches and every later tensor differs."""
    monkeypatch.setattr("thimble.analysis.replay.rounding_draws",
                        lambda attrs, params: ({param.name: () for param in params}, {}))
    summary, _, _ = replay(stochastic_recording, tmp_path)
    assert summary["tensors"][EMBEDDING]["bitwise_match"]
    later = {name: tensor["bitwise_match"] for name, tensor in summary["tensors"].items() if name != EMBEDDING}
    assert len(later) == 15 and not any(later.values()), later


def test_stochastic_rounding_without_the_model_settings_replays_the_embedding_and_names_the_rest(
        stochastic_recording, tmp_path):
    copy = tmp_path / "recording.h5"
    shutil.copy(stochastic_recording, copy)
    with h5py.File(copy, "r+") as handle:
        del handle.attrs["n_layers"]
        names = list(RecordLayout.of_file(handle).params)
    summary, rows, _ = replay(copy, tmp_path)
    assert list(summary["tensors"]) == [EMBEDDING] and summary["bitwise_match"]
    assert list(summary["not_replayed"]) == names[1:]
    assert all("lacks the attributes n_layers" in why for why in summary["not_replayed"].values())
    assert {row["tensor"] for row in rows} == {EMBEDDING}


def test_the_draws_before_each_parameter_are_the_parameters_before_it_in_the_model():
    model = {"vocab_size": 30, "hidden_dim": 4, "n_layers": 2, "n_heads": 2, "max_seq_len": 6}
    shapes = parameter_shapes(model)
    names = list(shapes)

    class Param:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    params = [Param(EMBEDDING, shapes[EMBEDDING]), Param(names[5], shapes[names[5]]),
              Param(names[-1], shapes[names[-1]]), Param(names[4], (9, 9))]
    before, not_replayed = rounding_draws({**model, "update_rule": "stochastic_rounding"}, params)
    assert before == {EMBEDDING: (), names[5]: tuple(shapes[name] for name in names[:5]),
                      names[-1]: tuple(shapes.values())[:-1]}
    assert list(not_replayed) == [names[4]] and "shape [4, 12]" in not_replayed[names[4]]
    assert "[9, 9]" in not_replayed[names[4]]


def test_a_recording_of_the_old_layout_replays_as_its_embedding(recorded, tmp_path):
    """A file written before params/ (the embedding alone, at the root): the same tables and summary as the same
    recording in today's layout, whose one tensor is the embedding."""
    rechunk_stream(recorded, tmp_path / "recording.h5", 7, 2**31)
    old = tmp_path / "old.h5"
    shutil.copy(tmp_path / "recording.h5", old)
    with h5py.File(old, "r+") as handle:
        del handle["params"]  # the root names are hard links: the embedding's datasets stay
        del handle.attrs["recorded_params"]
        assert list(RecordLayout.of_file(handle).params) == [EMBEDDING]
        assert RecordLayout.of_file(handle).params[EMBEDDING].paths["value"] == "W"
    outputs = {}
    for label, source in (("new", tmp_path / "recording.h5"), ("old", old)):
        (tmp_path / label).mkdir()
        summary, rows, ratio_rows = replay(source, tmp_path / label)
        summary.pop("provenance")  # names the file read and its attributes
        outputs[label] = summary, rows, ratio_rows
    assert outputs["old"] == outputs["new"]
    summary, rows, _ = outputs["old"]
    assert summary["bitwise_match"] and list(summary["tensors"]) == [EMBEDDING] and summary["not_replayed"] == {}
    assert summary["tensors"][EMBEDDING]["total_mismatches"] == summary["total_mismatches"]
    assert summary["tensors"][EMBEDDING]["freeze_criterion"]["elements"] == summary["freeze_criterion"]["elements"]
    assert {row["tensor"] for row in rows} == {EMBEDDING} and len(rows) == summary["steps"]
