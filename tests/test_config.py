import copy

import pytest

from conftest import REPO, offline_config, run_snakemake
from thimble.config import (ConfigError, deep_merge, load_config, load_schema, load_yaml, resolve_config,
                            schema_defaults, settings_hash)
from thimble.sizes import HDF5_MAX_CHUNK_BYTES, steps_per_chunk

SCHEMA = load_schema()
SHIPPED = load_yaml(REPO / "config.yaml")


def resolve(config):
    return resolve_config(config, SCHEMA)


def test_shipped_config_resolves_with_seed_settings():
    cfg = load_config(REPO / "config.yaml")
    assert set(cfg["experiments"]) >= {"thimble_5", "thimble_6", "thimble_7", "thimble_mini"}
    assert cfg["series"]["thimble"] == ["thimble_5", "thimble_6", "thimble_7"]
    t7 = cfg["experiments"]["thimble_7"]
    assert t7["model"] == {"hidden_dim": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 128,
                           "init_scale": 0.02, "vocab_size": 10000}
    assert t7["training"]["steps"] == 6000 and cfg["experiments"]["thimble_5"]["training"]["steps"] == 3000
    assert (t7["training"]["batch_size"], t7["training"]["learning_rate"], t7["training"]["seed"]) == (128, 1e-3, 42)
    assert (t7["training"]["adam_beta1"], t7["training"]["adam_beta2"], t7["training"]["adam_epsilon"]) == (0.9, 0.999, 1e-8)
    assert t7["training"]["weight_decay"] == 0.0 and t7["record"]["dtype"] == "bfloat16"
    t6 = cfg["experiments"]["thimble_6"]
    assert t6["record"]["dtype"] == "float16"
    assert {k: v for k, v in t6.items() if k not in ("record", "name", "description")} == \
        {k: v for k, v in t7.items() if k not in ("record", "name", "description")}


def test_schema_defaults_cover_every_setting():
    defaults = schema_defaults(SCHEMA)
    assert set(defaults) == {"model", "training", "record", "rechunk", "analysis"}
    assert defaults["training"]["steps"] == 6000 and defaults["rechunk"]["steps_per_chunk"] == 1500


def test_deep_merge_overrides_leaves_and_keeps_base():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 3}
    merged = deep_merge(base, {"a": {"c": [9]}})
    assert merged == {"a": {"b": 1, "c": [9]}, "d": 3}
    assert base["a"]["c"] == [1, 2]


def test_settings_hash_is_order_independent():
    assert settings_hash({"a": 1, "b": 2}) == settings_hash({"b": 2, "a": 1}) != settings_hash({"a": 1, "b": 3})


def broken(mutate):
    config = copy.deepcopy(SHIPPED)
    mutate(config)
    return config


BAD_CONFIGS = {
    "wrong type": (lambda c: c["experiments"]["thimble_7"].update(training={"steps": "6000"}),
                   "experiments.thimble_7.training.steps must be of type integer"),
    "unknown key": (lambda c: c["experiments"]["thimble_7"]["training"].update(stepz=10) if "training" in
                    c["experiments"]["thimble_7"] else c["experiments"]["thimble_7"].update(training={"stepz": 10}),
                    "unknown config key experiments.thimble_7.training.stepz"),
    "unknown top-level key": (lambda c: c.update(experiment={}), "unknown config key experiment;"),
    "missing dataset": (lambda c: c["experiments"]["thimble_7"].update(dataset="gutenberg"),
                        "experiments.thimble_7.dataset: dataset 'gutenberg' is not defined"),
    "heads do not divide hidden": (lambda c: c["experiments"]["thimble_7"].update(model={"n_heads": 3}),
                                   "experiments.thimble_7.model.n_heads: 3 does not divide model.hidden_dim 64"),
    "chunk over 4 GiB": (lambda c: c["experiments"]["thimble_7"].update(rechunk={"steps_per_chunk": 4000}),
                         "experiments.thimble_7.rechunk.steps_per_chunk: 4000 steps x 1280000 bytes"),
    "chunk cap over 4 GiB": (lambda c: c["experiments"]["thimble_7"].update(
        rechunk={"steps_per_chunk": "auto", "max_chunk_bytes": 2**32}), "experiments.thimble_7.rechunk.max_chunk_bytes"),
    "bad steps_per_chunk": (lambda c: c["experiments"]["thimble_7"].update(rechunk={"steps_per_chunk": "big"}),
                            "experiments.thimble_7.rechunk.steps_per_chunk"),
    "series member missing": (lambda c: c["series"].update(thimble=["thimble_5", "thimble_8"]),
                              "series.thimble[1]: experiment 'thimble_8' is not defined"),
    "reserved experiment name": (lambda c: c["experiments"].update(data={"dataset": "shakespeare"}),
                                 "experiments.data: the name 'data' is reserved"),
    "bad name": (lambda c: c["experiments"].update({"thimble-8": {"dataset": "shakespeare"}}),
                 "name 'thimble-8' is not allowed"),
    "missing vocab_size": (lambda c: c["datasets"]["shakespeare"].pop("vocab_size"),
                           "datasets.shakespeare: 'vocab_size' is a required property"),
    "two sources": (lambda c: c["datasets"]["shakespeare"]["source"].update(local="texts"),
                    "datasets.shakespeare.source"),
    "window past the end": (lambda c: c["experiments"]["thimble_5"].update(analysis={"windows": [[2000, 3001]]}),
                            "experiments.thimble_5.analysis.windows[0]"),
    # JSON Schema's number takes NaN and infinities, and no bound refuses NaN
    "NaN learning rate": (lambda c: c["experiments"]["thimble_7"].update(training={"learning_rate": float("nan")}),
                          "config key experiments.thimble_7.training.learning_rate: .nan is not a finite number"),
    "infinite default": (lambda c: c["defaults"]["training"].update(weight_decay=float("inf")),
                         "config key defaults.training.weight_decay: .inf is not a finite number"),
    "NaN in a list": (lambda c: c["experiments"]["thimble_5"].update(analysis={"windows": [[1, float("nan")]]}),
                      "config key experiments.thimble_5.analysis.windows.0.1: .nan is not a finite number"),
    "infinite cluster setting": (lambda c: c.update(cluster={"gpu_train_threads": float("-inf")}),
                                 "config key cluster.gpu_train_threads: -.inf is not a finite number"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_bad_config_names_the_key(kind):
    mutate, expected = BAD_CONFIGS[kind]
    with pytest.raises(ConfigError) as caught:
        resolve(broken(mutate))
    assert expected in str(caught.value)


def test_steps_per_chunk_auto_picks_fewest_equal_chunks():
    row = 10000 * 64 * 2
    assert steps_per_chunk(6001, row, "auto", 2 * 2**30) == 1501  # 4 near-equal chunks, not 4 full + 1 row
    assert steps_per_chunk(6001, row, 1500, 2**31) == 1500
    assert steps_per_chunk(61, row, 1500, 2**31) == 61
    assert steps_per_chunk(6001, row, "auto", HDF5_MAX_CHUNK_BYTES) * row <= HDF5_MAX_CHUNK_BYTES


def test_bad_config_fails_dry_run_before_anything_is_written(workdir):
    config = broken(BAD_CONFIGS["heads do not divide hidden"][0])
    # snakemake merges --configfile into the workdir's config.yaml: keep the mini dataset's source the same
    config["datasets"]["shakespeare_mini"]["source"] = offline_config()["datasets"]["shakespeare_mini"]["source"]
    import yaml

    (workdir / "bad.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, "-n", "results/data/shakespeare/tokens.npy",
                           "--configfile", str(workdir / "bad.yaml"), check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "experiments.thimble_7.model.n_heads" in output and "bad.yaml" in output
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()


def test_nan_and_infinities_in_a_config_file_are_refused_naming_each_key(tmp_path):
    text = (REPO / "config.yaml").read_text()
    for old, new in (("learning_rate: 1.0e-3", "learning_rate: .nan"), ("adam_epsilon: 1.0e-8", "adam_epsilon: .inf"),
                     ("steps: 6000", "steps: -.inf")):
        assert old in text
        text = text.replace(old, new, 1)
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "config.yaml")
    lines = str(caught.value).splitlines()
    assert lines == [f"invalid configuration in {tmp_path / 'config.yaml'}:",
                     "config key defaults.training.adam_epsilon: .inf is not a finite number; NaN and infinities are "
                     "refused wherever the config takes a number: give a finite value",
                     "config key defaults.training.learning_rate: .nan is not a finite number; NaN and infinities are "
                     "refused wherever the config takes a number: give a finite value",
                     # an integer setting: the same line, not a type error beside it
                     "config key defaults.training.steps: -.inf is not a finite number; NaN and infinities are "
                     "refused wherever the config takes a number: give a finite value"]
