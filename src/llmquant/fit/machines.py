"""Machines ``fit`` sizes models for: a catalog (data), ``--ram/--vram`` descriptions, and ``this``
machine (RAM from /proc/meminfo, memory bandwidth measured in about half a second).

Bandwidths are the vendors' peak figures (GB/s = 1e9 bytes/s); memory sizes are binary (a "16 GB"
machine has 16 GiB). ``isa`` selects which tensor types llama.cpp's CPU backend repacks
(``ggml-cpu/repack.cpp``), which matters for memory on CPU-only machines.
"""

from __future__ import annotations

import difflib
import os
import re
import time
import sys
from dataclasses import dataclass, replace

from ..errors import LlmquantError
from ..system import default_threads, meminfo

GiB = 1 << 30


class UnknownMachineError(LlmquantError):
    def __init__(self, name: str, close: list[str]):
        self.name = name
        self.close = close
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `llmquant fit --machine list`"
        super().__init__(f"unknown machine {name!r}{hint}")


class SizeError(LlmquantError):
    def __init__(self, text: str, problem: str):
        self.text = text
        super().__init__(f"bad size {text!r}: {problem}")


@dataclass(frozen=True)
class Machine:
    name: str
    label: str
    kind: str  # "cpu" (system RAM only) | "apple" (unified memory, Metal) | "gpu" (discrete CUDA GPUs)
    ram: int  # bytes of system (or unified) memory
    bandwidth: float  # GB/s of that memory
    vram: int = 0  # bytes per GPU
    gpus: int = 0
    gpu_bandwidth: float = 0.0  # GB/s per GPU
    isa: str = "avx2"  # "avx2" | "avx512" | "neon" | "neon_i8mm" | "none"
    available: int | None = None  # measured free memory (this machine only)
    measured: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "kind": self.kind, "ram_bytes": self.ram,
                "bandwidth_gbs": self.bandwidth, "gpus": self.gpus, "vram_bytes": self.vram,
                "gpu_bandwidth_gbs": self.gpu_bandwidth, "isa": self.isa, "available_bytes": self.available,
                "measured": self.measured}


def _apple(name: str, label: str, ram_gb: int, bw: float, isa: str = "neon_i8mm") -> Machine:
    return Machine(name, label, "apple", ram_gb * GiB, bw, isa=isa)


def _gpu(name: str, label: str, vram_gb: int, gpu_bw: float, gpus: int = 1, ram_gb: int = 32,
         ram_bw: float = 51.2) -> Machine:
    return Machine(name, label, "gpu", ram_gb * GiB, ram_bw, vram=vram_gb * GiB, gpus=gpus, gpu_bandwidth=gpu_bw)


def _cpu(name: str, label: str, ram_gb: int, bw: float, isa: str = "avx2") -> Machine:
    return Machine(name, label, "cpu", ram_gb * GiB, bw, isa=isa)


# Apple: M1 68.25, M2/M3 100, M4 120, M3 Pro 150, M4 Pro 273, M3 Max 300/400, M4 Max 410/546,
# M2 Max 400, M2 Ultra 800, M3 Ultra 819 GB/s. GPU hosts: DDR4-3200 dual channel (51.2 GB/s) unless
# said otherwise. NVIDIA: 3060 360, 3090 936, 4060 272, 4070 504, 4080 716.8, 4090 1008, 5090 1792,
# A100-80GB SXM 2039, H100 SXM 3350 GB/s.
CATALOG: tuple[Machine, ...] = (
    _apple("macbook-air-m1-8gb", "MacBook Air M1, 8 GB", 8, 68.25, isa="neon"),
    _apple("macbook-air-m2-8gb", "MacBook Air M2, 8 GB", 8, 100),
    _apple("macbook-air-m2-16gb", "MacBook Air M2, 16 GB", 16, 100),
    _apple("macbook-air-m3-16gb", "MacBook Air M3, 16 GB", 16, 100),
    _apple("macbook-air-m4-16gb", "MacBook Air M4, 16 GB", 16, 120),
    _apple("macbook-air-m4-24gb", "MacBook Air M4, 24 GB", 24, 120),
    _apple("macbook-pro-m3-pro-18gb", "MacBook Pro M3 Pro, 18 GB", 18, 150),
    _apple("macbook-pro-m4-pro-24gb", "MacBook Pro M4 Pro, 24 GB", 24, 273),
    _apple("macbook-pro-m4-pro-48gb", "MacBook Pro M4 Pro, 48 GB", 48, 273),
    _apple("macbook-pro-m3-max-36gb", "MacBook Pro M3 Max (30-core GPU), 36 GB", 36, 300),
    _apple("macbook-pro-m3-max-128gb", "MacBook Pro M3 Max (40-core GPU), 128 GB", 128, 400),
    _apple("macbook-pro-m4-max-36gb", "MacBook Pro M4 Max (32-core GPU), 36 GB", 36, 410),
    _apple("macbook-pro-m4-max-128gb", "MacBook Pro M4 Max (40-core GPU), 128 GB", 128, 546),
    _apple("mac-mini-m4-16gb", "Mac mini M4, 16 GB", 16, 120),
    _apple("mac-mini-m4-pro-64gb", "Mac mini M4 Pro, 64 GB", 64, 273),
    _apple("mac-studio-m2-max-32gb", "Mac Studio M2 Max, 32 GB", 32, 400),
    _apple("mac-studio-m2-max-96gb", "Mac Studio M2 Max, 96 GB", 96, 400),
    _apple("mac-studio-m2-ultra-64gb", "Mac Studio M2 Ultra, 64 GB", 64, 800),
    _apple("mac-studio-m2-ultra-192gb", "Mac Studio M2 Ultra, 192 GB", 192, 800),
    _apple("mac-studio-m3-ultra-96gb", "Mac Studio M3 Ultra, 96 GB", 96, 819),
    _apple("mac-studio-m3-ultra-512gb", "Mac Studio M3 Ultra, 512 GB", 512, 819),
    _gpu("rtx-3060-12gb", "RTX 3060 12 GB + 32 GB DDR4", 12, 360),
    _gpu("rtx-3090", "RTX 3090 24 GB + 64 GB DDR4", 24, 936, ram_gb=64),
    _gpu("rtx-4060-8gb", "RTX 4060 8 GB + 32 GB DDR4", 8, 272),
    _gpu("rtx-4070-12gb", "RTX 4070 12 GB + 32 GB DDR5", 12, 504, ram_bw=89.6),
    _gpu("rtx-4080", "RTX 4080 16 GB + 64 GB DDR5", 16, 716.8, ram_gb=64, ram_bw=89.6),
    _gpu("rtx-4090", "RTX 4090 24 GB + 64 GB DDR5", 24, 1008, ram_gb=64, ram_bw=89.6),
    _gpu("2x-rtx-4090", "2 x RTX 4090 (48 GB) + 128 GB DDR5", 24, 1008, gpus=2, ram_gb=128, ram_bw=89.6),
    _gpu("rtx-5090", "RTX 5090 32 GB + 64 GB DDR5", 32, 1792, ram_gb=64, ram_bw=89.6),
    _gpu("a100-80gb", "A100 80 GB SXM + 256 GB DDR4 (8 channels)", 80, 2039, ram_gb=256, ram_bw=204.8),
    _gpu("h100-80gb", "H100 80 GB SXM + 512 GB DDR5 (8 channels)", 80, 3350, ram_gb=512, ram_bw=307.2),
    _cpu("laptop-8gb", "x86 laptop, 8 GB DDR4 dual channel (CPU only)", 8, 51.2),
    _cpu("laptop-16gb", "x86 laptop, 16 GB DDR4 dual channel (CPU only)", 16, 51.2),
    _cpu("desktop-32gb", "x86 desktop, 32 GB DDR5-5600 dual channel (CPU only)", 32, 89.6),
    _cpu("desktop-64gb", "x86 desktop, 64 GB DDR5-5600 dual channel (CPU only)", 64, 89.6),
    _cpu("raspberry-pi-5-8gb", "Raspberry Pi 5, 8 GB LPDDR4X", 8, 17.1, isa="neon"),
)
_BY_NAME = {m.name: m for m in CATALOG}


def find_machine(name: str) -> Machine:
    """A catalog machine by name; a unique substring also works (``4090``, ``m2-ultra-192``)."""
    key = name.strip().lower().replace(" ", "-").replace("_", "-")
    if key == "this":
        return this_machine()
    if key in _BY_NAME:
        return _BY_NAME[key]
    hits = [m for m in CATALOG if key and key in m.name]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        # "4090" means rtx-4090, not 2x-rtx-4090: the shortest hit when every other hit contains it
        shortest = min(hits, key=lambda m: len(m.name))
        if all(shortest.name in m.name for m in hits):
            return shortest
        raise UnknownMachineError(name, [m.name for m in hits][:6])
    names = [m.name for m in CATALOG] + ["this"]
    close = difflib.get_close_matches(key, names, n=5, cutoff=0.4)
    if not close:
        parts = [p for p in re.split(r"[-]", key) if len(p) >= 2]
        close = [n for n in names if any(p in n for p in parts)][:5]
    raise UnknownMachineError(name, close)


# -- sizes --------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SCALE = {"": GiB, "k": 1 << 10, "m": 1 << 20, "g": GiB, "t": 1 << 40}


def parse_size(text: str, *, what: str = "memory") -> int:
    """``16GB``, ``16g``, ``16 GiB``, ``512M``, ``1.5T``, ``24`` (GiB) -> bytes. Memory is sold in binary
    units, so GB means GiB here."""
    m = _SIZE.match(str(text))
    if not m:
        raise SizeError(text, "expected a number with an optional unit, e.g. 16GB, 512MB, 1.5TB")
    value = float(m[1]) * _SCALE[m[2].lower()]
    if value < 64 << 20:
        raise SizeError(text, f"{what} below 64 MiB cannot run an LLM")
    if value > 64 << 40:
        raise SizeError(text, f"{what} above 64 TiB is not a real machine")
    return int(value)


def custom_machine(ram: int, vram: int | None = None, *, bandwidth: float | None = None,
                   gpu_bandwidth: float | None = None) -> Machine:
    """A machine described by ``--ram`` (and ``--vram``): CPU-only, or one CUDA GPU. Bandwidths
    default to dual-channel DDR5 (89.6 GB/s) and an RTX 4090-class GPU (1008 GB/s)."""
    if vram:
        return Machine("custom", f"{ram / GiB:g} GiB RAM + {vram / GiB:g} GiB VRAM GPU", "gpu", ram,
                       bandwidth or 89.6, vram=vram, gpus=1, gpu_bandwidth=gpu_bandwidth or 1008.0)
    return Machine("custom", f"{ram / GiB:g} GiB RAM (CPU only)", "cpu", ram, bandwidth or 89.6)


# -- this machine --------------------------------------------------------------------------------------

def cpu_isa() -> str:
    """Which of llama.cpp's CPU repack paths this CPU takes (from /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "none"
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.partition(":")[2].split())
    if "avx512f" in flags and "avx2" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    if "i8mm" in flags:
        return "neon_i8mm"
    if "asimddp" in flags:
        return "neon"
    return "none"


def measure_bandwidth(seconds: float = 0.5, size: int = 256 << 20, threads: int | None = None) -> float:
    """Read bandwidth in GB/s: threads summing disjoint slices of a buffer larger than any cache (numpy
    releases the GIL in reductions), best of a few passes. Token generation reads weights the same way."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n_threads = default_threads(threads)
    buf = np.ones(size // 8, dtype=np.float64)
    parts = np.array_split(buf, n_threads)
    best = 0.0
    deadline = time.perf_counter() + seconds
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        list(pool.map(np.add.reduce, parts))  # warm up (page faults)
        while True:
            t0 = time.perf_counter()
            list(pool.map(np.add.reduce, parts))
            dt = time.perf_counter() - t0
            best = max(best, buf.nbytes / dt / 1e9)
            if time.perf_counter() > deadline:
                break
    return best


def this_machine(*, bandwidth: float | None = None) -> Machine:
    info = meminfo()
    ram = info.get("MemTotal") or (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    avail = info.get("MemAvailable", ram)
    bw = bandwidth if bandwidth is not None else measure_bandwidth()
    n_cpu = default_threads()
    return Machine("this", f"this machine ({n_cpu} CPUs, {ram / GiB:.1f} GiB RAM, {bw:.1f} GB/s measured)", "cpu",
                   int(ram), round(bw, 2), isa=cpu_isa(), available=int(avail), measured=True)


def with_gpus(machine: Machine, devices) -> Machine:
    """``machine`` with the GPU devices llama.cpp found on it (``runtime.llama.gpu_devices()``: objects with
    ``name``, ``description``, ``integrated`` and ``total`` bytes): Metal or an integrated GPU share the
    system memory (kind "apple"); dedicated GPUs give kind "gpu" with the smallest one's memory per GPU
    (llama.cpp splits layers by free memory; the smallest bounds an even split)."""
    if not devices:
        return machine
    label = f"{machine.label} with {', '.join(d.description or d.name for d in devices)}"
    if sys.platform == "darwin" or all(d.integrated for d in devices):
        return replace(machine, kind="apple", label=label)
    return replace(machine, kind="gpu", label=label, vram=min(d.total for d in devices), gpus=len(devices),
                   gpu_bandwidth=machine.gpu_bandwidth or 1008.0)
