"""What this machine's CPU and GPU can do, read at run time (the 2-core machines change CPU model by the day).

    >>> cpu_has_fast_bf16()          # AMD EPYC with avx512_bf16: True; an Intel Xeon without it: False
    >>> gpu_memory_bytes("cuda:0")   # the card's memory, or SELFCOG_GPU_MEMORY_GB when that is set
    >>> release_openmp_threads()     # this thread's idle OpenMP workers exit (see there why)
    >>> one_malloc_arena(); keep_freed_memory()   # a CPU engine's process keeps the memory it frees (see there)
    >>> give_back_freed_memory()     # ... until the engine goes idle
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


# glibc's mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc (its malloc takes these settings), else None (macOS, musl: nothing to do)."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


# Set by the user, these tune glibc's malloc at the process's start, and they win: e.g. MALLOC_TRIM_THRESHOLD_
# makes a CPU server give memory back again (see keep_freed_memory).
USER_MALLOC_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                        "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _malloc_settings_are_ours() -> bool:
    return _glibc() is not None and not any(name in os.environ for name in USER_MALLOC_SETTINGS)


def one_malloc_arena() -> bool:
    """Have every thread that starts from now on allocate from glibc's main arena (``keep_freed_memory``
    keeps only that arena's memory). Call it before other threads start; returns whether it was set."""
    return _malloc_settings_are_ours() and _glibc().mallopt(_M_ARENA_MAX, 1) == 1


def keep_freed_memory() -> bool:
    """Keep memory that tensors free in this process, for the next tensors, instead of giving it back to
    the kernel; returns whether it was set. For a process that computes on the CPU.

    glibc gives every block over 32 MB back as it is freed (a training step's vocabulary-sized logits are
    ~80 MB, an evaluation's KV cache 3 GB), and its heap back when its top is free. Memory taken again is
    then faulted in page by page, zeroed by the kernel; on a VM that hands freed memory to its host (this
    project's machines: Firecracker with free page reporting) each such fault also goes to the host. A
    retrain faulted 5.8 million pages here, 16 s of system time; kept, 1.5 million and 8.5 s, and the
    training took 65-67 s against 69-73 s (finetune/RECIPES.md, "Memory the process keeps"). The process
    holds on to its peak (the evaluation's KV cache within its budget, a trainer's copy of the weights)
    until the engine goes idle (give_back_freed_memory). Not on a GPU host, where a model's load can pass
    15 GB through host memory once. What this does not help: glibc's heap fragments across trainings whose
    tensors change size, kept or not; the CPU recipe pads each step's packed row to a few lengths for that
    (Recipe.packed_row_multiple; finetune/RECIPES.md, "Why a later retrain trains slower").
    Nothing is changed when the user tunes malloc (USER_MALLOC_SETTINGS)."""
    return (_malloc_settings_are_ours() and _glibc().mallopt(_M_MMAP_MAX, 0) == 1
            and _glibc().mallopt(_M_TRIM_THRESHOLD, -1) == 1)


def give_back_freed_memory() -> bool:
    """Hand the memory this process keeps (keep_freed_memory) but no longer uses back to the kernel:
    what the CPU engine does when it goes idle with its grown KV cache given back, at the end of an
    evaluation. Kept without it, the heap only grew, from 7.4 GB after the first retrain to 8.9 GB after
    the fifth. Returns whether glibc gave any back."""
    return _malloc_settings_are_ours() and _glibc().malloc_trim(0) == 1


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
