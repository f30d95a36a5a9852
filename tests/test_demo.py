"""`selma demo`: runs the built stages on embedded defaults, offline, and resumes instead of redoing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from selma_backend.fsio import read_jsonl

BIN = Path(sys.executable).parent


def test_demo_writes_every_artefact_offline_and_resumes(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf"))
    cmd = [str(BIN / "selma"), "demo", "--out", str(tmp_path / "d"), "--steps", "2", "--count", "12", "--skills",
           "countbench,product"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert set(manifest["models"]) == {"sd1", "sdxl", "mini-sd15", "clip", "llm"}
    for skill in ("countbench", "product"):
        rows = read_jsonl(manifest["prompts"][skill])
        assert len(rows) == 12 and {r["skill"] for r in rows} == {skill}
        images = read_jsonl(Path(manifest["datasets"][skill]) / "metadata.jsonl")
        assert len(images) == 24 and all(isinstance(r["clip_score"], float) for r in images)
        assert sum(r["keep"] for r in images) == 12 == manifest["filter"][skill]["kept"]  # best of 2 per prompt
        assert Path(manifest["filter"][skill]["histogram"]).is_file()
    from selma_backend.lora.format import load_lora, provenance

    for skill in ("countbench", "product"):
        tensors, meta = load_lora(manifest["experts"][skill])
        assert provenance(meta)["skill"] == skill and tensors
    merged = provenance(load_lora(manifest["merged"]["path"])[1])
    assert merged["config"]["method"] == "linear" and len(merged["sources"]) == 2
    assert Path(manifest["report"]).name == "index.html" and Path(manifest["report"]).is_file()
    assert manifest["pending_stages"] == []
    before = Path(manifest["prompts"]["countbench"]).read_bytes()
    again = subprocess.run(cmd[:-3] + ["16", "--skills", "countbench,product"], capture_output=True,
                           text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "skipped" in again.stdout and "8 rendered, 24 already there" in again.stdout  # resumed, not redone
    after = Path(manifest["prompts"]["countbench"]).read_bytes()
    assert after.startswith(before) and len(read_jsonl(manifest["prompts"]["countbench"])) == 16
    assert "already trained" not in again.stdout  # the data grew: the experts were trained again
    assert "already merged" not in again.stdout and "report-002" in again.stdout  # a new report, the old one kept


def test_demo_rejects_an_unknown_skill_before_doing_anything(tmp_path):
    out = subprocess.run([str(BIN / "selma"), "demo", "--out", str(tmp_path / "d"), "--skills", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "nope" in out.stderr
    assert not (tmp_path / "d").exists()
