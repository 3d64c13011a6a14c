"""The freeze stage over every recorded tensor: a synthetic recording whose frozen steps are known by
construction, and a tiny real training recording every tensor against one recording the embedding alone."""

import csv
import json

import h5py
import numpy as np
import pytest
from conftest import run_train, tiny_settings, write_recording

from thimble.analysis.delta_w import write_delta_w_lattice
from thimble.analysis.freeze import analyse
from thimble.outputs import FREEZE_OUTPUTS
from thimble.record.codec import compress_shuffled
from thimble.record.format import RecordLayout, create_checked_array, create_tensor_dataset
from thimble.record.rechunk import rechunk_stream
from thimble.sizes import EMBEDDING

# -- a synthetic recording: five tensors, 1-D and 2-D, moving at known steps -----------------------------

T = 12
#: every value starts at 0x3F14 (0.578125) and moves up one lattice step at a time: it stays in [0.5, 1)
START = 0x3F14
EMBEDDING_DEAD = np.array([True, False, False, True])
LN_GAIN, LN_BIAS = "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias"
ATTENTION, MLP_BIAS = "transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.bias"
#: per tensor: its shape, and the (step, element index) moves; everything else stays put
MOVES = {
    # dead rows 0 and 3 move at step 1 only; live row 1 at steps 1-3, live row 2 at steps 1 and 6
    EMBEDDING: ((4, 3), [(1, (0, 0)), (1, (3, 2)), (1, (1, 1)), (2, (1, 1)), (3, (1, 0)), (1, (2, 2)),
                         (6, (2, 1))]),
    LN_GAIN: ((5,), [(1, (2,)), (2, (2,))]),                             # frozen from step 3 on
    LN_BIAS: ((5,), []),                                                 # never moves
    ATTENTION: ((3, 6), [(step, (0, 4)) for step in range(1, T + 1)]),   # moves at every step
    MLP_BIAS: ((6,), [(step, (5,)) for step in range(7, T + 1)]),        # frozen at 1-6, then thaws
}
#: the known answer: per tensor, the steps at which none of its rows moved (group all), and its verdict
GLOBALLY_FROZEN = {EMBEDDING: {4, 5, *range(7, T + 1)}, LN_GAIN: set(range(3, T + 1)),
                   LN_BIAS: set(range(1, T + 1)), ATTENTION: set(), MLP_BIAS: set(range(1, 7))}
VERDICTS = {EMBEDDING: "stabilised", LN_GAIN: "stabilised", LN_BIAS: "stabilised", ATTENTION: "never frozen",
            MLP_BIAS: "thawing"}
#: per tensor: its freeze cycles of group all as (kind, start, end, thawed)
CYCLES = {
    EMBEDDING: [("not yet frozen", 1, 3, None), ("freeze", 4, 5, True), ("thaw", 6, 6, None),
                ("freeze", 7, T, False)],
    LN_GAIN: [("not yet frozen", 1, 2, None), ("freeze", 3, T, False)],
    LN_BIAS: [("freeze", 1, T, False)],
    ATTENTION: [("not yet frozen", 1, T, None)],
    MLP_BIAS: [("freeze", 1, 6, True), ("thaw", 7, T, None)],
}
#: each tensor's exp_avg_sq, constant: 2^-k as bf16 bits
VARIANCE_BITS = {EMBEDDING: 0x3C00, LN_GAIN: 0x3B80, LN_BIAS: 0x3B00, ATTENTION: 0x3A80, MLP_BIAS: 0x3A00}


def values_of(shape, moves) -> np.ndarray:
    bits = np.full((T + 1, *shape), START, np.uint16)
    for step, index in moves:
        bits[step:][(slice(None), *index)] += 1
    return bits


def write_params_recording(path, tensors: dict[str, dict[str, np.ndarray]], dead_mask, rows: int = 5) -> None:
    """recording.h5 as thimble writes it: each parameter's datasets (``{key: (T+1, *shape) bf16 bits}``)
    under params/<name>/ in checksummed chunks of ``rows`` steps, the embedding's also at the root under the
    seed's names, and the layout's attributes."""
    layout = RecordLayout.of_parameters_each({name: (datasets["value"].shape[1:], dict.fromkeys(datasets, "bfloat16"))
                                              for name, datasets in tensors.items()})
    with h5py.File(path, "w") as out:
        for name, datasets in tensors.items():
            for key, bits in datasets.items():
                dataset = create_tensor_dataset(out, layout.params[name].paths[key], bits.shape, rows, "bfloat16", 1)
                for start in range(0, bits.shape[0], rows):
                    chunk = np.zeros((rows, *bits.shape[1:]), np.uint16)
                    chunk[: min(rows, bits.shape[0] - start)] = bits[start: start + rows]
                    dataset.id.write_direct_chunk((start, *(0,) * (bits.ndim - 1)),
                                                  b"".join(compress_shuffled(chunk, 1, 1)), 0)
        layout.link_aliases(out)
        create_checked_array(out, "losses", np.linspace(5, 4, T + 1).astype(np.float32))
        create_checked_array(out, "dead_mask", np.asarray(dead_mask, bool))
        out.attrs.update({"storage_dtype": "bfloat16", "update_rule": "bf16", "learning_rate": 1e-3,
                          "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "weight_decay": 0.0,
                          **layout.attrs()})


def outputs_in(directory) -> dict[str, str]:
    return {key: str(directory / file) for key, file in FREEZE_OUTPUTS.items()}


def read_rows(path) -> list[dict[str, str]]:
    """A table's rows as the text of each field (empty for a missing value)."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def of_tensor(rows: list[dict], name: str) -> list[dict]:
    return [row for row in rows if row["tensor"] == name]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The synthetic recording, its ΔW′ (the lattice stage's) and the freeze stage's outputs, with a
    freeze_drivers.json giving two tensors' onsets."""
    root = tmp_path_factory.mktemp("synthetic")
    order = [LN_GAIN, EMBEDDING, LN_BIAS, ATTENTION, MLP_BIAS]  # the file's order; the embedding comes first
    tensors = {name: {"value": values_of(*MOVES[name]),
                      "exp_avg_sq": np.full((T + 1, *MOVES[name][0]), VARIANCE_BITS[name], np.uint16)}
               for name in order}
    write_params_recording(root / "recording.h5", tensors, EMBEDDING_DEAD)
    write_delta_w_lattice(str(root / "recording.h5"), str(root / "delta.h5"))
    drivers = {"tensors": {EMBEDDING: {"all": {"onset_step": 4, "driver": "spacing"}},
                           LN_GAIN: {"all": {"onset_step": 3, "driver": "statistics"}}}}
    (root / "drivers.json").write_text(json.dumps(drivers))
    settings = tiny_settings()
    # windows of one step: the last half holds six, enough for a trend
    settings["analysis"] = {**settings["analysis"], "trend_window_steps": 1}
    summary = analyse(str(root / "recording.h5"), settings, outputs_in(root), delta_path=str(root / "delta.h5"),
                      drivers_path=str(root / "drivers.json"))
    return root, summary


def test_every_tensor_has_its_rows_in_every_table_the_embedding_first(synthetic):
    root, _ = synthetic
    expected = [EMBEDDING, LN_GAIN, LN_BIAS, ATTENTION, MLP_BIAS]
    for key in ("freeze", "cycles", "classes", "lattice_positions", "variance"):
        rows = read_rows(root / FREEZE_OUTPUTS[key])
        assert list(rows[0])[0] == "tensor"
        assert list(dict.fromkeys(row["tensor"] for row in rows)) == expected, key
    freeze = read_rows(root / FREEZE_OUTPUTS["freeze"])
    for name in expected:
        assert [int(row["step"]) for row in of_tensor(freeze, name)] == list(range(1, T + 1))
    # the token outputs are the embedding's tokens
    tokens = read_rows(root / FREEZE_OUTPUTS["tokens"])
    assert [row["tensor"] for row in tokens] == [EMBEDDING] * 4
    assert [row["group"] for row in tokens] == ["dead", "live", "live", "dead"]
    assert [int(row["last_moved_step"]) for row in tokens] == [1, 3, 6, 1]
    with h5py.File(root / FREEZE_OUTPUTS["token_steps"]) as handle:
        assert handle["max_abs"].shape == (T + 1, 4) and "note" not in handle.attrs


def test_each_tensors_freeze_rows_match_the_moves_it_was_built_with(synthetic):
    root, _ = synthetic
    freeze = read_rows(root / FREEZE_OUTPUTS["freeze"])
    for name, (shape, moves) in MOVES.items():
        rows = of_tensor(freeze, name)
        n_rows, n_columns = shape[0], int(np.prod(shape[1:]))
        moved_rows = [len({index[0] for step, index in moves if step == t}) for t in range(1, T + 1)]
        moved_elements = [sum(step == t for step, _ in moves) for t in range(1, T + 1)]
        assert [int(row["all_moved_tokens"]) for row in rows] == moved_rows, name
        np.testing.assert_allclose([float(row["all_frozen_element_share"]) for row in rows],
                                   [1 - moved / (n_rows * n_columns) for moved in moved_elements], err_msg=name)
        assert {int(row["step"]) for row in rows if row["all_globally_frozen"] == "True"} == GLOBALLY_FROZEN[name]
        # one lattice step: every move is solid
        assert [int(row["all_phase_solid"]) for row in rows] == moved_rows
        if name != EMBEDDING:  # no token groups: their columns are empty
            assert all(row[column] == "" for row in rows for column in row if column.startswith(("dead_", "live_")))
    embedding = of_tensor(freeze, EMBEDDING)
    assert [int(row["dead_moved_tokens"]) for row in embedding] == [2] + [0] * (T - 1)
    assert {int(row["step"]) for row in embedding if row["dead_globally_frozen"] == "True"} == set(range(2, T + 1))
    assert [int(row["live_moved_tokens"]) for row in embedding][:6] == [2, 1, 1, 0, 0, 1]


def test_each_tensors_cycles_verdict_and_summary_entry_are_the_known_answer(synthetic):
    root, summary = synthetic
    cycles = read_rows(root / FREEZE_OUTPUTS["cycles"])
    for name, expected in CYCLES.items():
        rows = [row for row in of_tensor(cycles, name) if row["group"] == "all"]
        assert [(row["kind"], int(row["start"]), int(row["end"]), row["thawed"]) for row in rows] == \
            [(kind, start, end, "" if thawed is None else str(thawed)) for kind, start, end, thawed in expected]
    assert {row["group"] for row in of_tensor(cycles, EMBEDDING)} == {"dead", "live", "all"}
    assert {row["group"] for row in of_tensor(cycles, ATTENTION)} == {"all"}
    assert summary["question_tensor"] == EMBEDDING and list(summary["tensors"]) == list(MOVES)
    for name, entry in summary["tensors"].items():
        frozen = GLOBALLY_FROZEN[name]
        shape = MOVES[name][0]
        assert (entry["rows"], entry["columns"]) == (shape[0], int(np.prod(shape[1:])))
        assert entry["verdict"] == VERDICTS[name] == entry["verdicts"]["all"]["global_freeze"], name
        assert entry["global_freeze_share"] == pytest.approx(len(frozen) / T)
        assert entry["first_global_freeze_step"] == (min(frozen) if frozen else None)
        # the last window is the last step
        last_moves = sum(step == T for step, _ in MOVES[name][1])
        assert entry["frozen_element_share_last_window"] == pytest.approx(1 - last_moves / np.prod(shape))
    assert summary["tensors"][EMBEDDING]["groups"] == ["dead", "live", "all"]
    assert summary["tensors"][EMBEDDING]["verdicts"]["dead"]["global_freeze"] == "stabilised"
    assert summary["tensors"][ATTENTION]["groups"] == ["all"]
    # onsets and drivers from freeze_drivers.json's tensors, null for the tensors it does not give
    assert (summary["tensors"][EMBEDDING]["onset_step"], summary["tensors"][EMBEDDING]["driver"]) == (4, "spacing")
    assert (summary["tensors"][LN_GAIN]["onset_step"], summary["tensors"][LN_GAIN]["driver"]) == (3, "statistics")
    assert summary["tensors"][ATTENTION]["onset_step"] is None and summary["tensors"][ATTENTION]["driver"] is None
    # the top level is the embedding's, as it always was
    assert summary["verdict"] == summary["tensors"][EMBEDDING]["verdict"]
    assert set(summary["verdicts"]) == {"dead", "live", "all"} and summary["drivers"]["tensors"]


def test_each_tensors_variance_and_lattice_positions(synthetic):
    root, _ = synthetic
    variance = read_rows(root / FREEZE_OUTPUTS["variance"])
    # another tensor's group comes in beside the embedding's, before the bias corrections every tensor has
    statistics = ("mean", "median", "p10", "p90", "changed_share")
    assert list(variance[0]) == ["tensor", "step", *(f"{group}_{statistic}" for group in ("dead", "live", "all")
                                                     for statistic in statistics),
                                 "bias_correction1", "bias_correction2"]
    for name, bits in VARIANCE_BITS.items():
        value = float(np.array([bits << 16], np.uint32).view(np.float32)[0])  # a power of two: exact
        rows = of_tensor(variance, name)
        assert len(rows) == T + 1
        columns = ("dead_mean", "live_mean") if name == EMBEDDING else ("all_mean",)
        for column in columns:
            assert {float(row[column]) for row in rows} == {value}, (name, column)
            assert {float(row[column.replace("mean", "changed_share")]) for row in rows} == {0.0}
        absent = ("all_",) if name == EMBEDDING else ("dead_", "live_")
        assert all(row[column] == "" for row in rows for column in row if column.startswith(absent))
    positions = read_rows(root / FREEZE_OUTPUTS["lattice_positions"])
    # no value sits at a power of two (all lie in (0.5, 1)): every k column, if any, is 0 where anything is frozen
    for row in positions:
        assert float(row["all_at_power_of_two_share"] or 0) == 0.0
    gain = of_tensor(positions, LN_GAIN)
    assert [int(row["all_frozen_elements"]) for row in gain] == [4, 4] + [5] * (T - 2)


def test_a_recording_without_the_embedding_has_empty_token_outputs_and_its_first_tensor_on_top(tmp_path):
    tensors = {name: {"value": values_of(*MOVES[name]),
                      "exp_avg_sq": np.full((T + 1, *MOVES[name][0]), VARIANCE_BITS[name], np.uint16)}
               for name in (LN_GAIN, MLP_BIAS)}
    write_params_recording(tmp_path / "recording.h5", tensors, EMBEDDING_DEAD)
    write_delta_w_lattice(str(tmp_path / "recording.h5"), str(tmp_path / "delta.h5"))
    settings = tiny_settings()
    settings["analysis"] = {**settings["analysis"], "trend_window_steps": 1}
    summary = analyse(str(tmp_path / "recording.h5"), settings, outputs_in(tmp_path),
                      delta_path=str(tmp_path / "delta.h5"))
    assert summary["question_tensor"] == LN_GAIN and summary["verdict"] == "stabilised"
    assert set(summary["verdicts"]) == {"all"} and list(summary["tensors"]) == [LN_GAIN, MLP_BIAS]
    assert summary["tensors"][MLP_BIAS]["verdict"] == "thawing"
    assert summary["tensors"][LN_GAIN]["onset_step"] is None  # no drivers file
    with open(tmp_path / FREEZE_OUTPUTS["tokens"], newline="") as handle:
        header, *rows = list(csv.reader(handle))
    assert header[:3] == ["tensor", "token", "group"] and rows == []
    with h5py.File(tmp_path / FREEZE_OUTPUTS["token_steps"]) as handle:
        assert handle["max_abs"].shape == (T + 1, 0) and handle["dead_mask"].shape == (0,)
        assert "not recorded" in handle.attrs["note"]


def test_a_recording_and_delta_w_written_before_params_read_as_the_embedding_alone(synthetic, tmp_path):
    """A recording with the embedding alone at the root under the seed's names, and a ΔW′ file with its
    lattice at the root: the embedding's tables as from the new layout."""
    root, _ = synthetic
    shape, moves = MOVES[EMBEDDING]
    write_recording(tmp_path / "recording.h5", {"W": values_of(shape, moves),
                                                "variance_W": np.full((T + 1, *shape), VARIANCE_BITS[EMBEDDING],
                                                                      np.uint16)}, EMBEDDING_DEAD, rows=5)
    with h5py.File(tmp_path / "recording.h5", "a") as handle:  # the synthetic recording's losses
        del handle["losses"]
        create_checked_array(handle, "losses", np.linspace(5, 4, T + 1).astype(np.float32))
    write_delta_w_lattice(str(tmp_path / "recording.h5"), str(tmp_path / "lattice.h5"))
    with h5py.File(tmp_path / "lattice.h5") as source, h5py.File(tmp_path / "delta.h5", "w") as old:
        old.attrs.update(dict(source.attrs))
        old.copy(source["delta_w_lattice"], "delta_w_lattice")
        assert "params" not in old
    settings = tiny_settings()
    settings["analysis"] = {**settings["analysis"], "trend_window_steps": 1}
    out = tmp_path / "out"
    out.mkdir()
    summary = analyse(str(tmp_path / "recording.h5"), settings, outputs_in(out), delta_path=str(tmp_path / "delta.h5"))
    assert list(summary["tensors"]) == [EMBEDDING] and summary["question_tensor"] == EMBEDDING
    for key in ("freeze", "cycles", "tokens", "classes", "lattice_positions", "variance"):
        alone, beside_others = read_rows(out / FREEZE_OUTPUTS[key]), read_rows(root / FREEZE_OUTPUTS[key])
        assert alone == [{column: row[column] for column in alone[0]} for row in of_tensor(beside_others, EMBEDDING)]


def test_a_delta_w_file_without_a_tensors_lattice_is_refused(synthetic, tmp_path):
    from thimble.errors import DataError

    root, _ = synthetic
    with h5py.File(root / "delta.h5") as source, h5py.File(tmp_path / "delta.h5", "w") as copy:
        for name in source.attrs:
            copy.attrs[name] = source.attrs[name]
        copy.copy(source["params"], "params")
        del copy[f"params/{ATTENTION}"]
    settings = tiny_settings()
    with pytest.raises(DataError, match=f"no ΔW′ of {ATTENTION}.*rerun the lattice stage"):
        analyse(str(root / "recording.h5"), settings, outputs_in(tmp_path), delta_path=str(tmp_path / "delta.h5"))


# -- a tiny real training: every tensor against the embedding alone ----------------------------------------

@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The same tiny training recorded twice, every tensor and the embedding alone, each through rechunk, the
    lattice stage and the freeze stage."""
    results = {}
    for label, settings in (("all", tiny_settings(tensors=["*"])), ("embedding", tiny_settings())):
        root = tmp_path_factory.mktemp(f"trained_{label}")
        run_train(data, root / "stream", settings)
        rechunk_stream(root / "stream", root / "recording.h5", 8, 2**31)
        write_delta_w_lattice(str(root / "recording.h5"), str(root / "delta.h5"))
        summary = analyse(str(root / "recording.h5"), settings, outputs_in(root), delta_path=str(root / "delta.h5"))
        results[label] = (root, summary)
    return results


def test_the_embeddings_rows_of_every_table_equal_those_of_an_embedding_only_run(trained):
    (every, every_summary), (alone, alone_summary) = trained["all"], trained["embedding"]
    for key in ("freeze", "cycles", "tokens", "classes", "lattice_positions", "variance"):
        rows, expected = read_rows(every / FREEZE_OUTPUTS[key]), read_rows(alone / FREEZE_OUTPUTS[key])
        embedding = of_tensor(rows, EMBEDDING)
        assert len(embedding) == len(expected) > 0, key
        for row, wanted in zip(embedding, expected):
            # the same text in every column of the embedding-only table
            assert {column: row[column] for column in wanted} == wanted, key
            # and the columns other tensors add: empty, or 0 (a k at which none of its frozen elements sits)
            assert all(row[column] in ("", "0.0") for column in set(row) - set(wanted)), key
        assert len(rows) > len(embedding) or key == "tokens"
    with h5py.File(every / FREEZE_OUTPUTS["token_steps"]) as a, h5py.File(alone / FREEZE_OUTPUTS["token_steps"]) as b:
        for name in b:
            np.testing.assert_array_equal(a[name][...], b[name][...])
    # the summary's top level is the embedding's either way
    ignored = ("provenance", "tensors")
    assert {key: value for key, value in every_summary.items() if key not in ignored} == \
        {key: value for key, value in alone_summary.items() if key not in ignored}
    assert every_summary["tensors"][EMBEDDING] == alone_summary["tensors"][EMBEDDING]
    assert list(alone_summary["tensors"]) == [EMBEDDING]


def test_every_tensor_has_rows_and_layer_norm_gains_never_move(trained):
    from thimble.sizes import parameter_shapes

    root, summary = trained["all"]
    names = list(parameter_shapes(tiny_settings(tensors=["*"])["model"]))
    assert list(summary["tensors"]) == names  # the embedding is the model's first parameter
    freeze = read_rows(root / FREEZE_OUTPUTS["freeze"])
    steps = summary["steps"]
    for name in names:
        assert len(of_tensor(freeze, name)) == steps, name
    # a gain starts at 1.0, where bf16's spacing is 2^-7; AdamW's first updates are about lr = 1e-3, below half
    # of it: rounded away at every step
    gains = [name for name in names if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))]
    assert len(gains) == 3
    for name in gains:
        rows = of_tensor(freeze, name)
        assert all(row["all_globally_frozen"] == "True" and int(row["all_moved_tokens"]) == 0 for row in rows)
        entry = summary["tensors"][name]
        assert entry["global_freeze_share"] == 1.0 and entry["first_global_freeze_step"] == 1
        assert entry["groups"] == ["all"] and entry["columns"] == 1
    # the embedding and the attention's weights keep learning at every step
    assert summary["tensors"][EMBEDDING]["first_global_freeze_step"] is None
