"""Stage 3 in a live ComfyUI: score and filter with the tiny open_clip model, the review routes
(confined to the output folder), and the review gallery in the real frontend."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
from pathlib import Path

import pytest
from harness.browser import browser_page, load_workflow, open_comfyui
from harness.schema import describe, shrink

from selma_backend.fsio import read_jsonl

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "api" / "selma_stage3_filter_review.json"


def _graph(project: str) -> dict:
    g = json.loads(WORKFLOW.read_text())
    g["2"]["inputs"].update(project=project, count=3)
    g["4"]["inputs"].update(steps=2, width=64, height=64)
    return g


@pytest.fixture(scope="module")
def filtered(comfy_server):
    entry = comfy_server.run(_graph("f1"))
    d = comfy_server.base_dir / "output" / "selma" / "f1" / "datasets" / "world_counting-seed0"
    return entry, d


def test_filter_writes_scores_and_keeps_the_best_image_per_prompt(comfy_server, filtered):
    entry, d = filtered
    rows = read_jsonl(d / "metadata.jsonl")
    assert len(rows) == 6 and all(isinstance(r["clip_score"], float) for r in rows)
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    for group in by_prompt.values():  # top_k_per_prompt = 1: exactly the better-scoring image stays
        best = max(group, key=lambda r: (r["clip_score"], r["file_name"]))
        assert [r["keep"] for r in group].count(True) <= 1
        assert all(r["keep"] is False for r in group if r is not best)
    assert "kept" in entry["outputs"]["8"]["text"][0]
    assert entry["outputs"]["7"]["selma_review"] == ["selma/f1/datasets/world_counting-seed0"]


def _get(server, path):
    return server.get_json(path)


def test_review_routes_read_and_persist(comfy_server, filtered):
    _, d = filtered
    key = "selma/f1/datasets/world_counting-seed0"
    rows = _get(comfy_server, f"/selma/dataset/rows?dataset={urllib.parse.quote(key)}")["rows"]
    first = rows[0]["file_name"]
    out = comfy_server.post_json("/selma/dataset/review", {"dataset": key, "file": first, "review": "reject"})
    assert out["effective_keep"] is False
    assert {r["file_name"]: r.get("review") for r in read_jsonl(d / "metadata.jsonl")}[first] == "reject"
    with comfy_server.request("GET", f"/selma/dataset/image?dataset={urllib.parse.quote(key)}&file={first}") as r:
        assert r.read()[:8] == b"\x89PNG\r\n\x1a\n"
    comfy_server.post_json("/selma/dataset/review", {"dataset": key, "file": first, "review": None})


@pytest.mark.parametrize("dataset", ["../x", "/etc", "selma/../../x", "..%2f..%2fetc", "%2e%2e/%2e%2e/etc"])
def test_review_routes_refuse_paths_outside_the_output_folder(comfy_server, dataset):
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(comfy_server, f"/selma/dataset/rows?dataset={dataset}")
    assert e.value.code in (400, 404)


def test_review_routes_refuse_symlinks_out_and_unlisted_files(comfy_server, filtered, tmp_path):
    _, d = filtered
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    link = comfy_server.base_dir / "output" / "outside-link"
    link.symlink_to(tmp_path)
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(comfy_server, "/selma/dataset/rows?dataset=outside-link")
        assert e.value.code == 400
    finally:
        link.unlink()
    key = urllib.parse.quote("selma/f1/datasets/world_counting-seed0")
    for file in ("metadata.jsonl", "../../../../comfyui.log", "dataset.json"):
        with pytest.raises(urllib.error.HTTPError) as e:
            comfy_server.request("GET", f"/selma/dataset/image?dataset={key}&file={urllib.parse.quote(file)}")
        assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        comfy_server.post_json("/selma/dataset/review", {"dataset": "selma/f1/datasets/world_counting-seed0",
                                                         "file": read_jsonl(d / "metadata.jsonl")[0]["file_name"],
                                                         "review": "maybe"})
    assert e.value.code == 400


@pytest.mark.browser
def test_gallery_click_rejects_an_image_and_it_persists(comfy_server, tmp_path):
    schemas = {k: describe(v) for k, v in comfy_server.get_json("/object_info").items()}
    ui = tmp_path / "review.json"
    ui.write_text(json.dumps(shrink(json.loads((REPO / "workflows" / "selma_stage3_filter_review.json").read_text()),
                                    schemas)))
    with browser_page(1600, 1000) as page:
        open_comfyui(page, comfy_server)
        result = load_workflow(page, ui)  # loads and queues the bundled workflow as the Run button would
        assert result["status"] == 200, result["body"]
        comfy_server.wait(result["body"]["prompt_id"], timeout=600)
        page.wait_for_selector(".selma-card", timeout=60_000)
        card = page.locator(".selma-card").first
        file_name = card.get_attribute("data-file")
        with page.expect_response(lambda r: "/selma/dataset/review" in r.url) as resp:
            card.click()
        assert resp.value.ok
        page.wait_for_timeout(300)
        page.screenshot(path=str(REPO / "test-artifacts" / "review-gallery.png"))
    d = comfy_server.base_dir / "output" / "selma" / "selma" / "datasets" / "world_counting-seed0"
    row = {r["file_name"]: r for r in read_jsonl(d / "metadata.jsonl")}[file_name]
    assert row["review"] in ("keep", "reject") and (row["review"] == "reject") == (row.get("keep") is not False)
