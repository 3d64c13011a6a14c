"""How the training process takes memory from the kernel: the large arrays of one step reuse the pages of the
step before.

At thimble_7's shape a CPU step allocates the bf16 logits and their gradient (327 MB each) and frees them at its
end. glibc's malloc serves an array that large with a fresh ``mmap`` and hands it back with ``munmap`` when it
is freed, so every step touches ~650 MB of new pages: on a 2-core AMD EPYC VM 12,000-35,000 page faults and
0.2-0.8 s of kernel time a step, and steps whose time varied 1.5x from one to the next (docs/benchmarks.md).
Told to serve every size from its heap (``M_MMAP_MAX`` 0) and never to hand the heap back
(``M_TRIM_THRESHOLD`` at its largest), malloc reuses the freed pages: no page faults after the first steps.
Large arrays are also asked for on transparent huge pages (torch's ``THP_MEM_ALLOC_ENABLE``), so the pages
the first steps do touch cost 1/512 of the faults.

Where an array lives changes no bit of it (``bench/step_bench.py`` compares every step's bits). The price is
that memory freed is kept by the process until it ends, which is what a training loop that frees and takes
the same arrays every step wants. Torch-free: ``thimble train`` calls it before torch is imported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
#: the largest threshold mallopt takes (an int): the heap is trimmed only with 2 GiB free at its top
LARGEST_TRIM_THRESHOLD = 2**31 - 1
#: what ``keep_freed_memory`` set in this process's malloc
_MALLOC = "default"


def keep_freed_memory() -> dict:
    """Set this process's allocator for a training loop (see the module's text); what was set, for provenance.

    Only glibc's malloc has these settings, and they are set only with torch's 2 MB-aligned large arrays
    (``THP_MEM_ALLOC_ENABLE=1``, the default here): torch reads that at its first allocation, so nothing is
    set once torch is imported. Elsewhere (macOS, musl, huge pages turned off, torch already loaded) malloc
    is left as it is and the result says so. The heap kept is the main thread's, where a step takes its large
    arrays: glibc's other arenas (other threads') still map requests larger than their 64 MB heaps.
    """
    global _MALLOC
    if "torch" in sys.modules:
        return host_allocator()
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if os.environ["THP_MEM_ALLOC_ENABLE"] != "1":
        # torch then asks for 64-byte alignment, and glibc 2.36's memalign does not fit a same-sized request
        # into the hole a freed one leaves: the heap would grow by an array every step
        return host_allocator()
    libc = _glibc()
    if libc is None:
        return host_allocator()
    set_now = []
    for name, parameter, value in (("M_MMAP_MAX", M_MMAP_MAX, 0),
                                   ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, LARGEST_TRIM_THRESHOLD)):
        if libc.mallopt(parameter, value) == 1:
            set_now.append(f"{name} {value}")
    if set_now:
        _MALLOC = "glibc: " + ", ".join(set_now)
    return host_allocator()


def host_allocator() -> dict:
    """This process's allocator settings as training's provenance records them (``host_allocator``)."""
    return {"thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE", ""), "malloc": _MALLOC}


def _glibc():
    """The C library as a ctypes handle when it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (glibc's own symbol)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        return libc
    except (OSError, AttributeError, TypeError):
        return None
