"""The freeze drivers of every recorded tensor: a tiny training recording every parameter, whose embedding's
rows and answer are an embedding-only recording's of the same training, and where every tensor has its answer
(the LayerNorm gains, frozen from the first step, among them); and a synthetic recording of tensors other than
the embedding with known answers (driver spacing, driver v_stall) and rows held to the numpy reference."""

import json

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import run_train, tiny_settings
from test_drivers import BETA2, EPS, adamw_run, values_of
from thimble.analysis import drivers
from thimble.record.codec import compress_shuffled
from thimble.record.format import RecordLayout, create_checked_array, create_tensor_dataset, param_dataset
from thimble.sizes import EMBEDDING, parameter_shapes
from thimble.update_rules import STATE_KEYS, recorded_keys

#: keys of each group's answer in freeze_drivers.json (its top level and ``tensors``)
ANSWER_KEYS = {"onset_step", "peak_step", "drop_bits", "spacing_bits", "statistics_bits", "v_stall_bits",
               "residual_bits", "driver", "claim_supported", "v_stall_bits_last", "answer"}
LAYER_NORM_GAINS = ("transformer.h.0.ln_1.weight", "transformer.h.0.ln_2.weight", "transformer.ln_f.weight")


def drivers_of_recording(recording, directory, threads=2, block_rows=5):
    directory.mkdir()
    result = drivers.write_drivers(str(recording), str(directory / "freeze_drivers.csv"),
                                   str(directory / "freeze_drivers.json"), threads=threads, block_rows=block_rows)
    assert json.loads((directory / "freeze_drivers.json").read_text()) == json.loads(json.dumps(result))
    return pd.read_csv(directory / "freeze_drivers.csv"), result


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The tiny training recorded twice, every parameter and the embedding alone, rechunked, and the drivers
    of each: {"all": (table, result), "embedding": (table, result)}, and the settings."""
    from thimble.record.rechunk import rechunk_stream

    root = tmp_path_factory.mktemp("drivers_tensors")
    settings = {"all": tiny_settings(tensors=["*"]), "embedding": tiny_settings()}
    out = {}
    for name, experiment in settings.items():
        stream = run_train(data, root / f"{name}_stream", experiment)
        recording = root / f"{name}.h5"
        rechunk_stream(stream, recording, 8, 2**31)
        out[name] = drivers_of_recording(recording, root / name)
        out[f"{name}_recording"] = recording
    out["settings"] = settings["all"]
    return out


def test_the_embedding_answers_as_in_an_embedding_only_recording(trained):
    from thimble.record.reader import read_steps

    # the same training: recording every parameter does not change the embedding's bits
    with h5py.File(trained["all_recording"]) as every, h5py.File(trained["embedding_recording"]) as alone:
        for name in ("W", "grad_W", "momentum_W", "variance_W"):
            assert np.array_equal(read_steps(every[name]).view(np.uint16), read_steps(alone[name]).view(np.uint16))
    (table, result), (alone_table, alone_result) = trained["all"], trained["embedding"]
    assert alone_table["tensor"].unique().tolist() == [EMBEDDING]
    embedding_rows = table[table["tensor"] == EMBEDDING].reset_index(drop=True)
    pd.testing.assert_frame_equal(embedding_rows, alone_table, check_exact=True)
    assert table["tensor"].iloc[: len(alone_table)].eq(EMBEDDING).all()  # the embedding's rows first
    top = {key: value for key, value in result.items() if key != "tensors"}
    alone_top = {key: value for key, value in alone_result.items() if key != "tensors"}
    assert top == alone_top and top["question_tensor"] == EMBEDDING
    assert set(top) >= {"applies", "update_rule", "inputs_exact", "weight_decay", "definition", "dead", "live", "all"}
    assert result["tensors"][EMBEDDING] == {group: top[group] for group in ("dead", "live", "all")}
    assert alone_result["tensors"] == {EMBEDDING: result["tensors"][EMBEDDING]}


def test_every_tensor_has_its_rows_and_its_answer_in_model_order(trained):
    table, result = trained["all"]
    shapes = parameter_shapes(trained["settings"]["model"])
    steps = trained["settings"]["training"]["steps"]
    assert list(result["tensors"]) == list(shapes)  # the embedding first, as the model names its parameters
    assert table["tensor"].drop_duplicates().tolist() == list(shapes)
    assert table.columns.tolist() == ["tensor", "step", "group", *drivers.COLUMNS]
    for name in shapes:
        groups = ["dead", "live", "all"] if name == EMBEDDING else ["all"]
        assert list(result["tensors"][name]) == groups
        assert all(set(answer) == ANSWER_KEYS for answer in result["tensors"][name].values())
        rows = table[table["tensor"] == name]
        assert rows["step"].tolist() == np.repeat(np.arange(1, steps + 1), len(groups)).tolist()
        assert rows["group"].tolist() == groups * steps
    # a tensor's group all is every element of it: its frozen share and median |W| are the recorded values'
    from thimble.record.reader import read_steps

    with h5py.File(trained["all_recording"]) as handle:
        for name in list(shapes)[1:]:
            values = read_steps(handle[param_dataset(name, "value")])
            bits = values.view(np.uint16).reshape(steps + 1, -1)
            rows = table[table["tensor"] == name]
            stayed = (bits[1:] == bits[:-1]) | (((bits[1:] | bits[:-1]) & 0x7FFF) == 0)
            np.testing.assert_array_equal(rows["frozen_share"], stayed.mean(axis=1), err_msg=name)
            np.testing.assert_array_equal(rows["median_abs_w"],
                                          np.median(np.abs(values[:-1].astype(np.float64).reshape(steps, -1)), axis=1))


def test_layer_norm_gains_are_frozen_from_the_first_step_with_no_drop_to_split(trained):
    # The gains start at 1.0, a binade's bottom: half the bf16 spacing toward a move is 2^-8 upward and 2^-9
    # downward (toward zero the spacing halves), while AdamW's first update is lr·m̂/(√v̂+ε) = 1e-3 ≈ 2^-9.97
    # in size (m̂/√v̂ = ±1 at step 1, to bf16's rounding of the moments). Every gain stays at 1.0 at step 1,
    # so more than half of the tensor is frozen at the first step: the onset is step 1, the peak (the largest
    # mean ratio from step 1 to the onset) is step 1 too, and with the onset at the peak there is no drop to
    # split: the decomposition names no driver (not spacing) and neither supports nor refutes the lab's claim.
    table, result = trained["all"]
    lr = trained["settings"]["training"]["learning_rate"]
    for name in LAYER_NORM_GAINS:
        answer = result["tensors"][name]["all"]
        assert answer["onset_step"] == 1 and answer["peak_step"] == 1, (name, answer)
        assert answer["driver"] is None and answer["claim_supported"] is None
        assert answer["drop_bits"] == answer["spacing_bits"] == answer["statistics_bits"] == 0
        assert answer["v_stall_bits"] == answer["residual_bits"] == 0
        assert "already at step 1 (no drop to split)" in answer["answer"]
        first = table[(table["tensor"] == name) & (table["step"] == 1)].iloc[0]
        assert first["frozen_share"] == 1.0 and first["median_abs_w"] == 1.0
        # each element's log2(|u|/h) is log2(lr) + 8 upward or + 9 downward: the mean lies between
        assert np.log2(lr) + 8 - 0.01 < first["mean_log2_ratio"] < np.log2(lr) + 9 + 0.01 < 0
        assert -9 <= first["mean_log2_half_spacing"] <= -8


# -- a synthetic recording of tensors other than the embedding --------------------------------------------

def write_params_recording(path, tensors: dict[str, dict[str, np.ndarray]], attrs: dict, rows: int = 8):
    """A rechunked-format recording.h5 holding each parameter of ``tensors`` (name: {seed's role: (T+1, *shape)
    uint16 bf16 bits}) under ``params/<name>/`` as thimble writes them, the embedding not among them."""
    keys = recorded_keys("bf16")
    steps = next(iter(tensors.values()))["W"].shape[0]
    rows = min(rows, steps)
    layout = RecordLayout.of_parameters_each({name: (roles["W"].shape[1:], keys) for name, roles in tensors.items()})
    with h5py.File(path, "w") as out:
        for name, roles in tensors.items():
            for role, bits in roles.items():
                group = out.require_group(param_dataset(name, STATE_KEYS[role]).rsplit("/", 1)[0])
                dataset = create_tensor_dataset(group, STATE_KEYS[role], bits.shape, rows, "bfloat16", 1)
                for start in range(0, bits.shape[0], rows):
                    chunk = np.zeros((rows, *bits.shape[1:]), dtype=np.uint16)
                    chunk[: min(rows, bits.shape[0] - start)] = bits[start: start + rows]
                    dataset.id.write_direct_chunk((start, *[0] * (bits.ndim - 1)),
                                                  b"".join(compress_shuffled(chunk, 1, 1)), 0)
        create_checked_array(out, "losses", np.zeros(steps, np.float32))
        create_checked_array(out, "dead_mask", np.zeros(4, bool))
        out.attrs.update({"storage_dtype": "bfloat16", "update_rule": "bf16", "adam_beta1": 0.9, "adam_beta2": 0.999,
                          "adam_epsilon": 1e-8, "weight_decay": 0.0, **layout.attrs(), **attrs})
    return path


SPACING = "transformer.h.0.ln_1.bias"
STALL = "transformer.h.0.ln_2.bias"
MATRIX = "transformer.h.0.mlp.c_fc.weight"


def test_tensors_other_than_the_embedding_answer_by_construction(tmp_path):
    steps, lr = 24, 2.0**-11.5
    rng = np.random.default_rng(2)
    # SPACING (1-D, 40 values): each value k ∈ 1..8 lattice points below 2^-3 (spacing 2^-11 below, 2^-10 above)
    # climbs one point per step under a constant gradient, |u| = lr = 2^-11.5 above half the spacing below the
    # edge and below it above: it moves at steps 1..k and stays from step k + 1 on. Flat m̂ and exact v̂, so
    # the drop from the peak at step 1 to the onset is the spacing's alone.
    below = rng.integers(1, 9, size=40)
    spacing = adamw_run(2.0**-3 - below * 2.0**-11, np.full((steps + 1, 40), -(2.0**-10)), lr)
    assert (values_of(spacing["W"][-1]) == 2.0**-3).all()  # the trajectory does what the comment says
    # STALL (1-D, 30 values): inside one binade ([2^-4, 2^-3): 128 points, more than the steps) under a constant
    # gradient while the recorded exp_avg_sq is inflated 2^(s·t) times: log2(|u|/h) = 0.5 − s·t/2 falls below 0
    # at a step set by each value's s, with the spacing and the exact statistics flat: driver v_stall
    rate = rng.uniform(0.2, 0.6, size=30)
    inflate = 2.0 ** (rate[None] * np.arange(steps + 1)[:, None])
    stall = adamw_run(np.full(30, 2.0**-4), np.full((steps + 1, 30), -(2.0**-10)), lr, inflate=inflate)
    # MATRIX (2-D, 6 x 4): random, for the rows x columns view against the reference
    matrix = adamw_run(rng.standard_normal((6, 4)) * 0.05, rng.standard_normal((steps + 1, 6, 4)) * 1e-3, lr)
    tensors = {SPACING: spacing, STALL: stall, MATRIX: matrix}
    recording = write_params_recording(tmp_path / "recording.h5", tensors, {"learning_rate": lr})
    table, result = drivers_of_recording(recording, tmp_path / "out", threads=2, block_rows=5)

    assert list(result["tensors"]) == [SPACING, STALL, MATRIX]
    assert all(list(groups) == ["all"] for groups in result["tensors"].values())
    # without the embedding, the top level describes the first recorded tensor, and says so
    assert result["question_tensor"] == SPACING and result["all"] == result["tensors"][SPACING]["all"]
    assert "dead" not in result and "live" not in result

    answer = result["tensors"][SPACING]["all"]
    frozen_from = below + 1  # each value's first step in place
    onset = next(t for t in range(1, steps + 1) if (frozen_from <= t).mean() > 0.5)
    assert answer["onset_step"] == onset > 1 and answer["peak_step"] == 1
    assert answer["driver"] == "spacing" and answer["claim_supported"] is False
    assert answer["spacing_bits"] == pytest.approx(answer["drop_bits"], abs=0.02)
    assert abs(answer["statistics_bits"]) < 0.02 and abs(answer["v_stall_bits"]) < 0.02
    assert abs(answer["residual_bits"]) < 1e-9
    rows = table[table["tensor"] == SPACING]
    np.testing.assert_array_equal(rows["frozen_share"], [(frozen_from <= t).mean() for t in range(1, steps + 1)])

    answer = result["tensors"][STALL]["all"]
    assert answer["driver"] == "v_stall" and answer["claim_supported"] is True
    assert answer["v_stall_bits"] == pytest.approx(answer["drop_bits"], abs=0.02)
    assert abs(answer["spacing_bits"]) < 1e-9 and abs(answer["statistics_bits"]) < 0.02
    assert answer["v_stall_bits_last"] == pytest.approx(rate.mean() * steps / 2, abs=0.02)

    # every tensor's rows against the numpy reference, each element of the tensor in its group all
    hyper = {"lr": lr, "betas": (0.9, BETA2), "eps": EPS, "weight_decay": 0.0}
    for name, bits in tensors.items():
        exact = drivers.exact_ema(values_of(bits["grad_W"][1:]), BETA2)
        rows = table[table["tensor"] == name]
        assert rows["step"].tolist() == list(range(1, steps + 1)) and set(rows["group"]) == {"all"}
        for t in range(1, steps + 1):
            terms = drivers.element_terms(bits["W"][t - 1], bits["momentum_W"][t], bits["variance_W"][t],
                                          exact[t - 1], t, hyper)
            inside = terms["included"]
            row = rows[rows["step"] == t].iloc[0]
            assert row["elements"] == inside.sum()
            for term, column in (("ratio", "mean_log2_ratio"), ("log2_abs_m_hat", "mean_log2_abs_m_hat"),
                                 ("log2_denominator", "mean_log2_denominator"),
                                 ("log2_half_spacing", "mean_log2_half_spacing"),
                                 ("log2_exact_denominator", "mean_log2_exact_denominator")):
                assert row[column] == pytest.approx(terms[term][inside].mean(), abs=1e-9), (name, t, column)
            before, after = bits["W"][t - 1], bits["W"][t]
            assert row["frozen_share"] == ((before == after) | (((before | after) & 0x7FFF) == 0)).mean()
            assert row["median_abs_w"] == np.median(np.abs(values_of(before)))


def test_a_non_finite_value_of_another_tensor_is_named_by_tensor_row_and_column(tmp_path):
    bits = adamw_run(np.full((3, 4), 0.1), np.full((6, 3, 4), 1e-3), lr=1e-3)
    bits["W"][2, 1, 3] = 0x7F80  # +Inf
    recording = write_params_recording(tmp_path / "recording.h5", {MATRIX: bits}, {"learning_rate": 1e-3})
    with pytest.raises(drivers.DataError, match=f"{MATRIX}: value is inf at step 2, row 1, column 3"):
        drivers_of_recording(recording, tmp_path / "out")


def test_a_small_tensor_takes_the_denominators_at_its_magnitudes_with_the_full_tables_bits():
    # a tensor of fewer elements than bf16 has magnitudes forms log2(√v̂+ε) only at the magnitudes its v holds;
    # every column must be bit for bit what the full table gives
    from thimble.analysis.tensors import row_groups
    from thimble.util.workers import WorkerPool

    rng = np.random.default_rng(7)
    bits = adamw_run(rng.standard_normal((5, 3)) * 0.05, rng.standard_normal((10, 5, 3)) * 1e-3, lr=1e-3)
    hyper = {"lr": 1e-3, "betas": (0.9, BETA2), "eps": EPS}
    out = {}
    for at_present in (True, False):
        with WorkerPool(2) as pool:
            analysis = drivers.DriverPass(MATRIX, row_groups(MATRIX, 5, None), 3, hyper, pool, block_rows=4)
            assert analysis.table_at_present  # 15 elements
            analysis.table_at_present = at_present
            flat = {role: values.reshape(len(values), -1) for role, values in bits.items()}
            out[at_present] = [analysis.block(first, flat["W"][first - 1], *(flat[role][first:first + 4] for role in
                                                                              ("W", "momentum_W", "variance_W", "grad_W")))
                               for first in (1, 5)]
    for present, full in zip(out[True], out[False]):
        for column in ("step", *drivers.COLUMNS):
            np.testing.assert_array_equal(present["all"][column], full["all"][column])
    magnitudes = np.unique(bits["variance_W"] & 0x7FFF)
    for c2 in (1 - BETA2, 0.5, 1.0):
        np.testing.assert_array_equal(drivers.denominator_log2_table(c2, EPS, magnitudes),
                                      drivers.denominator_log2_table(c2, EPS)[magnitudes])
