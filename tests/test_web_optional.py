"""The web extensions are optional: a copy of the pack without web/ registers every node and its routes, and
runs a graph (the progress events then simply have no listener), while the real pack serves its scripts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from harness.comfy import PACK_DIR_NAME, ComfyServer, collect_events, make_base_dir

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[1]
NOT_COPIED = (".git", ".venv", "build", "tests", "test-artifacts", "bench", "web", "*.egg-info", "__pycache__",
              ".pytest_cache", ".ruff_cache")
GRAPH = {"1": {"class_type": "SelmaSkill", "inputs": {"skill_id": "spatial"}},
         "2": {"class_type": "SelmaGeneratePrompts", "inputs": {"skill": ["1", 0], "count": 3, "seed": 0,
                                                               "project": "noweb", "dedup_threshold": 0.8,
                                                               "examples_per_request": 3, "batch_size": 20,
                                                               "blocklist": ""}},
         "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}}}


@pytest.fixture(scope="module")
def server_without_web(comfyui_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-noweb")
    pack = base / "custom_nodes" / PACK_DIR_NAME
    shutil.copytree(REPO, pack, ignore=shutil.ignore_patterns(*NOT_COPIED), symlinks=True)
    assert not (pack / "web").exists() and (pack / "nodes" / "glue.py").is_file()
    server = ComfyServer(comfyui_dir, make_base_dir(base)).start()
    yield server
    server.stop()


def _ours(server) -> set[str]:
    info = server.get_json("/object_info")
    return {k for k, v in info.items() if v["python_module"].startswith(f"custom_nodes.{PACK_DIR_NAME}")}


def test_pack_without_web_registers_every_node_and_runs_a_graph(server_without_web, comfy_server):
    snapshot = set(json.loads((REPO / "tests" / "snapshots" / "nodes.json").read_text()))
    assert _ours(server_without_web) == snapshot == _ours(comfy_server)
    scripts = [e for e in server_without_web.get_json("/extensions") if PACK_DIR_NAME in e]
    assert scripts == []  # no web/: the frontend gets no SELMA script
    served = {e.rsplit("/", 1)[-1] for e in comfy_server.get_json("/extensions") if PACK_DIR_NAME in e}
    assert {"selma_progress.js", "selma_merge.js", "selma_review.js", "selma_status.js"} <= served
    assert server_without_web.get_json("/selma/version")["version"]  # routes do not depend on web/ either
    ws = server_without_web.listen()
    try:
        pid = server_without_web.queue(GRAPH)
        events = collect_events(ws, pid)
    finally:
        ws.close()
    assert events[-1]["type"] == "execution_success", events[-1]
    assert any(e["type"] == "selma.progress" for e in events)  # sent; nothing needs a listener
    out = server_without_web.wait(pid)["outputs"]["3"]["text"][0]
    assert "3" in out
    log = server_without_web.log_tail(400)
    assert not [line for line in log.splitlines() if PACK_DIR_NAME in line and ("Cannot import" in line
                                                                               or "IMPORT FAILED" in line)], log
