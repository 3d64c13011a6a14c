"""The float16 view of a bf16 recording and its effect (docs/float16.md): the cast against an oracle on every
bf16 bit pattern, the counting on synthetic data with a known answer, the DAG's decision, and the view against
real float16 training, bit for bit."""

import json
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, offline_config, run_snakemake, tiny_settings, write_recording
from thimble.numerics.bf16 import all_bfloat16
from thimble.config import float16_view_of, float16_views, load_config, resolve_config, stage_settings, training_twin
from thimble.analysis.float16_effect import (CHANGED, OVERFLOWED, ZEROED, cast_classes, exponent_bands, json_differences,
                                    lab_answer, row_histograms, step_effect, table_differences, tensor_effect,
                                    variance_curve)
from thimble.analysis.float16_view import float16_bits

FLOAT16_MAX = Fraction(65504)
SMALLEST_SUBNORMAL = Fraction(1, 2 ** 24)


def representable_in_float16(value: Fraction) -> bool:
    """Exactly a float16 value: |x| <= 65504 and a multiple of float16's spacing at x (2^(e-10) in the binade
    2^e, 2^-24 below 2^-14), integer arithmetic only."""
    magnitude = abs(value)
    if magnitude == 0:
        return True
    if magnitude > FLOAT16_MAX:
        return False
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:
        exponent -= 1  # floor(log2 |x|)
    spacing = SMALLEST_SUBNORMAL if exponent < -14 else Fraction(2) ** (exponent - 10)
    return (magnitude / spacing).denominator == 1


@pytest.fixture(scope="module")
def classes():
    return cast_classes()


def test_the_cast_of_every_bf16_pattern_is_numpys_float32_to_float16(classes):
    """The view's cast (the recorder's to_float16_counting) of each of the 65536 bf16 bit patterns against
    numpy's float32 -> float16 astype of the exact float32 value: equal bits, NaN staying NaN."""
    exact32 = all_bfloat16().astype(np.float32)  # bf16 -> float32 is exact
    with np.errstate(over="ignore", invalid="ignore"):
        oracle = exact32.astype(np.float16).view(np.uint16)
    cast = classes["float16_bits"]
    nan = np.isnan(exact32)
    assert nan.sum() == 2 * 127  # both signs, every nonzero mantissa
    np.testing.assert_array_equal(cast[~nan], oracle[~nan])
    assert np.isnan(cast[nan].view(np.float16)).all()
    # the view's bits are what the recorder writes for the same values, and its count is the classification's
    bits, altered = float16_bits(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16))
    np.testing.assert_array_equal(bits, cast)
    assert altered == int(((classes["code"] & CHANGED) != 0).sum())


def test_changed_zeroed_overflowed_of_every_pattern_against_exact_rationals(classes):
    """Each bf16 pattern's class against an independent computation in exact rationals (no float cast):
    changed iff not a float16 value (inf and NaN stay), zeroed iff 0 < |x| <= 2^-25 (half the smallest
    subnormal rounds to even, 0), overflowed iff finite and > 65504 (every finite bf16 above is >= 65536)."""
    with np.errstate(invalid="ignore"):
        values = all_bfloat16().astype(np.float64)
    expected_code = np.zeros(1 << 16, dtype=np.uint8)
    expected_exponent = np.zeros(1 << 16, dtype=np.int16)
    for pattern, value in enumerate(values):
        if not np.isfinite(value):
            continue
        exact = Fraction(float(value))
        if not representable_in_float16(exact):
            expected_code[pattern] |= CHANGED
        if exact != 0 and abs(exact) <= SMALLEST_SUBNORMAL / 2:
            expected_code[pattern] |= ZEROED
        if abs(exact) > FLOAT16_MAX:
            expected_code[pattern] |= OVERFLOWED
        if exact != 0:
            magnitude = abs(exact)
            exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
            expected_exponent[pattern] = exponent - 1 if Fraction(2) ** exponent > magnitude else exponent
    np.testing.assert_array_equal(classes["code"], expected_code)
    np.testing.assert_array_equal(classes["exponent"], expected_exponent)
    # the boundaries the docs quote: subnormals of bf16 (exponent field 0) are all zeroed, ±0 kept
    subnormal = (np.arange(1 << 16) & 0x7F80) == 0
    nonzero = (np.arange(1 << 16) & 0x7FFF) != 0
    assert ((classes["code"][subnormal & nonzero] & ZEROED) != 0).all()
    assert classes["code"][0] == 0 and classes["code"][0x8000] == 0
    assert classes["exponent"].min() == -133 and classes["exponent"].max() == 127


def bf16_bits(values) -> np.ndarray:
    """uint16 bf16 bits of values that bf16 holds exactly (checked)."""
    from thimble.numerics.bf16 import BFLOAT16

    array = np.asarray(values, dtype=np.float64)
    bits = array.astype(np.float32).astype(BFLOAT16)
    assert (bits.astype(np.float64) == array)[np.isfinite(array)].all()
    return bits.view(np.uint16)


def test_counting_on_hand_built_rows_with_a_known_answer(classes):
    # row 0: 1, 1 + 2^-7 (kept: float16 has 10 mantissa bits), 2^-20 (a float16 subnormal: kept),
    # 2^-20 + 2^-27 (not a multiple of 2^-24: changed), 2^-26 and -2^-25 (zeroed), 70000 -> inf, 0, inf, NaN
    row0 = [1.0, 1 + 2 ** -7, 2.0 ** -20, 2.0 ** -20 + 2.0 ** -27, 2.0 ** -26, -(2.0 ** -25), 69632.0, 0.0,
            np.inf, np.nan]
    # row 1: all kept but one zeroed value
    row1 = [0.5, -0.25, 3.0, 2.0 ** -14, 2.0 ** -24, 1.5 * 2.0 ** -25, 0.0, -0.0, 2.0 ** -30, 7.0]
    bits = np.stack([bf16_bits(row0), bf16_bits(row1)]).reshape(2, 5, 2)
    effect = step_effect(row_histograms(bits), classes)
    np.testing.assert_array_equal(effect["values"], [10, 10])
    # row 1: 1.5·2^-25 rounds up to 2^-24 (changed, not zeroed), 2^-30 is zeroed
    np.testing.assert_array_equal(effect["changed"], [4, 2])
    np.testing.assert_array_equal(effect["zeroed"], [2, 1])
    np.testing.assert_array_equal(effect["overflowed"], [1, 0])
    np.testing.assert_array_equal(effect["max_abs_changed"], [69632.0, 1.5 * 2.0 ** -25])
    np.testing.assert_array_equal(effect["max_abs_zeroed"], [2.0 ** -25, 2.0 ** -30])
    # the same over blocks, and the exponent bands of both rows
    per_step, histogram = tensor_effect([(0, bits[:1]), (1, bits[1:])], classes)
    np.testing.assert_array_equal(per_step["step"], [0, 1])
    np.testing.assert_array_equal(per_step["changed"], [4, 2])
    bands = pd.DataFrame(exponent_bands(histogram, classes)).set_index("exponent")
    assert bands.loc[-20].tolist() == [2, 1, 0]  # 2^-20 kept, 2^-20 + 2^-27 changed
    assert bands.loc[-26].tolist() == [1, 1, 1]  # 2^-26 zeroed
    assert bands.loc[-25].tolist() == [2, 2, 1]  # -2^-25 zeroed, 1.5·2^-25 changed (to 2^-24)
    assert bands.loc[-30].tolist() == [1, 1, 1]
    assert bands["values"].sum() == 20 - 5  # zeros (three), inf and NaN have no band
    assert bands.loc[16].tolist() == [1, 1, 0]  # 69632 = 2^16 + 2^12: overflowed (changed), not zeroed


def test_json_and_table_differences_list_every_difference():
    exact = {"experiment": "a", "provenance": {"x": 1}, "verdict": "still cooling", "drivers": {"inputs_exact": True,
             "dead": {"onset_step": 10, "driver": "v_stall"}}, "windows": {"all": {"shares": [0.1, 0.2]}},
             "cycles": [{"start": 1}, {"start": 5}], "same": 1.5, "nan": float("nan")}
    view = {"experiment": "b", "provenance": {"x": 2}, "verdict": "stabilised", "drivers": {"inputs_exact": False,
            "dead": {"onset_step": 12, "driver": "v_stall"}}, "windows": {"all": {"shares": [0.1, 0.3]}},
            "cycles": [{"start": 1}, {"start": 6}], "same": 1.5, "nan": float("nan"), "extra": 0}
    found = {entry["key"]: (entry["exact"], entry["float16"]) for entry in json_differences(exact, view)}
    assert found == {"verdict": ("still cooling", "stabilised"), "drivers.inputs_exact": (True, False),
                     "drivers.dead.onset_step": (10, 12), "windows.all.shares": ([0.1, 0.2], [0.1, 0.3]),
                     "cycles[1].start": (5, 6), "extra": (None, 0)}
    a = pd.DataFrame({"step": [0, 1, 2, 3], "x": [1.0, 2.0, 4.0, np.nan], "y": [1, 1, 1, 1], "s": list("abcd")})
    b = pd.DataFrame({"step": [0, 1, 2, 3], "x": [1.0, 2.0, 3.0, np.nan], "y": [1, 1, 1, 1], "s": list("abzd")})
    differences = table_differences(a, b)
    assert set(differences["differing_columns"]) == {"x", "s"}
    assert differences["differing_columns"]["x"] == {"rows_differing": 1, "first_row": 2, "first_step": 2,
                                                     "max_abs_difference": 1.0, "max_relative_difference": 0.25}
    assert differences["differing_columns"]["s"]["exact"] == "c"


def test_the_lab_answer_from_known_curves_and_drivers():
    steps = np.arange(5)
    exact = pd.DataFrame({"step": steps, "dead_median": [0, 1e-8, 2e-8, 3e-8, 4e-8], "live_median": [0, 1, 2, 3, 4.0]})
    view = exact.copy()
    view.loc[1:2, "dead_median"] = 0.0  # float16 zeroed the small variance
    curves = variance_curve(exact, view, ["dead", "live"])
    assert curves["dead_median"]["steps_differing"] == 2 and curves["dead_median"]["steps_float16_zero_exact_not"] == 2
    assert curves["dead_median"]["max_relative_difference"] == 1.0 and curves["live_median"]["steps_differing"] == 0
    summary = {"verdict": "still cooling", "drivers": {"dead": {"onset_step": 3, "peak_step": 1, "driver": "v_stall",
                                                                "claim_supported": True}}}
    same = lab_answer(summary, summary, {"live_median": curves["live_median"]})
    assert not same["variance_curve_differs"] and not same["onset_differs"] and not same["claim_differs"]
    other = json.loads(json.dumps(summary))
    other["drivers"]["dead"].update(onset_step=4, driver="spacing", claim_supported=False)
    answer = lab_answer(summary, other, curves)
    assert answer["variance_curve_differs"] and answer["onset_differs"] and answer["claim_differs"]
    assert answer["variance_curve_max_relative_difference"] == 1.0
    assert "onset 3 exact vs 4 float16" in answer["answer"]


# -- the DAG's decision ----------------------------------------------------------------------------

def test_a_float16_experiment_with_a_bf16_training_twin_is_a_view():
    experiments = load_config(REPO / "config.yaml")["experiments"]
    assert training_twin(experiments, "thimble_6") == "thimble_7"
    assert training_twin(experiments, "thimble_small_float16") == "thimble_small"
    assert training_twin(experiments, "thimble_7") is None  # bf16: trains
    assert float16_view_of(experiments, "thimble_small") == "thimble_small_float16"
    assert float16_views(experiments) == {"thimble_6": "thimble_7", "thimble_small_float16": "thimble_small",
                                          "thimble_wide_float16": "thimble_wide"}


def test_the_twin_rule_compares_dataset_model_and_training_only():
    config = offline_config()
    mini = config["experiments"]["thimble_mini"]
    config["experiments"].update(
        f16_view={**mini, "record": {"dtype": "float16", "segment_steps": 7}},  # segment length: not the bits
        f16_seed={**mini, "record": {"dtype": "float16"}, "training": {**mini["training"], "seed": 1}},
        f16_trained={**mini, "record": {"dtype": "float16"}, "float16_view": False},
        mini_again={**mini},  # a second bf16 twin: the first in config order wins
        f16_untracked={**mini, "record": {"dtype": "float16"},
                       "training": {**mini["training"], "determinism_check_steps": 0}})
    experiments = resolve_config(config)["experiments"]
    assert training_twin(experiments, "f16_view") == "thimble_mini"
    assert training_twin(experiments, "f16_seed") is None
    assert training_twin(experiments, "f16_trained") is None
    assert training_twin(experiments, "f16_untracked") == "thimble_mini"
    assert float16_view_of(experiments, "mini_again") is None


def test_the_dry_run_of_thimble_6_trains_thimble_7_only(workdir):
    result = run_snakemake(workdir, "-n", "results/thimble_6/summary.json")
    lines = (result.stdout + result.stderr).splitlines()
    jobs = [line.split()[1].rstrip(":") for line in lines if line.startswith("rule ")]
    wildcards = [line.strip() for line in lines if line.strip().startswith("wildcards:")]
    assert "rechunk" in jobs and "float16_view" in jobs
    trained = [w for job, w in zip(jobs, wildcards) if job.startswith("train")]
    assert trained == ["wildcards: experiment=thimble_7"], lines
    assert "wildcards: experiment=thimble_6" in [w for job, w in zip(jobs, wildcards) if job == "float16_view"]


# -- the view against real float16 training --------------------------------------------------------

def test_the_view_is_float16_training_bit_for_bit(data, tmp_path):
    """Train the tiny run with bf16 and with float16 storage; the float16 view of the bf16 recording holds the
    float16 recording's stored chunks byte for byte, its small datasets and its identity."""
    import h5py

    from thimble.record.codec import read_stored_chunk
    from thimble.analysis.float16_view import write_float16_view
    from thimble.provenance import IDENTITY_ATTRS, recording_identity
    from thimble.record.rechunk import rechunk_stream
    from thimble.record.format import read_checked
    from thimble.record.reader import read_steps

    # what the train rule hands training: the train stage's settings (its config_hash is of these)
    exact_settings = stage_settings(tiny_settings(), "train")
    float16_settings = stage_settings(tiny_settings(dtype="float16"), "train")
    from thimble.training.train import train

    for name, settings in (("bf16", exact_settings), ("f16", float16_settings)):
        train(settings, str(data / "tokens.npy"), str(data / "masks.safetensors"), str(tmp_path / name),
              str(tmp_path / f"{name}.partial"), determinism_check_steps=2)
        rechunk_stream(tmp_path / name, tmp_path / f"{name}.h5", 8, 2 ** 31)
    altered = write_float16_view(tmp_path / "bf16.h5", tmp_path / "view.h5", float16_settings, "tiny", 8, 2 ** 31)
    with h5py.File(tmp_path / "f16.h5") as trained, h5py.File(tmp_path / "view.h5") as view:
        assert set(trained) == set(view)
        for name in ("W", "grad_W", "momentum_W", "variance_W"):
            a, b = trained[name], view[name]
            assert a.id.get_type() == b.id.get_type() and a.chunks == b.chunks and a.attrs["sha256"] == b.attrs["sha256"]
            np.testing.assert_array_equal(read_steps(a).view(np.uint16), read_steps(b).view(np.uint16))
            for first in range(0, a.shape[0], a.chunks[0]):
                assert read_stored_chunk(a, first, name) == read_stored_chunk(b, first, name)
        for name in set(trained) - {"W", "grad_W", "momentum_W", "variance_W", "params"}:
            np.testing.assert_array_equal(read_checked(trained[name]), read_checked(view[name]))
        # the embedding under params/ as training lays it out, the seed's names linked to it
        assert set(trained["params"]) == set(view["params"]) == {"transformer.wte.weight"}
        assert view["W"].id == view["params/transformer.wte.weight/value"].id
        for key in IDENTITY_ATTRS + ("storage_dtype", "recorded_tensors", "recorded_params", "steps_per_chunk",
                                     "chunk_checksum"):
            assert trained.attrs[key] == view.attrs[key], key
        assert recording_identity(trained.attrs) == recording_identity(view.attrs)
        assert view.attrs["float16_view_of"] == "tiny" and json.loads(view.attrs["float16_altered"]) == altered
        assert altered["variance_W"] > 0  # exp_avg_sq near 1e-8 is below float16's normal range


def test_the_view_refuses_a_twin_of_other_settings(data, tmp_path):
    from thimble.errors import DataError
    from thimble.analysis.float16_view import write_float16_view

    write_recording(tmp_path / "synthetic.h5", {name: np.zeros((3, 4, 2), np.uint16) for name in
                                               ("W", "grad_W", "momentum_W", "variance_W")}, [True, False, True, False])
    with pytest.raises(DataError, match="resume_key"):
        write_float16_view(tmp_path / "synthetic.h5", tmp_path / "view.h5",
                           stage_settings(tiny_settings(dtype="float16"), "train"), "tiny", 8, 2 ** 31)
    assert not (tmp_path / "view.h5").exists()


# -- the stages end to end on the mini config --------------------------------------------------------

def test_view_and_effect_stages_end_to_end(mini_data, tmp_path, capsys):
    """thimble_mini_f16 trains with float16 storage; thimble_mini_f16_view (same settings) is derived from
    thimble_mini's recording by the workflow: its recording decodes to the same bits, its analysis is the
    same, and thimble_mini's float16_effect lists the differences from the exact run."""
    import shutil

    import h5py

    from conftest import mini_series_config, write_offline_config
    from thimble.record.reader import read_steps

    # a directory of its own beside the shared data stages: its runs, logs and the plan's probes must not
    # become the other tests' (test_workflow reads thimble_mini's train.log and probes in mini_data)
    write_offline_config(tmp_path)
    shutil.copytree(mini_data / "results/data", tmp_path / "results/data")
    mini_data = tmp_path
    config = mini_series_config()
    config["experiments"]["thimble_mini_f16_view"] = {**config["experiments"]["thimble_mini"],
                                                      "record": {"segment_steps": 20, "dtype": "float16"}}
    (mini_data / "float16.yaml").write_text(yaml.safe_dump(config))
    targets = ["results/thimble_mini/float16_effect.json", "results/thimble_mini_f16/summary.json"]
    run_snakemake(mini_data, "--cores", "2", *targets, "--configfile", str(mini_data / "float16.yaml"))
    results = mini_data / "results"
    assert not (results / "thimble_mini_f16_view/stream").exists()
    with h5py.File(results / "thimble_mini_f16/recording.h5") as trained, \
            h5py.File(results / "thimble_mini_f16_view/recording.h5") as view:
        for name in ("W", "grad_W", "momentum_W", "variance_W"):
            np.testing.assert_array_equal(read_steps(trained[name]).view(np.uint16),
                                          read_steps(view[name]).view(np.uint16))
    for table in ("freeze.csv", "exp_avg_sq.csv", "freeze_drivers.csv"):
        assert (results / "thimble_mini_f16" / table).read_bytes() == (results / "thimble_mini_f16_view" / table).read_bytes()
    effect = json.loads((results / "thimble_mini/float16_effect.json").read_text())
    assert effect["float16_view"] == "thimble_mini_f16_view"
    keys = {entry["key"] for entry in effect["summary_differences"]}
    assert "drivers.inputs_exact" in keys and "delta_w_exact" in keys
    assert effect["lab_question"]["answer"]
    assert effect["tensors"]["variance_W"]["changed"] > 0
    table = pd.read_csv(results / "thimble_mini/float16_effect.csv")
    assert set(table["tensor"]) == {"W", "grad_W", "momentum_W", "variance_W"} and len(table) == 4 * 61
    assert table.groupby("tensor")["changed"].sum()["variance_W"] == effect["tensors"]["variance_W"]["changed"]
    assert (results / "thimble_mini/float16_effect.png").stat().st_size > 0
    bands = pd.read_csv(results / "thimble_mini/float16_effect_bands.csv")
    assert bands.groupby("tensor")["changed"].sum()["variance_W"] <= effect["tensors"]["variance_W"]["changed"]

    # the plan knows a view does not train (the probe still sizes its files)
    from thimble import cli

    status = cli.main(["plan", "--directory", str(mini_data), "--configfile", "float16.yaml", "--probe-steps", "4",
                       "--json", str(mini_data / "plan.json"), "results/thimble_mini_f16_view/summary.json"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "training: none; its recording.h5 is the float16 view of thimble_mini's" in out
    view_plan = json.loads((mini_data / "plan.json").read_text())["experiments"]["thimble_mini_f16_view"]
    assert view_plan["trained_by"] == "thimble_mini"
    assert view_plan["training_seconds"] == {"cpu": None, "cuda": None} and "train" not in view_plan["peak_ram_bytes"]
