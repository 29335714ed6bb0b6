"""fastft.apps.bench.clocks: the SM clock and power sampled beside the benchmarks' timings (NVML on a card)."""
import time
from types import SimpleNamespace

import pytest
import torch

from fastft.apps.bench import clocks, harness


class FakeSource:
    """Readings in turn, the last one repeated; None (a failed read) is skipped by the log."""

    def __init__(self, readings):
        self.readings = list(readings)

    def read(self):
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


def test_a_window_averages_the_samples_taken_inside_it():
    log = clocks.ClockLog(interval_ms=1, source=FakeSource([None, (1980.0, 700.0), (1500.0, 500.0)]))
    try:
        assert log.sampling
        out, window = log.timed(lambda: time.sleep(0.1) or "done")
    finally:
        log.stop()
    assert out == "done" and window["samples"] >= 2  # (1 ms apart; a loaded machine may starve the thread)
    assert window["sm_mhz_min"] == 1500.0 and 1500.0 <= window["sm_mhz"] < 1980.0
    assert 500.0 <= window["power_w"] < 700.0
    assert log.window(0.0, 1e-9) is None  # no sample in that span
    stopped = len(log.samples)
    time.sleep(0.01)
    assert len(log.samples) == stopped  # stop() ended the thread


def test_without_a_card_nothing_is_sampled_and_time_cases_records_none(monkeypatch):
    monkeypatch.setattr(clocks, "_SHARED", None)
    log = clocks.clock_log()
    assert log is clocks.clock_log() and (log.sampling == torch.cuda.is_available())
    if torch.cuda.is_available():
        pytest.skip("a CUDA card: this checks the CPU fallback")
    cases = [dict(fn=lambda: None), dict(fn=lambda: None)]
    harness.time_cases(cases, rounds=2)
    assert all(c["sm_mhz_rounds"] == [None, None] and c["sm_mhz"] is None and c["power_w"] is None for c in cases)
    assert clocks.mean_or_none([None, 1500, 1601]) == 1550 and clocks.mean_or_none([None]) is None


def test_time_cases_records_each_rounds_clock(monkeypatch):
    log = clocks.ClockLog(interval_ms=1, source=FakeSource([(1755.0, 650.0)]))
    monkeypatch.setattr(harness, "clock_log", lambda: log)
    try:
        cases = [dict(fn=lambda: time.sleep(0.05))]  # 50 samples a round: none missed under load
        harness.time_cases(cases, rounds=3)
    finally:
        log.stop()
    assert cases[0]["sm_mhz_rounds"] == [1755] * 3 and cases[0]["sm_mhz"] == 1755 and cases[0]["power_w"] == 650


def test_record_round_keeps_each_round_and_the_mean_under_the_given_keys():
    row = {}
    clocks.record_round(row, dict(sm_mhz=1700.4, power_w=None), "qlora_mhz", "qlora_w")
    clocks.record_round(row, None, "qlora_mhz", "qlora_w")  # a round without samples
    clocks.record_round(row, dict(sm_mhz=1601.0, power_w=640.6), "qlora_mhz", "qlora_w")
    assert row == dict(qlora_mhz_rounds=[1700, None, 1601], qlora_mhz=1650, qlora_w_rounds=[None, None, 641],
                       qlora_w=641)


class FakeNvml:
    """libnvidia-ml's calls as _Nvml makes them; by_uuid: whether the UUID lookup succeeds."""

    def __init__(self, by_uuid: bool, count: int = 1):
        self.by_uuid, self.count, self.asked = by_uuid, count, []

    def nvmlInit_v2(self):
        return 0

    def nvmlDeviceGetHandleByUUID(self, name, handle):
        self.asked.append(name)
        handle._obj.value = 11 if self.by_uuid else None
        return 0 if self.by_uuid else 13

    def nvmlDeviceGetCount_v2(self, count):
        count._obj.value = self.count
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index, handle):
        handle._obj.value = 22
        return 0

    def nvmlDeviceGetClockInfo(self, handle, clock, mhz):
        assert clock == clocks.NVML_CLOCK_SM
        mhz._obj.value = 1980 if handle.value == 11 else 1590
        return 0

    def nvmlDeviceGetPowerUsage(self, handle, milliwatts):
        if self.count == 3:  # a card that does not report power (some virtual machines)
            return 3
        milliwatts._obj.value = 612_500
        return 0


def test_nvml_finds_the_cuda_device_by_uuid_and_falls_back_to_the_only_card(monkeypatch):
    props = SimpleNamespace(uuid="6c1f0b2e-0000-4000-8000-000000000001")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    lib = FakeNvml(by_uuid=True)
    assert clocks._Nvml(lib).read() == (1980.0, 612.5)
    assert lib.asked == [b"GPU-6c1f0b2e-0000-4000-8000-000000000001"]  # NVML's spelling of a UUID
    assert clocks._Nvml(FakeNvml(by_uuid=False)).read() == (1590.0, 612.5)  # one card: index 0
    with pytest.raises(OSError, match="UUID"):
        clocks._Nvml(FakeNvml(by_uuid=False, count=2))  # several cards and no UUID match: no guessing
    assert clocks._Nvml(FakeNvml(by_uuid=True, count=3)).read() == (1980.0, None)  # the clock without power


def test_a_card_without_power_readings_still_gives_its_clock(monkeypatch):
    log = clocks.ClockLog(interval_ms=1, source=FakeSource([(1700.0, None)]))
    monkeypatch.setattr(harness, "clock_log", lambda: log)
    try:
        _, window = log.timed(lambda: time.sleep(0.05))
        cases = [dict(fn=lambda: time.sleep(0.05))]
        harness.time_cases(cases, rounds=1)
    finally:
        log.stop()
    assert window["sm_mhz"] == 1700.0 and window["power_w"] is None
    assert clocks.rounded(window, "power_w") is None and clocks.rounded(None, "sm_mhz") is None
    assert cases[0]["sm_mhz"] == 1700 and cases[0]["power_w"] is None


def test_a_source_that_fails_ends_the_sampling_quietly():
    class Broken:
        def read(self):
            raise RuntimeError("NVML went away")
    log = clocks.ClockLog(interval_ms=1, source=Broken())
    _, window = log.timed(lambda: time.sleep(0.02))
    log.stop()
    assert window is None and log.samples == []
