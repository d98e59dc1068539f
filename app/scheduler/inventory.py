"""GPU inventory behind one seam: NVML where a driver is present, else declared in settings.

``CORRAL_GPUS="0:24GiB,1:24GiB"`` declares a host's GPUs (how CPU-only hosts and the tests
describe multi-GPU machines); ``CORRAL_GPUS="auto"`` (the default) asks NVML and, with no
driver, reports no GPU.
"""

from __future__ import annotations

import re
import socket
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from app.core.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """``"24GiB"`` → 25769803776; plain numbers are bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read {text!r} as a size; use e.g. 24GiB, 512MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    """25769803776 → ``"24.00 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class GpuInfo:
    """One GPU of one host, as its inventory reports it."""

    host: str
    index: int
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int  # as the driver reports it now (declared GPUs: total)
    source: str  # "nvml" | "declared"

    @property
    def key(self) -> str:
        return f"{self.host}:{self.index}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class GpuInventory(Protocol):
    """Lists this host's GPUs with their current free memory."""

    def gpus(self) -> list[GpuInfo]: ...


class DeclaredInventory:
    """GPUs described in settings: ``INDEX:SIZE[:NAME]`` separated by commas."""

    def __init__(self, spec: str, host: str | None = None) -> None:
        self.host = host or socket.gethostname()
        self._gpus: list[GpuInfo] = []
        seen: set[int] = set()
        for item in filter(None, (p.strip() for p in spec.split(","))):
            parts = item.split(":")
            if len(parts) not in (2, 3) or not parts[0].isdigit():
                raise ConfigError(
                    f"CORRAL_GPUS entries are INDEX:SIZE[:NAME], e.g. 0:24GiB; got {item!r}"
                )
            index = int(parts[0])
            if index in seen:
                raise ConfigError(f"CORRAL_GPUS lists GPU {index} twice")
            seen.add(index)
            size = parse_bytes(parts[1])
            name = parts[2] if len(parts) == 3 else "declared GPU"
            self._gpus.append(
                GpuInfo(
                    self.host, index, f"declared-{self.host}-{index}", name, size, size, "declared"
                )
            )

    def gpus(self) -> list[GpuInfo]:
        return list(self._gpus)


class NvmlInventory:
    """GPUs as the NVIDIA driver reports them (``nvidia-ml-py``)."""

    def __init__(self, host: str | None = None) -> None:
        import pynvml

        self.host = host or socket.gethostname()
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise ConfigError(f"NVML is not available: {exc}") from exc

    def gpus(self) -> list[GpuInfo]:
        nvml = self._nvml
        out = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            out.append(
                GpuInfo(
                    self.host,
                    i,
                    uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    name.decode() if isinstance(name, bytes) else str(name),
                    int(mem.total),
                    int(mem.free),
                    "nvml",
                )
            )
        return out


class NoGpus:
    """A host without GPUs (models run on the CPU)."""

    def gpus(self) -> list[GpuInfo]:
        return []


def detect_inventory(spec: str, host: str | None = None) -> GpuInventory:
    """Declared GPUs when ``spec`` lists them; NVML for ``"auto"`` when a driver is present."""
    if spec.strip().lower() in ("", "auto"):
        try:
            return NvmlInventory(host)
        except (ConfigError, ImportError):
            return NoGpus()
    if spec.strip().lower() == "none":
        return NoGpus()
    return DeclaredInventory(spec, host)
