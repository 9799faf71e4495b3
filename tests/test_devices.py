"""Tests for batchfit.devices; the CUDA paths run against a monkeypatched torch.cuda."""

from __future__ import annotations

import pytest
import torch

from batchfit import devices
from batchfit.errors import ConfigError


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(" CPU ") == torch.device("cpu")
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu0", "", 3])
def test_unknown_devices_name_the_choices(name):
    with pytest.raises(ConfigError, match="cuda:N"):
        devices.resolve_device(name)


def test_unavailable_cuda_and_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        devices.resolve_device("cuda")
    with pytest.raises(ConfigError, match="MPS is not available"):
        devices.resolve_device("mps")


def _fake_cuda(monkeypatch, *, count=2, total=8 * 1024**3):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    class Properties:
        total_memory = total

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    fraction = {"value": 1.0}
    monkeypatch.setattr(
        torch.cuda, "get_per_process_memory_fraction", lambda device: fraction["value"]
    )

    def set_fraction(value, device):
        calls.append(("fraction", value))
        fraction["value"] = value

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 12345)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 678)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d: calls.append("sync"))
    return calls, fraction


def test_cuda_resolution_with_a_monkeypatched_gpu(monkeypatch):
    _fake_cuda(monkeypatch)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="2 CUDA device"):
        devices.resolve_device("cuda:5")


def test_cuda_memory_calls(monkeypatch):
    calls, _ = _fake_cuda(monkeypatch)
    gpu = torch.device("cuda", 0)
    assert devices.total_memory_bytes(gpu) == 8 * 1024**3
    devices.reset_peak_memory(gpu)
    devices.synchronize(gpu)
    devices.empty_cache(gpu)
    assert devices.peak_allocated_bytes(gpu) == 12345
    assert devices.allocated_bytes(gpu) == 678
    assert calls == ["reset", "sync", "empty"]


def test_memory_cap_sets_and_restores_the_fraction(monkeypatch):
    calls, fraction = _fake_cuda(monkeypatch)
    gpu = torch.device("cuda", 0)
    fraction["value"] = 0.9
    with pytest.raises(RuntimeError, match="inside"):
        with devices.memory_cap(gpu, 2 * 1024**3):
            assert fraction["value"] == 0.25
            raise RuntimeError("inside")
    assert fraction["value"] == 0.9
    assert calls == [("fraction", 0.25), ("fraction", 0.9)]
    with pytest.raises(ConfigError, match="larger than"):
        with devices.memory_cap(gpu, 9 * 1024**3):
            pass


def test_cpu_answers_none_and_does_nothing():
    cpu = torch.device("cpu")
    assert devices.total_memory_bytes(cpu) is None
    assert devices.peak_allocated_bytes(cpu) is None
    assert devices.allocated_bytes(cpu) is None
    devices.reset_peak_memory(cpu)
    devices.synchronize(cpu)
    devices.empty_cache(cpu)
    with devices.memory_cap(cpu, 1024):
        pass


def test_free_memory_on_the_cpu_from_meminfo(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n")
    assert devices._meminfo_available_bytes(str(meminfo)) == 1000 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")
    assert devices._meminfo_available_bytes(str(meminfo)) is None
    assert devices._meminfo_available_bytes(str(tmp_path / "absent")) is None
    free = devices.free_memory_bytes(torch.device("cpu"))
    assert free is None or free > 0
    assert devices.free_memory_bytes(torch.device("meta")) is None


def test_cuda_free_memory_counts_what_the_allocator_holds_unused(monkeypatch):
    _fake_cuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (5 * 1024**3, 8 * 1024**3))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 * 1024**3)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 512 * 1024**2)
    # 5 GiB the driver has free plus the 1.5 GiB this process's allocator caches unused.
    assert devices.free_memory_bytes(torch.device("cuda", 0)) == 6.5 * 1024**3
