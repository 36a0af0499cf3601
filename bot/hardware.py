"""What this machine's CPU and GPU can do, read at run time (the 2-core machines change CPU model by the day).

    >>> cpu_has_fast_bf16()          # AMD EPYC with avx512_bf16: True; an Intel Xeon without it: False
    >>> gpu_memory_bytes("cuda:0")   # the card's memory, or SELFCOG_GPU_MEMORY_GB when that is set
    >>> release_openmp_threads()     # this thread's idle OpenMP workers exit (see there why)
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

GPU_MEMORY_ENV = "SELFCOG_GPU_MEMORY_GB"  # use at most this much of the GPU (a share of a bigger card)


def cpu_has_fast_bf16(flags_text: str | None = None) -> bool:
    """Whether the CPU flags (/proc/cpuinfo's, or ``lscpu``'s text) list bf16 matrix instructions
    (AVX512-BF16 or AMX-BF16). Without them torch emulates bf16 and it is slower than fp32."""
    if flags_text is None:
        cpuinfo = Path("/proc/cpuinfo")
        flags_text = cpuinfo.read_text() if cpuinfo.exists() else ""
    return bool({"avx512_bf16", "amx_bf16"} & set(flags_text.split()))


@functools.lru_cache(maxsize=1)
def _torch_openmp():
    """torch's own libgomp (the process may hold other copies, e.g. sentencepiece's), or None."""
    import torch

    for path in sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*")):
        library = ctypes.CDLL(str(path))  # the copy torch loaded: same path, same handle
        return library if hasattr(library, "omp_pause_resource_all") else None
    return None  # another OpenMP runtime (Intel's, LLVM's) or none: nothing to do


def release_openmp_threads() -> bool:
    """Let the calling thread's idle OpenMP workers exit; the thread's next parallel operator starts them again.

    Each thread that runs torch operators keeps a team of OpenMP workers, and while a process holds more
    of them than it has cores, libgomp has every worker spin only 1,000 times before it sleeps, whatever
    GOMP_SPINCOUNT says. On 2 cores the serving engine's idle team beside the in-process trainer's made
    training 15-20% slower (7 steps: 9.4-9.9 s against 8.5-8.7 s; finetune/RECIPES.md, "... a trainer no idle
    thread slows"). Returns whether it did."""
    library = _torch_openmp()
    return library is not None and library.omp_pause_resource_all(1) == 0  # 1 = omp_pause_soft


def gpu_memory_cap_gb() -> float | None:
    """SELFCOG_GPU_MEMORY_GB as a number, None when unset (use the whole card)."""
    raw = os.environ.get(GPU_MEMORY_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1
    if value <= 0:
        from bot.errors import UserError

        raise UserError(f"{GPU_MEMORY_ENV} must be a number of GB above 0, not {raw!r}")
    return value


def apply_gpu_memory_cap(device: str) -> None:
    """Make torch's allocator in this process stop at SELFCOG_GPU_MEMORY_GB on ``device`` (no-op when unset)."""
    cap = gpu_memory_cap_gb()
    if cap is None or not device.startswith("cuda"):
        return
    import torch

    index = _index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), index)


def _index(device: str) -> int:
    """"cuda:1" -> 1; "cuda" -> the current device (torch's allocator calls want an index)."""
    import torch

    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def gpu_memory_bytes(device: str) -> int:
    """The memory this process may use on ``device``: the card's, or the cap."""
    import torch

    total = torch.cuda.get_device_properties(_index(device)).total_memory
    cap = gpu_memory_cap_gb()
    return min(total, int(cap * 2**30)) if cap else total


def gpu_free_bytes(device: str) -> int:
    """What is still free for this process on ``device``: the card's free memory, within the cap."""
    import torch

    free, _ = torch.cuda.mem_get_info(_index(device))
    if gpu_memory_cap_gb() is None:
        return free
    return max(0, min(free, gpu_memory_bytes(device) - torch.cuda.memory_reserved(_index(device))))
