"""The xarray engine ``thimble``: ``xr.open_dataset("results/thimble_small/recording.h5", engine="thimble")``.

Registered as the entry point ``xarray.backends: thimble`` (pyproject.toml). It opens the run the path
names (an experiment's ``recording.h5``, its ``stream/stream.h5`` or the results folder) and returns
``thimble.xarray_view.run_dataset`` of it: every recorded tensor lazily over (step, token, dim), with
token text and group coordinates, exact float32 or (``dtype="bfloat16"``) ml_dtypes bfloat16.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import xarray as xr
from xarray.backends import BackendEntrypoint

from thimble.run import Run
from thimble.xarray_view import run_dataset


def run_of_path(path: str | Path, cache_bytes: int | None = None, allow_stale: bool = False):
    """The run a path names: results/{experiment}, its recording.h5 or its stream/stream.h5."""
    path = Path(path)
    if path.is_dir():
        return Run(path, "auto", cache_bytes, allow_stale)
    if path.name == "stream.h5":
        return Run(path.parent.parent, "stream", cache_bytes, allow_stale)
    return Run(path.parent, "recording", cache_bytes, allow_stale)


class ThimbleBackendEntrypoint(BackendEntrypoint):
    """``engine="thimble"``: a thimble recording (recording.h5, stream/stream.h5 or the results folder)."""

    description = "thimble recordings: W and the optimizer state per step, bit for bit, read lazily"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "dtype", "cache_bytes")

    def open_dataset(self, filename_or_obj, *, drop_variables=None, dtype: str = "float32",
                     cache_bytes: int | None = None) -> xr.Dataset:
        dataset = run_dataset(run_of_path(filename_or_obj, cache_bytes), dtype)
        return dataset.drop_vars(drop_variables or [], errors="ignore")

    def guess_can_open(self, filename_or_obj) -> bool:
        try:
            path = Path(filename_or_obj)
        except TypeError:
            return False
        if path.is_dir():
            return (path / "recording.h5").is_file() or (path / "stream" / "stream.h5").is_file()
        if path.suffix != ".h5" or not path.is_file():
            return False
        try:
            with h5py.File(path, "r") as handle:
                return "W" in handle and "storage_dtype" in handle.attrs
        except OSError:
            return False
