"""The bundled workflows in ComfyUI's template browser.

ComfyUI 0.3.75 (app/custom_node_manager.py) lists a pack's ``workflows/*.json`` at GET
/workflow_templates ({pack folder: [names]}) and serves the folder under
/api/workflow_templates/<pack folder>/; both frontends show the list under Extensions, with
``<name>.jpg`` beside each file as the card picture (scripts/build_workflows.py draws them).
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
from harness.browser import browser_page, open_comfyui
from harness.comfy import PACK_DIR_NAME
from PIL import Image

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
TEMPLATES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
ARTIFACTS = REPO / "test-artifacts"
FRONTEND_OWN_ERRORS = ("[Jobs API]", "Failed to fetch jobs", "Failed to load resource")
OPENED = "selma_apply_experts"


def _get(server, path: str) -> tuple[bytes, str]:
    with server.request("GET", path) as r:
        return r.read(), r.headers.get("Content-Type", "")


def _build_script():
    spec = importlib.util.spec_from_file_location("build_workflows", REPO / "scripts" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_endpoint_lists_every_top_level_workflow_once(comfy_server):
    listed = comfy_server.get_json("/workflow_templates")
    assert sorted(listed[PACK_DIR_NAME]) == TEMPLATES  # workflows/api/ copies are not templates
    assert {"selma_full_pipeline", "selma_stage4_train", "selma_stage5_merge", "selma_stage6_evaluate",
            "selma_apply_experts", "selma_native_render"} <= set(TEMPLATES)


@pytest.mark.parametrize("name", TEMPLATES)
def test_each_template_is_served_as_bundled_with_its_thumbnail(comfy_server, name):
    body, _ = _get(comfy_server, f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json")
    assert json.loads(body) == json.loads((WORKFLOWS / f"{name}.json").read_text())
    picture, kind = _get(comfy_server, f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg")
    assert kind == "image/jpeg"
    assert Image.open(io.BytesIO(picture)).size == (512, 512)


@pytest.mark.parametrize("name", TEMPLATES)
def test_thumbnail_shows_the_current_graph(name):
    """Redrawn from the JSON, the picture is the bundled one (JPEG noise aside): regenerate after edits."""
    import numpy as np

    drawn = np.asarray(_build_script().thumbnail(json.loads((WORKFLOWS / f"{name}.json").read_text())), dtype=float)
    bundled = np.asarray(Image.open(WORKFLOWS / f"{name}.jpg").convert("RGB"), dtype=float)
    assert drawn.shape == bundled.shape
    assert np.abs(drawn - bundled).mean() < 3.0, "run scripts/build_workflows.py to redraw the thumbnails"
    assert drawn.std() > 10  # not a blank picture


@pytest.mark.browser
def test_template_browser_lists_and_opens_our_templates(any_frontend):
    which, server = any_frontend
    ARTIFACTS.mkdir(exist_ok=True)
    opened = json.loads((WORKFLOWS / f"{OPENED}.json").read_text())
    with browser_page() as page:
        served = []
        page.on("response", lambda r: f"/workflow_templates/{PACK_DIR_NAME}/" in r.url and served.append(
            (r.url.rsplit("/", 1)[-1], r.status)))
        open_comfyui(page, server)
        page.wait_for_timeout(1000)
        baseline = len(page.console_errors)
        page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        page.get_by_text(PACK_DIR_NAME, exact=True).first.click(timeout=30_000)  # Extensions -> our pack
        for name in TEMPLATES:
            page.get_by_text(name, exact=True).first.wait_for(timeout=15_000)
        page.wait_for_timeout(1000)  # the thumbnails
        page.screenshot(path=str(ARTIFACTS / f"frontend-{which}-templates.png"))
        page.get_by_text(OPENED, exact=True).first.click()
        page.wait_for_function(f"() => (window.app.graph.nodes || window.app.graph._nodes).length === "
                               f"{len(opened['nodes'])}", timeout=15_000)
        page.wait_for_timeout(500)
        types = page.evaluate("() => (window.app.graph.nodes || window.app.graph._nodes).map(n => n.type)")
        missing = page.evaluate("() => (window.app.graph.nodes || window.app.graph._nodes)"
                                ".filter(n => !(n.type in window.LiteGraph.registered_node_types)).map(n => n.type)")
        page.screenshot(path=str(ARTIFACTS / f"frontend-{which}-template-opened.png"))
    assert sorted(types) == sorted(n["type"] for n in opened["nodes"]) and missing == []
    assert (f"{OPENED}.json", 200) in served
    pictures = {name for name, status in served if name.endswith(".jpg") and status == 200}
    assert pictures == {f"{n}.jpg" for n in TEMPLATES}, served
    added = [e for e in page.console_errors[baseline:] if not any(p in e for p in FRONTEND_OWN_ERRORS)]
    assert added == [], added
