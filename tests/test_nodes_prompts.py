"""Stage 1 nodes inside a live ComfyUI: offline and OpenAI-compatible writers, caching, progress,
Cancel, and the API key never reaching a workflow, a PNG, an artefact or the log."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import pytest
from fakes.openai_server import FakeOpenAIServer, delay
from harness.comfy import ComfyServer, collect_events

from selma_backend.fsio import read_jsonl

pytestmark = pytest.mark.comfy

SECRET = "sk-selma-test-9f3b2c71d0e4a6b8c5"
REPO = Path(__file__).resolve().parents[1]


def generate_graph(count=30, seed=0, project="t", llm: dict | None = None, skill="spatial") -> dict:
    g = {"1": {"class_type": "SelmaSkill", "inputs": {"skill_id": skill}},
         "2": {"class_type": "SelmaGeneratePrompts",
               "inputs": {"skill": ["1", 0], "count": count, "seed": seed, "project": project, "dedup_threshold": 0.8,
                          "examples_per_request": 3, "batch_size": 10, "blocklist": ""}},
         "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}}}
    if llm is not None:
        g["4"] = {"class_type": "SelmaLLM", "inputs": {"backend": "openai", "base_url": llm["url"], "model": "tiny-chat",
                                                        "local_model": "selma-tiny-llm", "temperature": 1.0,
                                                        "max_tokens": 512, "timeout_s": 10.0, "max_retries": 2}}
        g["2"]["inputs"]["llm"] = ["4", 0]
    return g


def _prompts_file(server, project, skill, seed) -> Path:
    return server.base_dir / "output" / "selma" / project / "prompts" / f"{skill}-seed{seed}.jsonl"


def test_offline_generation_writes_the_file_and_is_cached_per_seed(comfy_server):
    entry = comfy_server.run(generate_graph(count=30, seed=5, project="cache"))
    path = _prompts_file(comfy_server, "cache", "spatial", 5)
    rows = read_jsonl(path)
    assert len(rows) == 30 and rows[0]["source"] == "offline"
    assert "30 prompts for skill 'spatial'" in entry["outputs"]["3"]["text"][0]
    mtime = path.stat().st_mtime_ns
    ws = comfy_server.listen()
    try:
        pid = comfy_server.queue(generate_graph(count=30, seed=5, project="cache"))
        events = collect_events(ws, pid)
    finally:
        ws.close()
    cached = [e for e in events if e["type"] == "execution_cached"]
    assert cached and "2" in cached[0]["data"]["nodes"]  # same inputs and seed: not run again
    assert path.stat().st_mtime_ns == mtime
    comfy_server.run(generate_graph(count=30, seed=6, project="cache"))
    assert len(read_jsonl(_prompts_file(comfy_server, "cache", "spatial", 6))) == 30  # a new seed does run


def test_project_name_cannot_escape_the_output_folder(comfy_server):
    g = generate_graph(project="../../escape")
    pid = comfy_server.queue(g)
    with pytest.raises(AssertionError, match="project: got"):
        comfy_server.wait(pid)
    assert not (comfy_server.base_dir.parent / "escape").exists()


def test_custom_skill_defined_in_the_node_needs_a_model_writer(comfy_server):
    g = generate_graph()
    g["1"] = {"class_type": "SelmaCustomSkill", "inputs": {
        "skill_id": "signage", "name": "Signage", "instruction": "Describe shop signs.",
        "examples": "a red sign\na blue sign above a door\na neon sign in a window", "word_limit": 30, "flip": "never"}}
    with pytest.raises(AssertionError, match="signage"):
        comfy_server.run(g)


@pytest.fixture(scope="module")
def keyed_server(comfyui_dir, tmp_path_factory, tiny_models):
    """A ComfyUI started with an API key in its environment, as a user would."""
    from harness.comfy import make_base_dir

    base = make_base_dir(tmp_path_factory.mktemp("keyed-base"))
    server = ComfyServer(comfyui_dir, base, extra_env={"SELMA_LLM_API_KEY": SECRET}).start()
    yield server
    server.stop()


def _saved_png(server, prompt_graph, workflow) -> Path:
    g = dict(prompt_graph)
    g["10"] = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
    g["11"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "keycheck"}}
    entry = server.run(g, extra_data={"extra_pnginfo": {"workflow": workflow}})
    image = entry["outputs"]["11"]["images"][0]
    return server.base_dir / "output" / image["subfolder"] / image["filename"]


def test_openai_writer_uses_the_key_but_never_saves_it(keyed_server):
    with FakeOpenAIServer(models=["tiny-chat"], api_key=SECRET) as llm:
        graph = generate_graph(count=25, seed=1, project="keyed", llm={"url": llm.base_url})
        workflow = {"nodes": [{"id": int(k), "type": v["class_type"], "widgets_values": list(v["inputs"].values())}
                              for k, v in graph.items()]}
        png = _saved_png(keyed_server, graph, workflow)
        assert llm.chat_requests and all(r.headers["authorization"] == f"Bearer {SECRET}" for r in llm.chat_requests)
    # The frontend saves workflows through /userdata; save one the same way and read it back.
    req = urllib.request.Request(f"{keyed_server.url}/userdata/workflows%2Fkeycheck.json", method="POST",
                                 data=json.dumps(workflow).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).close()
    rows = read_jsonl(_prompts_file(keyed_server, "keyed", "spatial", 1))
    assert len(rows) == 25 and rows[0]["source"] == "openai:tiny-chat"
    places = [png, *keyed_server.base_dir.joinpath("user").rglob("*.json"),
              *keyed_server.base_dir.joinpath("output", "selma").rglob("*"), keyed_server.log_path]
    history = json.dumps(keyed_server.get_json("/history")).encode()
    for place in places:
        if place.is_file():
            assert SECRET.encode() not in place.read_bytes(), place
    assert SECRET.encode() not in history
    assert b"SelmaGeneratePrompts" in png.read_bytes()  # the PNG really carries the workflow we checked


def test_progress_per_request_and_cancel_keeps_what_was_written(keyed_server):
    with FakeOpenAIServer(models=["tiny-chat"], api_key=SECRET) as llm:
        llm.push(*[delay(0.6) for _ in range(40)])  # slow replies: time to press Cancel
        graph = generate_graph(count=200, seed=2, project="cancel", llm={"url": llm.base_url})
        ws = keyed_server.listen()
        progress = []

        def on_event(event):
            if event["type"] == "progress" and event["data"].get("node") == "2":
                progress.append(event["data"]["value"])
                if len(progress) == 3:  # three requests done: the user presses Cancel
                    threading.Thread(target=keyed_server.post_json, args=("/interrupt", {})).start()

        try:
            pid = keyed_server.queue(graph)
            events = collect_events(ws, pid, on_event)
        finally:
            ws.close()
    assert events[-1]["type"] == "execution_interrupted"
    assert progress[:3] == sorted(progress[:3]) and progress[0] > 0
    rows = read_jsonl(_prompts_file(keyed_server, "cancel", "spatial", 2))
    assert progress[2] <= len(rows) < 200  # everything written before Cancel is kept; the run did stop
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_local_transformers_writer_from_models_llm(comfy_server):
    """The model loads from models/LLM with its chat template; the tiny one's 512-token context is too
    short for the in-context request, which must end in a clear error naming model and fix."""
    info = comfy_server.get_json("/object_info/SelmaLLM")["SelmaLLM"]["input"]["required"]
    assert "selma-tiny-llm" in info["local_model"][1]["options"]
    g = generate_graph(count=5, seed=0, project="local", llm={"url": "http://127.0.0.1:9/v1"})
    g["4"]["inputs"].update(backend="transformers", max_tokens=24)
    with pytest.raises(AssertionError, match="transformers:selma-tiny-llm: the prompt is .* tokens but the model's "
                       "context is 512; use fewer seed examples or a model with a longer context"):
        comfy_server.run(g)
    path = _prompts_file(comfy_server, "local", "spatial", 0)
    report = json.loads(path.with_name(path.stem + ".report.json").read_text())
    assert report["source"] == "transformers:selma-tiny-llm" and report["status"] == "failed"
