"""Where tensors live: the device a run asks for, the memory it may use there, and a rank's shard of a
sharded (FSDP) tensor."""
from __future__ import annotations

import os

import torch

from d2v.core.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N as a torch.device that exists here; otherwise a ConfigError saying why."""
    name = name.strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name} was asked for, but no CUDA device is visible to torch")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {name} was asked for, but only {torch.cuda.device_count()} CUDA device(s) "
                              "are visible")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """run.precision "auto" as what it means on `device`: bf16 autocast on a CUDA GPU with bf16 support (Ampere and
    later), fp32 elsewhere (a CPU, older GPUs); any other value unchanged."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported(False):
        return "bf16"
    return "fp32"


def available_bytes(device: str) -> tuple[int, str]:
    """(bytes, where) of the memory a run on `device` may use: GPU memory, else the machine's RAM."""
    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else 0
        if index < torch.cuda.device_count():
            return torch.cuda.get_device_properties(index).total_memory, f"GPU {index}"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
    except (ValueError, OSError, AttributeError):
        return 0, "unknown"


def free_bytes(device: str) -> tuple[int, str]:
    """(bytes, where) of the memory free now on `device`: the GPU's free memory, else the RAM the kernel says is
    available (MemAvailable: free plus what it can reclaim); (0, "unknown") where neither can be read."""
    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else 0
        if index < torch.cuda.device_count():
            return torch.cuda.mem_get_info(index)[0], f"GPU {index}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "this machine's RAM"
    except (OSError, ValueError, IndexError):
        pass
    return 0, "unknown"


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly FSDP-sharded DTensor) parameter; the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t
