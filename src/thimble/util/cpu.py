"""This machine's CPU as probes and recordings name it: its model name and the kernel set torch's CPU
dispatch picks, read from /proc/cpuinfo without importing torch (the rules' resources need it while
Snakemake builds the DAG; training records it)."""

from __future__ import annotations

import functools
import os
import platform


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    name, flags = "", frozenset()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not name:
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def cpu_capability_of(flags: frozenset[str]) -> str:
    """The kernel set torch's CPU dispatch picks for these /proc/cpuinfo flags, as
    ``torch.backends.cpu.get_cpu_capability()`` names it (ATEN_CPU_CAPABILITY can only lower it)."""
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        found = "AVX512"
    elif {"avx2", "fma"} <= flags:
        found = "AVX2"
    else:
        found = "DEFAULT"
    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").upper()
    order = ["DEFAULT", "AVX2", "AVX512"]
    if forced in order and order.index(forced) < order.index(found):
        return forced
    return found


def this_cpu() -> dict[str, str]:
    """This machine's CPU as a probe records it: its model name and torch's kernel capability."""
    name, flags = _cpuinfo()
    return {"device_name": name, "cpu_capability": cpu_capability_of(flags)}
