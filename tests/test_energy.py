"""The NVML energy path (``cost/energy.py``) against a fake driver counter, and its use in a sweep row.

No GPU is needed: ``pynvml`` is replaced by a fake whose total-energy counter advances by a known
amount per read, and CUDA's availability and synchronisation are patched, so the arithmetic from
counter readings to millijoules per image is checked exactly.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from dynavit.config import ExecConfig
from dynavit.cost.energy import EnergyMeter


class FakeNVML(types.ModuleType):
    """The few ``pynvml`` calls the meter makes; the counter is in millijoules, as NVML's is."""

    class NVMLError(Exception):
        pass

    def __init__(self, *, start: int = 1_000, step: int = 0, supported: bool = True) -> None:
        super().__init__("pynvml")
        self.counter, self.step, self.supported = start, step, supported
        self.handles: list[int] = []
        self.inits = 0

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's own names
        self.inits += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        self.handles.append(index)
        return f"gpu{index}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:  # noqa: N802
        if not self.supported:
            raise self.NVMLError("Not Supported")
        assert handle.startswith("gpu")
        value = self.counter
        self.counter += self.step
        return value


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA reported available on device 0; synchronising is a no-op."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


def install(monkeypatch, nvml: types.ModuleType | None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # None: ``import pynvml`` raises ImportError


def test_no_meter_on_a_cpu_even_with_nvml(monkeypatch) -> None:
    install(monkeypatch, FakeNVML())
    assert EnergyMeter.for_device("cpu") is None


def test_no_meter_without_cuda(monkeypatch) -> None:
    install(monkeypatch, FakeNVML())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert EnergyMeter.for_device("cuda") is None


def test_no_meter_without_nvidia_ml_py(monkeypatch, fake_cuda) -> None:
    install(monkeypatch, None)
    assert EnergyMeter.for_device("cuda") is None


def test_no_meter_on_a_gpu_without_an_energy_counter(monkeypatch, fake_cuda) -> None:
    nvml = FakeNVML(supported=False)  # pre-Volta: nvmlDeviceGetTotalEnergyConsumption raises
    install(monkeypatch, nvml)
    assert EnergyMeter.for_device("cuda") is None
    assert nvml.inits == 1


def test_meter_reads_the_counter_difference_in_millijoules(monkeypatch, fake_cuda) -> None:
    nvml = FakeNVML(start=5_000, step=0)
    install(monkeypatch, nvml)
    meter = EnergyMeter.for_device("cuda:1")
    assert meter is not None and nvml.handles == [1]  # the device's own index, not the current device
    meter.start()
    nvml.counter += 1_234  # the work between start and stop
    assert meter.stop() == 1_234.0
    assert meter.read_mj() == 5_000 + 1_234
    assert isinstance(meter.read_mj(), int)


def test_meter_uses_the_current_device_when_none_is_named(monkeypatch, fake_cuda) -> None:
    nvml = FakeNVML()
    install(monkeypatch, nvml)
    assert EnergyMeter.for_device("cuda") is not None
    assert nvml.handles == [0]


def test_sweep_row_reports_energy_per_image(monkeypatch, fake_cuda, assets) -> None:
    """The evaluator divides the counter's difference by the timed runs (and by mux): mJ per image."""
    from dynavit.sweep.run import SweepTarget

    _, _, ev, _ = SweepTarget(model=str(assets / "models" / "deit-tiny-patch16-224"),
                              data=str(assets / "imagenet-samples"), limit=4, batch_size=4, n_boot=20,
                              latency_repeats=5).build(progress=False)
    assert ev.energy is None  # a CPU model: nothing to read, energy unknown
    assert ev.measure(ExecConfig()).energy_mj is None
    nvml = FakeNVML(start=0, step=0)
    ev.energy = EnergyMeter("gpu0", nvml)

    real_forward = type(ev.dm.module).forward

    def forward(self, *args, **kwargs):
        nvml.counter += 30  # 30 mJ per forward pass
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(ev.dm.module), "forward", forward)
    row = ev.measure(ExecConfig())
    assert row.energy_mj == pytest.approx(30.0)  # 5 timed passes x 30 mJ / 5 repeats / 1 image per pass
