"""The recording's format: how thimble lays out a recorded stream and names, stores and opens its tensors.

Each recorded parameter is a group ``params/<parameter name>`` holding a dataset per state key, each of shape
(T+1, *parameter shape): ``value`` (after step t), ``grad`` (what step t used) and the update rule's state under
the optimizer's own keys (``exp_avg``, ``exp_avg_sq``; ``kahan_comp``, ``master``). The embedding
(``transformer.wte.weight``) is also reachable under the seed's names at the root (``W``, ``grad_W``,
``momentum_W``, ``variance_W``, ...): HDF5 hard links to the same datasets, stored once. ``RecordLayout`` says
what a file holds (its attribute ``recorded_params``); a file written before this layout holds the embedding
alone, under the seed's names, and reads as the same layout.

A recorded stream is a directory:

- ``segment_SSSSSS-EEEEEE.h5``: steps S..E of the recorded tensors, one step per chunk, and their losses.
  A segment is written under a ``.tmp`` name and renamed only when it is complete and synced, so a segment
  file on disk is always whole.
- ``stream.h5``: written last. Its tensors are HDF5 virtual datasets of shape (T+1, *shape) over the
  segments (relative paths: move the directory as a whole), with the seed's ``losses``, masks and
  attributes, and ``complete = True``.

``thimble rechunk`` rewrites it as one file, ``recording.h5``, in large time chunks. Chunks are encoded by
``thimble.record.codec`` (byte shuffle -> zstd with the frame checksum, the same encoding in every file thimble
writes); the small uncompressed datasets (losses, masks, counts) carry HDF5's Fletcher32. The writer is
``thimble.record.writer``; a recorded tensor's rows are read through ``thimble.record.reader``
(``RecordedTensor``; a stream's segments are opened and decoded by ``thimble.record.stream_reader``), which
turns a damaged, truncated or missing file into a ``DataError`` naming the file, the dataset and the steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from thimble.errors import DataError
from thimble.numerics.bf16 import bfloat16_h5type
from thimble.outputs import RECORDER, RESULTS_DIR, STREAM_DIR
from thimble.record.codec import damaged, zstd_dcpl
from thimble.record.h5_datasets import create_dataset
from thimble.sizes import EMBEDDING
from thimble.update_rules import ELEMENT_BYTES, SEED_NAMES, STATE_KEYS, recorded_tensors

#: the tensors of a bf16-rule recording (``thimble.update_rules.recorded_tensors`` gives each rule's)
TENSORS = tuple(recorded_tensors("bf16"))
STORAGE_DTYPES = ("bfloat16", "float16")
#: a recording's storage_dtype when every tensor is stored in its own dtype (``thimble.Recorder``)
NATIVE_STORAGE = "native"


def made_by_recorder(attrs) -> bool:
    """Whether a recording's attributes (or those a file made of it carried over) are a ``thimble.Recorder``'s:
    a user's loop and optimizer, whose hyperparameters are the per-step ``hyperparameters`` table, not settings."""
    value = attrs.get("recorded_by")
    return (value.decode() if isinstance(value, bytes) else str(value)) == RECORDER
#: the stored dtype of a tensor: record.dtype for bf16 tensors, float32 for float32 optimizer state
TENSOR_DTYPES = ("bfloat16", "float16", "float32")


def storage_h5type(storage: str) -> h5py.h5t.TypeID:
    if storage == "bfloat16":
        return bfloat16_h5type()
    if storage == "float16":
        return h5py.h5t.IEEE_F16LE.copy()
    if storage == "float32":
        return h5py.h5t.IEEE_F32LE.copy()
    raise ValueError(f"unknown stored dtype {storage!r}; use one of {TENSOR_DTYPES}")


#: the group that holds one group per recorded parameter
PARAMS_GROUP = "params"


def param_dataset(param: str, key: str) -> str:
    """The path of a recorded parameter's dataset ``key`` (``value``, ``grad``, ``exp_avg``, ...)."""
    return f"{PARAMS_GROUP}/{param}/{key}"


@dataclass(frozen=True)
class RecordedParam:
    """One recorded parameter: its name, shape, and each state key's stored dtype and dataset path."""

    name: str
    shape: tuple[int, ...]
    dtypes: dict[str, str]
    paths: dict[str, str]

    def roles(self) -> dict[str, str]:
        """Its datasets by the seed's names (``W``, ``grad_W``, ``momentum_W``, ...): the roles the analyses
        read any tensor by."""
        return {SEED_NAMES.get(key, key): path for key, path in self.paths.items()}

    def require_roles(self, filename: str, roles, needs: str) -> dict[str, str]:
        """Its datasets by role (``roles()``), or a DataError naming the file, the parameter and the roles it was
        recorded without (``needs``: what the caller needs them for)."""
        paths = self.roles()
        missing = [role for role in roles if role not in paths]
        if missing:
            raise DataError(f"{filename}: {self.name} is recorded without {', '.join(missing)} (datasets "
                            f"{', '.join(sorted(paths.values()))}); {needs}")
        return paths

    def role_dtypes(self) -> dict[str, str]:
        return {SEED_NAMES.get(key, key): dtype for key, dtype in self.dtypes.items()}


class RecordLayout:
    """What a recording holds: its recorded parameters in the model's order, and the seed's names of the
    embedding (links at the root) when it is recorded."""

    def __init__(self, params: dict[str, RecordedParam]):
        self.params = params
        embedding = params.get(EMBEDDING)
        # asked for every tensor of every recorded step (``canonical``): built once
        self._aliases = {} if embedding is None else {name: path for name, path in embedding.roles().items()
                                                      if name != path}

    @classmethod
    def of_parameters(cls, shapes: dict[str, tuple[int, ...]], keys: dict[str, str]) -> RecordLayout:
        """The layout of a new recording: each parameter of ``shapes`` with the state keys ``keys``
        (``thimble.update_rules.recorded_keys``) under ``params/<name>/``."""
        return cls.of_parameters_each({name: (tuple(shape), keys) for name, shape in shapes.items()})

    @classmethod
    def of_file(cls, handle: h5py.File) -> RecordLayout:
        """The layout of a stream, a segment or a rechunked recording; one written before ``params/`` held
        the embedding alone, under the seed's names."""
        if "recorded_params" in handle.attrs:
            recorded = json.loads(handle.attrs["recorded_params"])
            return cls.of_parameters_each({name: (tuple(entry["shape"]), entry["tensors"])
                                           for name, entry in recorded.items()})
        tensors = stream_tensors(handle)
        if "vocab_size" in handle.attrs and "hidden_dim" in handle.attrs:
            shape = (int(handle.attrs["vocab_size"]), int(handle.attrs["hidden_dim"]))
        else:
            shape = tuple(handle["W"].shape[1:]) if isinstance(handle.get("W"), h5py.Dataset) else ()
        return cls({EMBEDDING: RecordedParam(EMBEDDING, shape, {STATE_KEYS[name]: dtype for name, dtype in
                                                                tensors.items()},
                                             {STATE_KEYS[name]: name for name in tensors})})

    @classmethod
    def of_parameters_each(cls, entries: dict[str, tuple[tuple[int, ...], dict[str, str]]]) -> RecordLayout:
        """Each parameter of ``entries`` (name: (shape, {state key: stored dtype})) under ``params/<name>/``."""
        return cls({name: RecordedParam(name, shape, dict(keys), {key: param_dataset(name, key) for key in keys})
                    for name, (shape, keys) in entries.items()})

    @classmethod
    def embedding(cls, shape: tuple[int, int], tensors: dict[str, str]) -> RecordLayout:
        """The embedding alone, of ``shape``, with ``tensors`` by the seed's names (``recorded_tensors``)."""
        return cls.of_parameters({EMBEDDING: tuple(shape)}, {STATE_KEYS[name]: dtype for name, dtype in
                                                            tensors.items()})

    def canonical(self, name: str) -> str:
        """The stored dataset's path of ``name`` (a path, or a seed's root name of the embedding)."""
        return self._aliases.get(name, name)

    def datasets(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every stored dataset (each once) with its stored dtype and parameter shape."""
        return {param.paths[key]: (dtype, param.shape)
                for param in self.params.values() for key, dtype in param.dtypes.items()}

    def aliases(self) -> dict[str, str]:
        """The seed's root names of the embedding and the datasets they link to (none if it is not recorded, or
        if the datasets are themselves at the root)."""
        return dict(self._aliases)

    def alias_dtypes(self) -> dict[str, str]:
        embedding = self.params.get(EMBEDDING)
        return embedding.role_dtypes() if embedding is not None else {}

    def dtype_of(self, name: str) -> str | None:
        """The stored dtype of dataset ``name`` (a path or a seed's root name), or None if it is not recorded."""
        for param in self.params.values():
            for key, path in param.paths.items():
                if name.lstrip("/") in (path, SEED_NAMES.get(key) if param.name == EMBEDDING else None):
                    return param.dtypes[key]
        return None

    def attrs(self) -> dict[str, str]:
        """The attributes that state the layout: ``recorded_params`` and, for the seed's readers,
        ``recorded_tensors`` (the embedding's tensors by the seed's names)."""
        return {"recorded_params": json.dumps({name: {"shape": list(param.shape), "tensors": param.dtypes}
                                               for name, param in self.params.items()}),
                "recorded_tensors": tensors_attr(self.alias_dtypes())}

    def link_aliases(self, handle: h5py.File) -> None:
        """Hard links at the root under the seed's names to the embedding's datasets (stored once)."""
        for name, path in self.aliases().items():
            handle[name] = handle[path]

    def is_alias(self, name: str) -> bool:
        return name.lstrip("/") in self._aliases


def check_own_folder(handle: h5py.File) -> None:
    """A DataError when a recording, a stream or a file made of one (ΔW′ carries its recording's attributes) in the
    workflow's ``results/{experiment}/`` is another experiment's (its attribute ``experiment``): copied or moved
    there, it would be analysed as this experiment's."""
    path = Path(handle.filename).resolve()
    run_dir = path.parent.parent if path.parent.name == STREAM_DIR else path.parent
    recorded = handle.attrs.get("experiment")
    if run_dir.parent.name != RESULTS_DIR or recorded is None or str(recorded) == run_dir.name:
        return
    raise DataError(f"{handle.filename} is {recorded}'s (its attribute experiment), not {run_dir.name}'s: it was "
                    f"copied or moved into {run_dir}. Move it back, or delete it and run `snakemake --cores 2 "
                    f"{RESULTS_DIR}/{run_dir.name}/{STREAM_DIR if run_dir != path.parent else path.name}` to make "
                    f"{run_dir.name}'s")


def check_recorded_dataset(handle: h5py.File, name: str, layout: RecordLayout | None = None) -> h5py.Dataset:
    """Dataset ``name`` of a recording, checked against what the recording's attributes say it holds: its stored
    type, rank and shape, and where its bytes are (in this file, or for a stream in its own folder's segments);
    a DataError naming the file, the dataset, what it holds and what was expected."""
    check_own_folder(handle)
    layout = RecordLayout.of_file(handle) if layout is None else layout
    where = f"{handle.filename}:/{name.lstrip('/')}"
    stored = layout.dtype_of(name)
    param = next((param for param in layout.params.values()
                  if name.lstrip("/") in (*param.paths.values(), *(layout.aliases() if param.name == EMBEDDING
                                                                   else ()))), None)
    if stored is None or param is None:
        raise DataError(f"{where}: the recording's attributes name no such recorded tensor (it holds "
                        f"{', '.join(layout.datasets()) or 'none'})")
    item = handle.get(name)
    if not isinstance(item, h5py.Dataset):
        raise DataError(f"{where}: the recording's attributes say it is a recorded tensor, but the file holds "
                        f"{'nothing' if item is None else 'a group'} there; the file is not what thimble wrote")
    plist = item.id.get_create_plist()
    if plist.get_external_count() > 0:
        raise DataError(f"{where}: its bytes are in an external file ({plist.get_external(0)[0].decode()!r}), which "
                        "thimble never writes; refused without reading it")
    if item.is_virtual:
        sources = {source.file_name for source in item.virtual_sources()}
        outside = sorted(file for file in sources if file in (".", "") or "/" in file or "\\" in file
                         or not file.startswith("segment_"))
        if outside or not handle.attrs.get("complete", False):
            raise DataError(f"{where}: a virtual dataset over {', '.join(outside or sorted(sources))}, outside the "
                            "stream's own segments; refused without reading it")
    expected_rank = 1 + len(param.shape)
    size = item.id.get_type().get_size()
    if item.id.get_type().get_class() != h5py.h5t.FLOAT or size != ELEMENT_BYTES[stored]:
        raise DataError(f"{where} holds {item.dtype} elements of {size} bytes; the recording's attributes say "
                        f"{stored}")
    if item.ndim != expected_rank or tuple(item.shape[1:]) != tuple(param.shape):
        raise DataError(f"{where} has shape {item.shape}; the recording's attributes say (steps, "
                        f"{', '.join(map(str, param.shape))}) for {param.name}")
    if "losses" in handle and handle["losses"].shape[:1] != item.shape[:1]:
        raise DataError(f"{where} has {item.shape[0]} steps, the recording's losses {handle['losses'].shape[0]}; "
                        "the file is not what thimble wrote")
    return item


def stream_tensors(handle: h5py.File) -> dict[str, str]:
    """The embedding's recorded tensors by the seed's names (``W``, ``grad_W``, ...), each with its stored dtype,
    in a stream or rechunked file: the tensors the seed's readers find at the root (``RecordLayout`` has all)."""
    if "recorded_tensors" in handle.attrs:
        return json.loads(handle.attrs["recorded_tensors"])
    return recorded_tensors("bf16", str(handle.attrs.get("storage_dtype", "bfloat16")))


def tensors_attr(tensors: dict[str, str]) -> str:
    """The ``recorded_tensors`` attribute: which tensors a file holds and how each is stored."""
    return json.dumps(tensors)


def create_tensor_dataset(group: h5py.Group, name: str, shape: tuple, chunk_rows: int, storage: str,
                          level: int, resizable: bool = False) -> h5py.Dataset:
    """A chunked (chunk_rows, *shape[1:]), shuffle+zstd compressed dataset of the storage dtype (``resizable``:
    its steps can be cut later)."""
    space = h5py.h5s.create_simple(tuple(shape), (h5py.h5s.UNLIMITED, *shape[1:])) if resizable else shape
    return create_dataset(group, name, storage_h5type(storage), space, zstd_dcpl((chunk_rows, *shape[1:]), level))


def create_checked_array(group: h5py.Group, name: str, data: np.ndarray) -> h5py.Dataset:
    """A small array (losses, masks, counts) with HDF5's Fletcher32 checksum, which HDF5 verifies on
    every read (an empty array has no chunk to guard)."""
    data = np.asarray(data)
    if data.size == 0:
        return group.create_dataset(name, data=data)
    return group.create_dataset(name, data=data, chunks=data.shape, fletcher32=True)


def open_h5(path: str | Path, mode: str = "r") -> h5py.File:
    """Open an HDF5 file; a missing, truncated or unreadable one is a DataError naming it."""
    path = Path(path)
    if mode == "r" and not path.exists():
        raise DataError(f"{path} does not exist; rerun the stage that writes it")
    try:
        return h5py.File(path, mode)
    except OSError as error:
        raise damaged(str(path), f"HDF5 cannot open it ({error})") from None


def read_checked(dataset: h5py.Dataset) -> np.ndarray:
    """A small dataset, whole; a Fletcher32 mismatch is a DataError naming it."""
    try:
        return dataset[...]
    except OSError as error:
        raise damaged(f"{dataset.file.filename}:{dataset.name}", f"HDF5 cannot read it ({error})") from None


def is_bfloat16(dataset: h5py.Dataset) -> bool:
    return dataset.id.get_type() == bfloat16_h5type()


def segment_name(first: int, last: int) -> str:
    return f"segment_{first:06d}-{last:06d}.h5"


def list_segments(directory: Path) -> list[tuple[int, int, Path]]:
    """Complete segments in a directory as (first step, last step, path), in step order."""
    found = []
    for path in Path(directory).glob("segment_*-*.h5"):
        first, last = path.stem.removeprefix("segment_").split("-")
        found.append((int(first), int(last), path))
    return sorted(found)


def covering_segments(directory: str | Path, start: int, stop: int) -> list[tuple[int, int, Path]]:
    """The segments holding steps [start, stop), in order; a DataError naming the steps no segment holds."""
    directory = Path(directory)
    found = [(first, last, path) for first, last, path in list_segments(directory) if last >= start and first < stop]
    expected = start
    for first, last, path in found:
        if first > expected:
            raise DataError(f"{directory}: no segment file holds steps {expected}..{first - 1} (a segment is missing); "
                            f"restore it, or delete {directory} and train again")
        if first < expected and expected > start:
            raise DataError(f"{directory}: segments overlap at step {first} ({path.name}); delete {directory} "
                            "and train again")
        expected = last + 1
    if expected < stop:
        raise DataError(f"{directory}: no segment file holds steps {expected}..{stop - 1} (a segment is missing); "
                        f"restore it, or delete {directory} and train again")
    return found
