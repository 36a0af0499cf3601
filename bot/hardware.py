"""What this machine's CPU and GPU can do, read at run time (the 2-core machines change CPU model by the day).

    >>> cpu_has_fast_bf16()          # AMD EPYC with avx512_bf16: True; an Intel Xeon without it: False
    >>> gpu_memory_bytes("cuda:0")   # the card's memory, or SELFCOG_GPU_MEMORY_GB when that is set
"""

from __future__ import annotations

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
