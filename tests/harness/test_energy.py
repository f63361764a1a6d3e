"""Energy counters against a fake powercap tree (with wraparound) and a fake NVML."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantbench.harness.measure import energy


def _domain(root: Path, name: str, uj: int, max_uj: int) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (d / "name").write_text("package-0\n")
    return d


def test_rapl_sums_packages_and_handles_wraparound(tmp_path):
    p0 = _domain(tmp_path, "intel-rapl:0", 999_000_000, 1_000_000_000 - 1)
    p1 = _domain(tmp_path, "intel-rapl:1", 5_000_000, 262_143_328_850)
    _domain(tmp_path, "intel-rapl:0:0", 123, 1000)  # a sub-domain (core) inside package 0: not counted
    c = energy.RaplCounter(tmp_path)
    assert [d.name for d in c.domains] == ["intel-rapl:0", "intel-rapl:1"]
    assert c.read() == 0.0
    (p0 / "energy_uj").write_text("1500000\n")  # wrapped: 999.0 J -> 1000 J (max+1) -> 1.5 J = 2.5 J
    (p1 / "energy_uj").write_text("7000000\n")  # +2.0 J
    assert c.read() == pytest.approx(4.5)
    (p0 / "energy_uj").write_text("2500000\n")  # +1.0 J, no wrap
    assert c.read() == pytest.approx(5.5)


def test_rapl_missing_or_unreadable(tmp_path):
    counter, reason = energy.find_counter("cpu", tmp_path / "nope")
    assert counter is None and "no RAPL powercap counters" in reason
    (tmp_path / "empty").mkdir()
    counter, reason = energy.find_counter("cpu", tmp_path / "empty")
    assert counter is None and "no intel-rapl:N package domains" in reason


class FakeNVML:
    def __init__(self, step_mj: int = 250) -> None:
        self.mj, self.step, self.inited = 10_000_000, step_mj, False

    def nvmlInit(self) -> None:
        self.inited = True

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"gpu{i}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        assert self.inited and handle == "gpu0"
        self.mj += self.step
        return self.mj


def test_nvml_counter_and_measure():
    nv = FakeNVML(step_mj=250)
    counter, reason = energy.find_counter("cuda:0", nvml=nv)
    assert reason is None and counter.name == "nvml"
    assert counter.read() == pytest.approx(0.25)  # one read after the baseline: 250 mJ
    r = energy.measure(counter, lambda: 10, min_seconds=0.0)
    # one call of 10 tokens between two reads 250 mJ apart
    assert r["calls"] == 1 and r["tokens"] == 10 and r["joules"] == pytest.approx(0.25)
    assert r["j_per_token"] == pytest.approx(0.025)


def test_nvml_without_pynvml(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "pynvml":
            raise ImportError("no pynvml")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    counter, reason = energy.find_counter("cuda")
    assert counter is None and "pynvml" in reason


def test_measure_window_at_least_min_seconds():
    class Clockless:
        name = "fake"

        def read(self) -> float:
            return 0.0

    r = energy.measure(Clockless(), lambda: 1, min_seconds=0.05)
    assert r["seconds"] >= 0.05 and r["calls"] >= 1


def test_energy_metric(monkeypatch, tmp_path):
    from tests.harness.test_latency import LAT, make_ctx

    ctx = make_ctx(latency_p={**LAT, "decode_tokens": 2})
    (r,) = energy.energy_j_per_token(ctx, rapl_root=tmp_path / "absent")
    assert r.status == "unavailable" and r.value is None and "RAPL" in r.error

    nv = FakeNVML(step_mj=1000)
    monkeypatch.setattr(energy, "find_counter", lambda dev, root, nvml: (energy.NvmlCounter(nv), None))
    monkeypatch.setattr(energy, "MIN_WINDOW_S", 0.0)
    (r,) = energy.energy_j_per_token(ctx)
    # each window is one call between two reads 1 J apart: 1 J / tokens of that call
    assert r.status == "ok" and r.value == pytest.approx(1.0 / 2)
    assert r.protocol["prefill_j_per_token"] == pytest.approx(1.0 / 16) and r.protocol["counter"] == "nvml"
