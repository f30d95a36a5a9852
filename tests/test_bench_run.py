"""bench/run.py: the one-command benchmark runs, writes its JSON schema, and its arithmetic holds."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("selma_bench_run", BENCH / "run.py")  # "run" alone is too generic
bench_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_run)


def test_tiny_dedup_end_to_end_json_schema_and_ratio(tmp_path):
    """The real CLI at --tiny size: one stage, 3 alternating repeats, medians, ratio = ours/reference speed."""
    out = tmp_path / "perf.json"
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--tiny", "--stages", "dedup", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result) >= {"stages", "machine", "quick", "seconds"}
    assert result["quick"] is False and result["size"] == "tiny" and result["seconds"] > 0
    assert set(result["machine"]) >= {"cpus", "cpu", "torch", "loadavg_before", "loadavg_after"}
    assert list(result["stages"]) == ["dedup"]
    d = result["stages"]["dedup"]
    assert d["unit"] == "prompts/s" and d["same_output"] is True and d["repeats"] == 3
    assert len(d["ours_s"]) == len(d["reference_s"]) == 3
    assert d["ours"] == pytest.approx(d["n"] / statistics.median(d["ours_s"]))  # median, not best
    assert d["reference"] == pytest.approx(d["n"] / statistics.median(d["reference_s"]))
    assert d["ratio"] == pytest.approx(d["ours"] / d["reference"])
    assert d["ratio"] > 10  # ours is orders of magnitude faster, even at 100 candidates
    assert d["target"] == 200.0 and d["meets_target"] is (d["ratio"] >= 200)
    table_line = next(line for line in proc.stdout.splitlines() if line.startswith("dedup "))
    assert f"{d['ratio']:.2f}x" in table_line and "same_output=True" in table_line


def test_unavailable_stage_is_reported_not_raised(tmp_path, monkeypatch):
    """A stage module that cannot be imported becomes an error entry; the exit code says so."""
    monkeypatch.setitem(sys.modules, "bench_merge", None)  # import bench_merge now raises ImportError
    out = tmp_path / "perf.json"
    assert bench_run.main(["--tiny", "--stages", "merge", "--json", str(out)]) == 1
    entry = json.loads(out.read_text())["stages"]["merge"]
    assert entry["error"].startswith("stage not available: ModuleNotFoundError") and "bench_merge" in entry["error"]
    assert entry["ratio"] is None and entry["meets_target"] is None and entry["target"] == 3.0


def test_targets_need_the_ratio_and_identical_output():
    ok = bench_run.finish_entry("dedup", {"ours": 500.0, "reference": 2.0, "unit": "prompts/s", "same_output": True})
    assert ok["ratio"] == 250.0 and ok["meets_target"] is True
    differs = bench_run.finish_entry("dedup", {"ours": 500.0, "reference": 2.0, "unit": "prompts/s",
                                               "same_output": False})
    assert differs["meets_target"] is False  # fast but wrong does not count
    slow = bench_run.finish_entry("render", {"ours": 1.2, "reference": 1.0, "unit": "images/s"})
    assert slow["ratio"] == pytest.approx(1.2) and slow["target"] == 1.3 and slow["meets_target"] is False
    e2e = bench_run.finish_entry("e2e", {"ours": 42.0, "reference": None, "unit": "s", "ratio": None})
    assert e2e["target"] is None and e2e["meets_target"] is None and e2e["ratio"] is None


def test_repeat_calls_reports_medians_of_each_arm():
    figures = iter([{"ours": 10.0, "reference": 1.0, "same_output": True},
                    {"ours": 30.0, "reference": 3.0, "same_output": True},
                    {"ours": 20.0, "reference": 9.0, "same_output": False}])
    out = bench_run.repeat_calls(lambda: next(figures), 3)
    assert out["ours"] == 20.0 and out["reference"] == 3.0 and out["repeats"] == 3
    assert out["ours_runs"] == [10.0, 30.0, 20.0] and out["same_output"] is False


def test_fewer_than_three_repeats_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench_run.main(["--tiny", "--repeats", "2"])
    assert "--repeats must be at least 3" in capsys.readouterr().err
