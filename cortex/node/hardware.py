"""Hardware detection: CPU cores and model, RAM, GPUs and their memory, free disk.

`cortex init` sizes the generated config from `detect_hardware()`, and a node announces
`hardware_summary()` in its `PeerJoined`. GPUs come from torch when its CUDA build sees
them, else from `nvidia-smi` when that tool is on PATH (a CPU build of torch on a GPU
machine), else there are none. Every probe reads Linux /proc files or standard library calls
first and falls back to a portable value, so detection never fails: an unknown value is 0
or "unknown".
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cortex.node.config import NodeConfig

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
NVIDIA_SMI_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mb: int


@dataclass(frozen=True)
class Hardware:
    """Facts about this machine, from which `cortex init` sizes the config."""

    cpu_cores: int  # cores this process may run on
    cpu_model: str
    machine: str  # platform.machine(), such as x86_64
    ram_mb: int
    gpus: tuple[Gpu, ...]
    gpu_source: str  # "torch", "nvidia-smi" or "none"
    torch_cuda: bool  # whether torch can use the GPUs (a CPU build of torch cannot)
    disk_free_mb: int  # on the file system of the path given to detect_hardware

    @property
    def gpu_memory_mb(self) -> int:
        return sum(gpu.memory_mb for gpu in self.gpus)


def cpu_cores() -> int:
    """Return the number of CPU cores this process may use (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, else platform.processor(), else "unknown"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() in ("model name", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_mb() -> int:
    """Return the total RAM in MiB (MemTotal of /proc/meminfo, else sysconf), or 0 if unknown."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024  # the value is in KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MIB
    except (AttributeError, ValueError, OSError):
        return 0


def disk_free_mb(path: Path) -> int:
    """Return the free MiB on the file system that contains `path`, or its nearest existing parent."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free // MIB
    except OSError:
        return 0


def torch_gpus() -> tuple[Gpu, ...]:
    """Return the GPUs torch can use; none with a CPU build of torch or without torch."""
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        gpus.append(Gpu(name=properties.name, memory_mb=properties.total_memory // MIB))
    return tuple(gpus)


def nvidia_smi_gpus() -> tuple[Gpu, ...]:
    """Return the GPUs `nvidia-smi` lists; none if it is not on PATH or fails."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return ()
    command = [tool, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("nvidia-smi failed: %s; reporting no GPUs", error)
        return ()
    if result.returncode != 0:
        logger.warning("nvidia-smi exited with status %d: %s", result.returncode, result.stderr.strip()[:200])
        return ()
    gpus = []
    for line in result.stdout.splitlines():
        name, _, memory = line.rpartition(",")
        try:
            gpus.append(Gpu(name=name.strip(), memory_mb=int(float(memory.strip()))))
        except ValueError:
            logger.warning("nvidia-smi printed a line this parser does not understand: %r", line)
    return tuple(gpus)


def detect_hardware(disk_path: Path, use_torch: bool = True) -> Hardware:
    """Detect this machine's hardware; `disk_path` names where the node will store its data."""
    gpus = torch_gpus() if use_torch else ()
    source = "torch" if gpus else "none"
    torch_cuda = bool(gpus)
    if not gpus:
        gpus = nvidia_smi_gpus()
        source = "nvidia-smi" if gpus else "none"
    return Hardware(
        cpu_cores=cpu_cores(),
        cpu_model=cpu_model(),
        machine=platform.machine() or "unknown",
        ram_mb=ram_mb(),
        gpus=gpus,
        gpu_source=source,
        torch_cuda=torch_cuda,
        disk_free_mb=disk_free_mb(disk_path),
    )


def hardware_summary(config: NodeConfig) -> dict[str, int | str | bool]:
    """Return what peers may want to know about this machine, for PeerJoined."""
    gpus = torch_gpus()
    return {
        "cpus": os.cpu_count() or 0,
        "cpu_model": cpu_model(),
        "ram_mb": ram_mb(),
        "gpus": len(gpus),
        "gpu_memory_mb": sum(gpu.memory_mb for gpu in gpus),
        "torch_threads": config.torch_threads,
        "device": config.device,
        "dtype": config.dtype,
        "cuda": bool(gpus),
        "machine": platform.machine(),
    }
