"""The low-level HDF5 dataset calls thimble's files need, in one place.

h5py's high-level API knows neither the bf16 type (``thimble.numerics.bf16.bfloat16_h5type``) nor the creation
property lists thimble builds (zstd chunks written directly, virtual datasets over the stream's
segments), and it shows a bf16 dataset's elements as float32: these go through HDF5's own calls here.
"""

from __future__ import annotations

import h5py


def create_dataset(parent: h5py.Group, name: str, h5type: h5py.h5t.TypeID,
                   space: h5py.h5s.SpaceID | tuple[int, ...], dcpl: h5py.h5p.PropDCID) -> h5py.Dataset:
    """A dataset ``name`` in ``parent`` of the HDF5 type ``h5type``, of ``space`` (a dataspace or a shape),
    created with the property list ``dcpl``; the groups of a path (``params/<name>/value``) are created as needed."""
    if not isinstance(space, h5py.h5s.SpaceID):
        space = h5py.h5s.create_simple(tuple(space))
    links = h5py.h5p.create(h5py.h5p.LINK_CREATE)
    links.set_create_intermediate_group(True)
    h5py.h5d.create(parent.id, name.encode(), h5type, space, dcpl=dcpl, lcpl=links)
    return parent[name]


def element_size(dataset: h5py.Dataset) -> int:
    """Bytes per stored element, asked of HDF5: h5py shows a bf16 dataset as float32 (4 bytes, not 2)."""
    return dataset.id.get_type().get_size()
