"""open_run over a recording of every tensor (record.tensors ["*"]): run.params, run.param(name) (value, grad, the
optimizer's state, ΔW′), read bit for bit from recording.h5 and the stream, the DataTree view and the errors.

The oracle is HDF5 itself: h5py reads a recorded bf16 dataset through its own zstd filter and widens it to float32
exactly, so the stored bf16 bits are the upper halves of the float32 bits it gives."""

import re
import shutil
import warnings

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd filter for h5py's own reads)
import numpy as np
import pytest
import torch
import xarray as xr

from conftest import run_train, tiny_settings
from thimble.errors import DataError
from thimble.notebook.parameters import NotRecordedError
from thimble.notebook.run import open_run
from thimble.outputs import DELTA_W_DATASET
from thimble.record.format import param_dataset
from thimble.record.rechunk import rechunk_stream
from thimble.sizes import EMBEDDING, parameter_shapes, recorded_shapes

STEPS_PER_CHUNK = 8
SEED_NAMES = {"W": "value", "grad_W": "grad", "momentum_W": "exp_avg", "variance_W": "exp_avg_sq"}


def stored_bits(path, dataset: str) -> np.ndarray:
    """The stored bf16 bits of ``dataset``, as HDF5 decodes and widens them (uint16)."""
    with h5py.File(path, "r") as handle:
        return (handle[dataset][...].view(np.uint32) >> 16).astype(np.uint16)


def bits_of(values: torch.Tensor) -> np.ndarray:
    assert values.dtype == torch.bfloat16
    return values.contiguous().view(torch.int16).numpy().view(np.uint16)


def quiet(call):
    """``call()`` without the warning that the synthetic results have no tokenizer for token_text."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "no token_text coordinate")
        return call()


@pytest.fixture(scope="module")
def settings():
    return tiny_settings(tensors=["*"])


@pytest.fixture(scope="module")
def every_tensor(data, tmp_path_factory, settings):
    """results/tiny of a run recording every parameter: its stream, kept, and recording.h5 in chunks of 8 steps
    (31 steps: the last chunk is an edge chunk)."""
    results = tmp_path_factory.mktemp("every_tensor") / "results/tiny"
    run_train(data, results / "stream", settings)
    rechunk_stream(results / "stream", results / "recording.h5", STEPS_PER_CHUNK, 2**31)
    return results


@pytest.fixture(scope="module")
def without_embedding(data, tmp_path_factory):
    """results/tiny of a run recording the first block's layer norms, not the embedding (the stream alone)."""
    results = tmp_path_factory.mktemp("without_embedding") / "results/tiny"
    run_train(data, results / "stream", tiny_settings(tensors=["transformer.h.0.ln_1.*"]))
    return results


def source_file(results, source: str):
    return results / "recording.h5" if source == "recording" else results / "stream/stream.h5"


@pytest.mark.parametrize("source", ["recording", "stream"])
def test_every_parameter_reads_its_stored_bits(every_tensor, settings, source):
    path = source_file(every_tensor, source)
    shapes = parameter_shapes(settings["model"])
    with open_run(every_tensor, source=source) as run:
        assert run.source == str(path)
        assert run.params == list(recorded_shapes(settings)) == list(shapes), "every parameter, in the model's order"
        for name in run.params:
            param = run.param(name)
            assert param.shape == shapes[name] and param.dtype == torch.bfloat16 and len(param) == 31
            assert param.state_keys == ["exp_avg", "exp_avg_sq"] and param.keys == ["value", "grad", *param.state_keys]
            for key, series in [("value", param.value), ("grad", param.grad),
                                ("exp_avg", param.state("exp_avg")), ("exp_avg_sq", param.state("exp_avg_sq"))]:
                want = stored_bits(path, param_dataset(name, key))
                assert series.shape == want.shape == (31, *shapes[name])
                assert np.array_equal(bits_of(series[:]), want), f"{name}/{key}"
                assert np.array_equal(bits_of(series[13]), want[13])
                assert np.array_equal(bits_of(series[3:29:6]), want[3:29:6])
                # outer indexing, each axis on its own, as run.W reads: steps and rows by list and mask
                rows = np.arange(shapes[name][0]) % 3 == 1
                assert np.array_equal(bits_of(series[[30, 0, 8], rows]), want[[30, 0, 8]][:, rows])
                if len(shapes[name]) == 2:
                    assert np.array_equal(bits_of(series[-1, 1:, [0, -1]]), want[-1, 1:][:, [0, -1]])
                    assert np.array_equal(bits_of(series[:, 2, 1]), want[:, 2, 1])
                np.testing.assert_array_equal(series.numpy((slice(5, 9),)),
                                              (want[5:9].astype(np.uint32) << 16).view(np.float32))


def test_the_embeddings_seed_names_are_its_parameter(every_tensor):
    with open_run(every_tensor) as run:
        embedding = run.param(EMBEDDING)
        assert run.W is embedding.value and run.grad_W is embedding.grad
        assert run.momentum_W is embedding.state("exp_avg") and run.variance_W is embedding.state("exp_avg_sq")
        for seed, key in SEED_NAMES.items():
            assert np.array_equal(bits_of(getattr(run, seed)[:]), bits_of(embedding.series(key)[:]))
            assert np.array_equal(bits_of(run.tensor(seed)[:]),
                                  stored_bits(every_tensor / "recording.h5", seed))  # the root's hard link
        assert embedding.axes == ("token", "dim") and run.param("transformer.wpe.weight").axes == ("row", "column")
        assert run.param("transformer.ln_f.bias").axes == ("row",)
    with open_run(every_tensor) as run:  # one series per stored dataset: its chunks are decoded once
        run.W[3], run.param(EMBEDDING).value[4]
        assert run.cache.stats.decoded == 1 and run.cache.stats.hits == 1


def test_names_and_indices_the_recording_lacks_are_errors_that_say_what_it_has(every_tensor, without_embedding):
    with open_run(every_tensor) as run:
        with pytest.raises(KeyError, match=r"'transformer\.h\.9\.ln_1\.weight' is not a recorded parameter of "
                                           r".*recording\.h5; recorded: transformer\.wte\.weight, "
                                           r"transformer\.wpe\.weight, .*transformer\.ln_f\.bias$"):
            run.param("transformer.h.9.ln_1.weight")
        bias = run.param("transformer.ln_f.bias")
        with pytest.raises(KeyError, match=r"no state 'master'.*under update rule bf16 it has exp_avg, exp_avg_sq"):
            bias.state("master")
        with pytest.raises(KeyError, match="momentum_W is the seed's name of exp_avg"):
            bias.state("momentum_W")
        with pytest.raises(KeyError, match=r"not optimizer state: .*\.grad"):
            bias.state("grad")
        with pytest.raises(IndexError, match=r"row 8 is out of range: transformer\.ln_f\.bias has rows 0\.\.7"):
            bias.value[0, 8]
        with pytest.raises(IndexError, match=r"step 31 is out of range: the run has steps 0\.\.30"):
            bias.grad[31]
        with pytest.raises(IndexError, match=r"transformer\.ln_f\.bias/value has 2 axes \(step, row\); got 3"):
            bias.value[0, 0, 0]
        with pytest.raises(IndexError, match=r"column 24 is out of range: transformer\.h\.0\.attn\.c_attn\.weight"):
            run.param("transformer.h.0.attn.c_attn.weight").value[0, :, 24]
    with open_run(without_embedding) as run:
        assert run.params == ["transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias"]
        assert run.recorded_tensors == {} and not hasattr(run, "W")
        with pytest.raises(NotRecordedError, match=r"stream\.h5 does not record the embedding transformer\.wte\.weight"
                                                   r".*recorded: transformer\.h\.0\.ln_1\.weight, .*run\.param\(name\)"
                                                   r".*record\.tensors"):
            run.W
        with pytest.raises(KeyError, match=r"does not record transformer\.wpe\.weight, a parameter of the model.*"
                                           r"add it, or a pattern such as '\*', to record\.tensors"):
            run.param("transformer.wpe.weight")
        with pytest.raises(NotRecordedError, match=r"does not record the embedding.*run\.to_datatree\(\)"):
            run.to_xarray()
        tree = quiet(run.to_datatree)
        assert list(tree.children) == run.params
        want = stored_bits(without_embedding / "stream/stream.h5", param_dataset("transformer.h.0.ln_1.bias", "grad"))
        np.testing.assert_array_equal(tree["transformer.h.0.ln_1.bias"].grad.values,
                                      (want.astype(np.uint32) << 16).view(np.float32))


def test_a_damaged_chunk_of_any_parameter_names_file_dataset_and_steps(every_tensor, tmp_path):
    results = tmp_path / "results/tiny"
    results.mkdir(parents=True)
    path = shutil.copy(every_tensor / "recording.h5", results / "recording.h5")
    name = "transformer.h.0.mlp.c_fc.weight"
    with h5py.File(path, "r") as handle:
        offset = handle[param_dataset(name, "grad")].id.get_chunk_info_by_coord((8, 0, 0)).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 30] ^= 0xFF
    path.write_bytes(bytes(raw))
    with open_run(results) as run:
        run.param(name).grad[7]
        with pytest.raises(DataError, match=rf"recording\.h5:/params/{re.escape(name)}/grad steps 8\.\.15"):
            run.param(name).grad[9, 1]


@pytest.mark.parametrize("rule, state_keys", [("kahan", ["exp_avg", "exp_avg_sq", "kahan_comp"]),
                                               ("fp32_master", ["exp_avg", "exp_avg_sq", "master"])])
def test_each_update_rules_state_is_read_for_every_parameter(data, tmp_path, rule, state_keys):
    settings = tiny_settings(tensors=["*"])
    settings["training"].update(update_rule=rule, steps=9)
    results = tmp_path / "results/tiny"
    run_train(data, results / "stream", settings)
    rechunk_stream(results / "stream", results / "recording.h5", 4, 2**31)
    float32 = {"exp_avg", "exp_avg_sq", "master"} if rule == "fp32_master" else set()
    with open_run(results) as run:
        assert run.update_rule == rule
        tree = quiet(lambda: run.to_datatree(dtype="bfloat16"))
        for name in run.params:
            param = run.param(name)
            assert param.state_keys == state_keys and param.dtype == torch.bfloat16
            for key in state_keys:
                state = param.state(key)
                want = parameter_values(results / "recording.h5", name, key)
                if key in float32:
                    assert param.stored_dtypes[key] == "float32" and state.dtype == torch.float32
                    assert np.array_equal(state[:].numpy().view(np.uint32), want.view(np.uint32))
                    assert tree[name][key].dtype == np.float32  # float32 state stays as stored
                else:
                    assert np.array_equal(bits_of(state[:]), (want.view(np.uint32) >> 16).astype(np.uint16))
                    assert tree[name][key].dtype == "bfloat16"
                np.testing.assert_array_equal(np.asarray(tree[name][key].values, np.float32), want)


def parameter_values(path, name: str, key: str) -> np.ndarray:
    with h5py.File(path, "r") as handle:
        return handle[param_dataset(name, key)][...]


@pytest.mark.parametrize("source", ["recording", "stream"])
def test_the_datatree_has_a_node_per_parameter_holding_its_bits(every_tensor, source):
    path = source_file(every_tensor, source)
    tree = quiet(lambda: xr.open_datatree(path, engine="thimble"))
    with tree, open_run(every_tensor, source=source) as run:
        assert list(tree.children) == run.params
        root = tree.to_dataset(inherit=False)
        assert set(root.data_vars) == {"losses", "dead_mask", "live_mask"}
        np.testing.assert_array_equal(root.losses.values, run.losses.numpy())
        np.testing.assert_array_equal(root.dead_mask.values, run.dead_mask.numpy())
        assert list(root.group.values[:3]) == ["dead" if dead else "live" for dead in run.dead_mask[:3]]
        own_dims = set()
        for name in run.params:
            node = tree[name]
            assert set(node.data_vars) == {"value", "grad", "exp_avg", "exp_avg_sq"}
            dims = node.value.dims
            assert node.value.shape == (31, *run.param(name).shape)
            if name == EMBEDDING:
                assert dims == ("step", "token", "dim") and "group" in node.coords
            else:
                assert dims == ("step", *(f"{name}:{axis}" for axis in run.param(name).axes))
            assert not own_dims & set(dims[1:]), f"{name} shares a dimension with another parameter"
            own_dims |= set(dims[1:]) - {"token", "dim"}
            for key in node.data_vars:
                assert node[key].dtype == np.float32
                np.testing.assert_array_equal(node[key].values, parameter_values(path, name, key), f"{name}/{key}")
        some = tree["transformer.h.0.mlp.c_fc.weight"].exp_avg_sq.isel(step=[2, 30]).sel(
            {"transformer.h.0.mlp.c_fc.weight:column": slice(4, 9)})
        np.testing.assert_array_equal(
            some.values, parameter_values(path, "transformer.h.0.mlp.c_fc.weight", "exp_avg_sq")[[2, 30], :, 4:10])
    with quiet(lambda: xr.open_dataset(path, engine="thimble")) as flat:  # the embedding alone, as before
        assert {"W", "grad_W", "momentum_W", "variance_W", "losses"} == set(flat.data_vars)
        np.testing.assert_array_equal(flat.W.values, parameter_values(path, EMBEDDING, "value"))


def test_the_datatree_is_lazy_and_reads_bfloat16_through_the_runs_cache(every_tensor):
    with open_run(every_tensor) as run:
        tree = quiet(lambda: run.to_datatree(dtype="bfloat16"))
        assert run.cache.stats.decoded == 0, "opening reads no tensor"
        values = tree["transformer.h.0.attn.c_proj.weight"].grad.isel(step=9).values
        assert values.dtype == "bfloat16" and run.cache.stats.decoded == 1  # the chunk of steps 8..15
        assert np.array_equal(values.view(np.uint16),
                              bits_of(run.param("transformer.h.0.attn.c_proj.weight").grad[9]))
        assert run.cache.stats.decoded == 1 and run.cache.stats.hits == 1
    engine = xr.backends.list_engines()["thimble"]
    groups = quiet(lambda: engine.open_groups_as_dict(every_tensor, drop_variables=["exp_avg", "dead_mask"]))
    assert list(groups) == ["/", *(f"/{name}" for name in parameter_shapes(tiny_settings()["model"]))]
    assert set(groups["/"].data_vars) == {"losses", "live_mask"}
    assert set(groups["/transformer.wpe.weight"].data_vars) == {"value", "grad", "exp_avg_sq"}
    groups["/"].close()


def write_delta_w_lattice(results, per_parameter: bool) -> dict[str, np.ndarray]:
    """A delta_w_lattice.h5 of known integers beside the recording, as the lattice stage lays it out: each
    parameter's ΔW′ at params/<name>/delta_w_lattice (int32 for ln_f.bias, int16 for the others), the embedding's
    also at the root as a hard link; or (``per_parameter`` False) the embedding's alone at the root, as the stage
    wrote it before every tensor had its ΔW′. Returns the values by parameter."""
    with h5py.File(results / "recording.h5", "r") as recording:
        attrs = dict(recording.attrs)
    shapes = parameter_shapes(tiny_settings()["model"])
    written = {}
    with h5py.File(results / "delta_w_lattice.h5", "w") as out:
        for index, (name, shape) in enumerate(shapes.items()):
            dtype = np.int32 if name == "transformer.ln_f.bias" else np.int16
            values = (np.arange(31 * np.prod(shape)).reshape(31, *shape) * (index + 3) % 1999 - 999).astype(dtype)
            if dtype == np.int32:
                values *= 100_000  # beyond int16
            values[0] = 0
            written[name] = values
            if per_parameter:
                out.create_dataset(param_dataset(name, DELTA_W_DATASET), data=values, chunks=(8, *shape))
        if per_parameter:
            out[DELTA_W_DATASET] = out[param_dataset(EMBEDDING, DELTA_W_DATASET)]
        else:
            out.create_dataset(DELTA_W_DATASET, data=written[EMBEDDING], chunks=(8, *shapes[EMBEDDING]))
        out.attrs.update(attrs)
    return written


def test_each_parameters_delta_w_lattice(every_tensor, tmp_path):
    results = tmp_path / "results/tiny"
    results.mkdir(parents=True)
    shutil.copy(every_tensor / "recording.h5", results / "recording.h5")
    written = write_delta_w_lattice(results, per_parameter=True)
    with open_run(results) as run:
        for name in run.params:
            delta = run.param(name).delta_w_lattice
            assert delta.shape == written[name].shape and delta.stored_dtype == written[name].dtype
            np.testing.assert_array_equal(delta[:].numpy(), written[name])
            np.testing.assert_array_equal(delta[[4, 30], 1:].numpy(), written[name][[4, 30], 1:])
        assert run.param("transformer.ln_f.bias").delta_w_lattice.dtype == torch.int32
        assert run.param(EMBEDDING).delta_w_lattice is run.delta_w_lattice
        np.testing.assert_array_equal(run.delta_w_lattice[7].numpy(), written[EMBEDDING][7])
        with pytest.raises(IndexError, match=r"row 24 is out of range: transformer\.h\.0\.attn\.c_attn\.bias"):
            run.param("transformer.h.0.attn.c_attn.bias").delta_w_lattice[1, 24]
    written = write_delta_w_lattice(results, per_parameter=False)
    with open_run(results) as run:
        np.testing.assert_array_equal(run.param(EMBEDDING).delta_w_lattice[:].numpy(), written[EMBEDDING])
        with pytest.raises(KeyError, match=r"holds no params/transformer\.wpe\.weight/delta_w_lattice: it was "
                                           r"written before .* rebuild it with `snakemake --cores 1 "
                                           r"results/tiny/delta_w_lattice\.h5`"):
            run.param("transformer.wpe.weight").delta_w_lattice


def test_the_lattice_stages_file_is_read_per_parameter(every_tensor, tmp_path):
    from thimble.analysis.delta_w import write_delta_w_lattice as lattice_stage

    results = tmp_path / "results/tiny"
    results.mkdir(parents=True)
    shutil.copy(every_tensor / "recording.h5", results / "recording.h5")
    lattice_stage(str(results / "recording.h5"), str(results / "delta_w_lattice.h5"))
    with open_run(results) as run, h5py.File(results / "delta_w_lattice.h5", "r") as stored:
        for name in run.params:
            want = stored[param_dataset(name, DELTA_W_DATASET)][...]
            np.testing.assert_array_equal(run.param(name).delta_w_lattice[:].numpy(), want)
            values = run.param(name).value.numpy()  # ±0 are one lattice point: compared as values
            assert np.array_equal(values[1:] != values[:-1], want[1:] != 0), f"{name}: ΔW′ is non-zero where it moved"
