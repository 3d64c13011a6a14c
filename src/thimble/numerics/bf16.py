"""bfloat16 bit patterns: conversions between torch, numpy (ml_dtypes) and HDF5.

HDF5 has no predefined bfloat16, but its float types are parametric: a 16-bit
type with a sign bit at 15, 8 exponent bits at 7..14 (bias 127) and 7 mantissa
bits at 0..6 is exactly bf16. Stored with that type, h5py and h5dump read true
float32 values, and passing the same type as the memory type moves the raw
16-bit patterns untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h5py
import ml_dtypes
import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: the file-only stages never load it
    import torch

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def bfloat16_h5type() -> h5py.h5t.TypeFloatID:
    """A new HDF5 float type with bf16's layout."""
    h5type = h5py.h5t.IEEE_F32LE.copy()
    h5type.set_fields(15, 7, 8, 0, 7)
    h5type.set_size(2)
    h5type.set_ebias(127)
    return h5type


def torch_to_bits(tensor: torch.Tensor) -> np.ndarray:
    """The uint16 bit patterns of a bf16 tensor (on the CPU), without copying."""
    import torch

    if tensor.dtype != torch.bfloat16:
        raise TypeError(f"expected a bfloat16 tensor, got {tensor.dtype}")
    return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)


def bits_to_torch(bits: np.ndarray) -> torch.Tensor:
    """uint16 bit patterns as a bf16 torch tensor (no copy)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)


def all_bfloat16() -> np.ndarray:
    """Every one of the 65536 bf16 values, indexed by bit pattern (the test oracle's domain)."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(BFLOAT16)


def to_float16_counting(tensor: torch.Tensor) -> tuple[np.ndarray, int]:
    """The seed's lossy storage: bf16 -> float16, and how many values it altered.

    A value counts as altered when its float16 image does not equal it exactly
    (NaN stays NaN and counts as kept).
    """
    import torch

    exact = tensor.float()
    half = exact.to(torch.float16)
    back = half.float()
    altered = int(((back != exact) & ~(torch.isnan(back) & torch.isnan(exact))).sum())
    return half.numpy(), altered


def bfloat16_bits_from_float16_bits(bits: np.ndarray) -> np.ndarray:
    """bf16 bits of float16 values, rounded to nearest even (torch's ``.to(torch.bfloat16)``).

    Exact for every float16 that came from a bf16 value in float16's normal
    range; a recording stored as float16 (the seed's storage) is read this way.
    """
    with np.errstate(invalid="ignore"):  # NaN stays NaN
        return bits.view(np.float16).astype(BFLOAT16).view(np.uint16)
