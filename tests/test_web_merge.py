"""POST /selma/merge/preview in a live ComfyUI: the merge report of the weights editor, computed in memory
(same numbers as the written merge, nothing written), names only from ComfyUI's loras list; and the
merge node's `selma.progress` events."""

from __future__ import annotations

import json
import urllib.error
import uuid
from pathlib import Path

import pytest
from harness.comfy import collect_events
from harness.web import write_web_experts

from selma_backend.merge.files import merge_files
from selma_backend.merge.preview import widget_config

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def experts(comfy_server):
    return write_web_experts(comfy_server.base_dir / "models" / "loras")


def _files(root: Path) -> set[tuple[str, int]]:
    return {(str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _preview(server, **body):
    base = {"method": "svd", "weights": "", "rank": 0, "density": 0.5, "block_weights": "", "seed": 0}
    return server.post_json("/selma/merge/preview", {**base, **body}, timeout=120)


def _refused(server, **body) -> str:
    with pytest.raises(urllib.error.HTTPError) as e:
        _preview(server, **body)
    assert e.value.code == 400
    return e.value.read().decode()


@pytest.mark.parametrize("method,weights,rank", [("svd", "0.7, 0.3", 3), ("linear", "", 0), ("ties", "1,0.5", 2)])
def test_preview_reports_what_the_written_merge_reports_and_writes_nothing(comfy_server, experts, tmp_path,
                                                                           method, weights, rank):
    folder, names = experts
    loras = comfy_server.base_dir / "models" / "loras"
    before = _files(loras)
    out = _preview(comfy_server, lora_names="\n".join(names) + "\n", method=method, weights=weights, rank=rank)
    assert _files(loras) == before  # a preview writes nothing
    config = widget_config(method, weights, rank, 0.5, "", 0)
    written = merge_files([loras / n for n in names], tmp_path / "m.safetensors", config)
    report = out["report"]
    assert report["out"] is None and report["file_size"] is None and "(in memory)" in out["text"]
    assert report["rank"] == written.rank
    assert report["error"] == pytest.approx(written.error, rel=1e-9, abs=1e-12)
    assert report["method_error"] == pytest.approx(written.method_error, rel=1e-9, abs=1e-12)
    assert report["weights"] == pytest.approx(list(written.weights))
    assert [s["file"] for s in report["sources"]] == ["a.safetensors", "b.safetensors"]
    assert f"{method} merge of 2 experts" in out["text"]


@pytest.mark.parametrize("name", ["../../x.safetensors", "/etc/passwd", "nope.safetensors",
                                  "webtest/../../../comfyui.log"])
def test_preview_accepts_only_names_comfyui_lists(comfy_server, experts, name):
    _, names = experts
    text = _refused(comfy_server, lora_names=f"{names[0]}\n{name}")
    assert text.startswith("lora_names:") and name in text


@pytest.mark.parametrize("field,value,needle", [("weights", "1, 2, 3", "weights"), ("weights", "a,b", "weights"),
                                                ("method", "blend", "blend"), ("rank", "4", "rank"),
                                                ("density", 0.0, "density"), ("block_weights", "middle=1", "block_weights"),
                                                ("lora_names", "", "lora_names"), ("lora_names", ["a"], "lora_names")])
def test_preview_refuses_bad_values_with_a_message_naming_the_field(comfy_server, experts, field, value, needle):
    _, names = experts
    body = {"lora_names": "\n".join(names), field: value}
    assert needle in _refused(comfy_server, **body)


def test_preview_refuses_a_body_that_is_not_json(comfy_server):
    req = comfy_server.url + "/selma/merge/preview"
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(req, data=b"{not json", method="POST"), timeout=30)
    assert e.value.code == 400 and "body" in e.value.read().decode()


def test_merge_node_sends_progress_for_its_node(comfy_server, experts):
    _, names = experts
    graph = {"31": {"class_type": "SelmaMergeExperts", "inputs": {
        "lora_names": "\n".join(names), "method": "svd", "weights": "0.5, 0.5", "rank": 2, "density": 0.5,
        "block_weights": "", "seed": 0, "name": f"webtest-{uuid.uuid4().hex[:6]}"}}}
    ws = comfy_server.listen()
    try:
        pid = comfy_server.queue(graph)
        events = collect_events(ws, pid)
    finally:
        ws.close()
    assert events[-1]["type"] == "execution_success", json.dumps(events[-1])[:2000]
    progress = [e["data"] for e in events if e["type"] == "selma.progress"]
    assert progress and {p["node"] for p in progress} == {"31"} and {p["stage"] for p in progress} == {"merge"}
    assert progress[-1]["step"] == progress[-1]["total"] > 1  # one step per module
    merged = comfy_server.wait(pid)["outputs"]["31"]["text"][0]
    assert "svd merge of 2 experts" in merged


def test_preview_reloads_an_expert_that_changed_on_disk(tmp_path):
    """The preview keeps the last experts loaded; a file rewritten since must be read again."""
    from merge_helpers import write_expert

    from selma_backend.merge.preview import preview_merge

    a = write_expert(tmp_path / "a.safetensors", rank=4, alpha=8.0, seed=1, te=False)
    b = write_expert(tmp_path / "b.safetensors", rank=2, alpha=2.0, seed=2, te=False)
    config = widget_config("svd", "", 2, 0.5, "", 0)
    first = preview_merge([a, b], config)
    assert preview_merge([a, b], config).error == first.error  # same files: same report
    b.unlink()
    write_expert(b, rank=4, alpha=4.0, seed=9, te=False)  # replaced: another size and time
    again = preview_merge([a, b], config)
    assert again.sources[1]["rank"] == 4 and again.error != first.error
    assert again.error == pytest.approx(merge_files([a, b], tmp_path / "m.safetensors", config).error, rel=1e-9)
