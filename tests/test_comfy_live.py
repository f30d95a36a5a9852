"""The pack inside a real ComfyUI 0.3.75 server: registration, execution, events, routes, comfy-cli."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness.comfy import collect_events
from harness.schema import describe, shrink

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
BIN = Path(sys.executable).parent


def _snapshot_ids() -> set[str]:
    return set(json.loads((REPO / "tests" / "snapshots" / "nodes.json").read_text()))


def test_object_info_lists_every_selma_node(comfy_server):
    info = comfy_server.get_json("/object_info")
    ours = {k for k, v in info.items() if v["python_module"].startswith("custom_nodes.ComfyUI-SELMA")}
    assert ours, "the pack did not load:\n" + comfy_server.log_tail()
    assert all(k.startswith("Selma") for k in ours)
    assert ours == _snapshot_ids()
    log = comfy_server.log_tail(2000)
    assert "Error while calling comfy_entrypoint" not in log and "IMPORT FAILED): " + str(
        comfy_server.base_dir / "custom_nodes" / "ComfyUI-SELMA") not in log


def test_graph_executes_and_its_outputs_are_in_history(comfy_server):
    entry = comfy_server.run({"1": {"class_type": "SelmaListSkills", "inputs": {"include_user_skills": True}}})
    text = entry["outputs"]["1"]["text"][0]
    ids = [line.split("\t")[0] for line in text.splitlines()]
    for skill in ("localized_narratives", "countbench", "diffusiondb", "whoops", "coco", "spatial", "attributes", "product"):
        assert skill in ids


def test_user_skill_file_shows_up_in_the_node(comfy_server):
    folder = comfy_server.base_dir / "user" / "selma" / "skills"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "signage.toml").write_text(
        'id = "signage"\nname = "Shop signage"\ninstruction = "Describe shop fronts with legible signs."\n'
        'examples = ["a bakery with a red sign", "a blue sign above a flower shop", "a neon sign in a bar window"]\n'
        'word_limit = 30\nflip = "never"\n')
    try:
        entry = comfy_server.run({"1": {"class_type": "SelmaListSkills", "inputs": {"include_user_skills": True}}})
        assert "signage\tShop signage\t<30 words\tflip: never" in entry["outputs"]["1"]["text"][0]
        entry = comfy_server.run({"1": {"class_type": "SelmaListSkills", "inputs": {"include_user_skills": False}}})
        assert "signage" not in entry["outputs"]["1"]["text"][0]
    finally:
        (folder / "signage.toml").unlink()


def test_selma_routes_are_registered_once_from_the_entrypoint(comfy_server):
    assert comfy_server.get_json("/selma/version")["version"]
    skills = comfy_server.get_json("/selma/skills")
    assert {"countbench", "spatial", "product"} <= {s["id"] for s in skills}


def test_websocket_delivers_execution_and_progress_events(comfy_server):
    ws = comfy_server.listen()
    try:
        prompt_id = comfy_server.queue({"1": {"class_type": "SelmaListSkills", "inputs": {"include_user_skills": False}}})
        seen = [e["type"] for e in collect_events(ws, prompt_id)]
    finally:
        ws.close()
    assert "execution_start" in seen and "executed" in seen and seen[-1] == "execution_success"
    assert "progress_state" in seen  # per-node progress, what the frontend's bars read


def _comfy_cli(server, workflow: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"), DO_NOT_TRACK="1")
    return subprocess.run([str(BIN / "comfy"), "--skip-prompt", "--no-enable-telemetry", "run", "--workflow", str(workflow),
                           "--wait", "--host", "127.0.0.1", "--port", str(server.port)],
                          capture_output=True, text=True, env=env, timeout=300)


# Each workflow's API copy right after its UI file: the same graph, so ComfyUI's cache answers the second.
WORKFLOW_CASES = [(path, fmt) for p in sorted(WORKFLOWS.glob("*.json"))
                  for path, fmt in ((p, "ui"), (WORKFLOWS / "api" / p.name, "api")) if path.is_file()]


@pytest.mark.parametrize("wf,fmt", WORKFLOW_CASES, ids=[f"{f}-{p.stem}" for p, f in WORKFLOW_CASES])
def test_comfy_cli_runs_every_bundled_workflow(comfy_server, tmp_path, wf, fmt):
    """Each bundled file, with its sizes and steps made tiny for the CPU (harness.schema.TINY_SETTINGS)."""
    schemas = {k: describe(v) for k, v in comfy_server.get_json("/object_info").items()}
    small = tmp_path / wf.name
    small.write_text(json.dumps(shrink(json.loads(wf.read_text()), schemas)))
    before = set(comfy_server.get_json("/history"))
    out = _comfy_cli(comfy_server, small, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    new = {k: v for k, v in comfy_server.get_json("/history").items() if k not in before}
    assert len(new) == 1, out.stdout
    (entry,) = new.values()
    assert entry["status"]["status_str"] == "success"
    assert entry["outputs"], "the workflow produced no output"
