"""The README shows every node as the real frontend draws it, and those pictures are current; a fresh
node in the frontend saves exactly as many widget values as the workflow tools (harness.schema) assume.

``test_node_pictures_from_the_real_frontend`` draws each SELMA node alone in the pinned frontend and
saves it under ``test-artifacts/nodes/``; with ``SELMA_UPDATE_DOCS=1`` it also refreshes
``docs/nodes/<node id>.png``, the pictures the README embeds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageStat

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "nodes"
ARTIFACTS = REPO / "test-artifacts" / "nodes"
NODE_IDS = sorted(json.loads((REPO / "tests" / "snapshots" / "nodes.json").read_text()))

#: Draw one node alone at a fixed place, scale 1; return the page rectangle around it and its title.
DRAW_NODE_JS = """
(type) => {
  const app = window.app, LG = window.LiteGraph, canvas = app.canvas;
  app.graph.clear();
  const node = LG.createNode(type);
  app.graph.add(node);
  node.pos = [160, 190];  // clear of the menu bar and the side bar
  canvas.ds.scale = 1;
  canvas.ds.offset = [0, 0];
  canvas.deselectAll?.();
  canvas.setDirty(true, true);
  canvas.draw(true, true);
  const r = canvas.canvas.getBoundingClientRect();
  const title = LG.NODE_TITLE_HEIGHT || 30, pad = 12;
  return {x: r.left + node.pos[0] - pad, y: r.top + node.pos[1] - title - pad,
          width: node.size[0] + 2 * pad, height: node.size[1] + title + 2 * pad, title: node.title,
          widgets: (node.serialize().widgets_values || []).length};
}
"""


def test_readme_embeds_a_picture_of_every_node():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for node_id in NODE_IDS:
        picture = DOCS / f"{node_id}.png"
        assert picture.is_file(), f"{picture} missing: run the docs test with SELMA_UPDATE_DOCS=1"
        assert f"docs/nodes/{node_id}.png" in readme, f"README does not show {node_id}"
    for ref in re.findall(r"\(docs/[^)\s]+\)", readme):
        assert (REPO / ref[1:-1]).is_file(), f"README links a missing file {ref}"


@pytest.mark.comfy
@pytest.mark.browser
def test_node_pictures_from_the_real_frontend(comfy_server):
    from harness.browser import browser_page, open_comfyui
    from harness.schema import describe, widget_slots

    info = comfy_server.get_json("/object_info")
    schemas = {k: describe(v) for k, v in info.items()}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    drawn = {}
    with browser_page(width=1400, height=1000) as page:
        open_comfyui(page, comfy_server)
        page.wait_for_timeout(800)
        for node_id in NODE_IDS:
            box = page.evaluate(DRAW_NODE_JS, node_id)
            page.wait_for_timeout(250)  # DOM widgets (multiline text, galleries) settle
            clip = {k: box[k] for k in ("x", "y", "width", "height")}
            page.screenshot(path=str(ARTIFACTS / f"{node_id}.png"), clip=clip)
            drawn[node_id] = box["title"]
            # What a saved workflow stores for a fresh node: the count the workflow tools assume.
            assert box["widgets"] == widget_slots(schemas[node_id]), (node_id, box["widgets"])
    assert [e for e in page.console_errors if "selma" in e.lower()] == []
    for node_id, title in drawn.items():
        assert title == info[node_id]["display_name"], (node_id, title)
        with Image.open(ARTIFACTS / f"{node_id}.png") as im:
            assert im.width >= 200 and im.height >= 60, (node_id, im.size)
            spread = ImageStat.Stat(im.convert("L")).stddev[0]
        assert spread > 10, f"{node_id}: the picture is blank (grey-level std {spread:.1f})"
    if os.environ.get("SELMA_UPDATE_DOCS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        for node_id in NODE_IDS:
            shutil.copyfile(ARTIFACTS / f"{node_id}.png", DOCS / f"{node_id}.png")
