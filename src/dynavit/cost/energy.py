"""GPU energy from the driver's energy counter (NVML), never wall-clock x TDP.

``EnergyMeter.for_device(device)`` returns ``None`` where there is nothing to read: a CPU,
no ``nvidia-ml-py``, or a GPU older than Volta (no total-energy counter). Callers then
report energy as unknown rather than inventing it.
"""

from __future__ import annotations

from typing import Any

import torch


class EnergyMeter:
    """Millijoules consumed by one GPU between ``start()`` and ``stop()`` (board energy)."""

    def __init__(self, handle: Any, nvml: Any) -> None:
        self._handle, self._nvml = handle, nvml
        self._start = 0

    @classmethod
    def for_device(cls, device: torch.device | str) -> EnergyMeter | None:
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises where unsupported
        except Exception:  # noqa: BLE001 - any NVML failure means "no counter here"
            return None
        return cls(handle, pynvml)

    def read_mj(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def start(self) -> None:
        torch.cuda.synchronize()
        self._start = self.read_mj()

    def stop(self) -> float:
        torch.cuda.synchronize()
        return float(self.read_mj() - self._start)
