"""thimble.training.host_memory: the training process's allocator keeps freed pages for the next step."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import thimble
from thimble.training.host_memory import host_allocator

SRC = str(Path(thimble.__file__).parents[1])

#: 300 MB arrays taken and freed every "step" between small ones, as a training step does with its logits and
#: their gradient; prints the page faults and the growth in resident MB of steps 4-13 (the heap settles in the
#: first steps, at up to two arrays more than a step holds at once)
STEPS = """
import resource, sys
sys.path.insert(0, {src!r})
from thimble.training.host_memory import keep_freed_memory
from thimble.training.host_memory import host_allocator
print(keep_freed_memory()['malloc'] if sys.argv[-1] == 'keep' else host_allocator()['malloc'])
import torch
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
import os
resident = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1e6
kept = []
for step in range(14):
    if step == 4:
        before, resident_at_4 = faults(), resident()
    logits = torch.empty(300_000_000, dtype=torch.uint8).fill_(1)
    kept = [torch.empty(size, dtype=torch.uint8).fill_(2) for size in (5000, 2_000_000, 700_000)]
    grad = torch.empty(300_000_000, dtype=torch.uint8).fill_(1)
    del logits, grad
print(faults() - before, resident() - resident_at_4)
"""


def steps(mode: str, thp: str) -> list[str]:
    return subprocess.run([sys.executable, "-c", STEPS.format(src=SRC), mode], capture_output=True, text=True,
                          check=True, env={**os.environ, "THP_MEM_ALLOC_ENABLE": thp}).stdout.split("\n")


def test_an_untouched_process_keeps_the_default_malloc():
    assert steps("default", "1")[0] == "default"


def test_nothing_is_set_once_torch_is_loaded():
    """torch has read THP_MEM_ALLOC_ENABLE by then: mallopt without its 2 MB alignment would grow the heap."""
    import torch  # noqa: F401  (this test process has it loaded already)
    from thimble.training.host_memory import keep_freed_memory

    assert keep_freed_memory()["malloc"] == host_allocator()["malloc"] == "default"


@pytest.mark.skipif(sys.platform != "linux", reason="mallopt is glibc's")
def test_kept_memory_serves_every_later_step_without_page_faults_or_growth():
    malloc, counts = steps("keep", "1")[:2]
    if not malloc.startswith("glibc"):
        pytest.skip("not glibc's malloc")
    faults, growth_mb = map(float, counts.split())
    # 10 steps of 600 MB on fresh pages are 146,000 faults of 4 kB (2,900 huge ones)
    assert faults < 200, counts
    assert abs(growth_mb) < 10, counts


def test_without_torchs_huge_page_alignment_malloc_is_left_alone():
    """torch's 64-byte alignment would grow glibc 2.36's heap by an array a step: nothing is set then."""
    assert steps("keep", "0")[0] == "default"
