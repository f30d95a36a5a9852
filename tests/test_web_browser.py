"""The web extensions in the real frontend (the one ComfyUI 0.3.75 pins and the newest): live progress on the
right node (stage, step/total, ETA, loss sparkline; listeners gone with the node; Japanese), a real training
run's progress, and the merge-weights editor writing `weights` and previewing the merge report."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness.browser import browser_page, open_comfyui
from harness.web import LOAD_API_GRAPH_JS, write_web_experts

pytestmark = [pytest.mark.comfy, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"


def _selma_errors(page) -> list[str]:
    return [e for e in page.console_errors if "selma" in e.lower()]


def _wait_extension(page, name: str) -> None:
    page.wait_for_function(f"() => (window.app.extensions || []).some(e => e.name === '{name}')", timeout=30_000)


# Two SELMA nodes: events for node 5 must show on node 5 only.
PROGRESS_GRAPH = {"5": {"class_type": "SelmaTrainExperts", "inputs": {"name": "experts"}},
                  "9": {"class_type": "SelmaGeneratePrompts", "inputs": {"count": 10}}}

DISPATCH_JS = """
() => {
  const nodes = window.app.graph.nodes || window.app.graph._nodes;
  const node = nodes.find(n => String(n.id) === '5'), other = nodes.find(n => String(n.id) === '9');
  node.pos = [120, 110]; other.pos = [800, 110];
  for (const [step, eta, loss] of [[1, null, 0.9], [2, 16, 0.55], [3, 14.2, 0.7]])
    window.app.api.dispatchCustomEvent('selma.progress', {node: '5', prompt_id: 'p', stage: 'train', label: 'counting',
      step, total: 10, elapsed_s: 2 * step, eta_s: eta, loss});
  window.app.graph.setDirtyCanvas(true, true);
  const view = node.selmaProgress, canvas = view.canvas;
  const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let drawn = 0;
  for (let i = 3; i < px.length; i += 4) drawn += px[i] > 0 ? 1 : 0;
  return {text: view.root.innerText, points: Number(canvas.dataset.points), drawn, other: other.selmaProgress ?? null};
}
"""

REMOVE_JS = """
() => {
  const ext = window.app.extensions.find(e => e.name === 'selma.progress');
  const nodes = window.app.graph.nodes || window.app.graph._nodes;
  const node = nodes.find(n => String(n.id) === '5');
  const before = ext.liveListeners();
  const element = node.selmaProgress.root;
  window.app.graph.remove(node);
  const after = ext.liveListeners();
  let error = null;
  try {
    window.app.api.dispatchCustomEvent('selma.progress', {node: '5', prompt_id: 'p', stage: 'train', step: 4,
      total: 10, elapsed_s: 8, eta_s: 12, loss: 0.5});
  } catch (e) { error = String(e); }
  return {before, after, error, state: node.selmaProgress, stepAfter: element.dataset.step};
}
"""


def _load(page, graph: dict, queue: bool = False):
    return page.evaluate(LOAD_API_GRAPH_JS, [graph, queue])


def test_progress_events_show_on_their_node_and_listeners_go_with_it(any_frontend):
    which, server = any_frontend
    ARTIFACTS.mkdir(exist_ok=True)
    with browser_page() as page:
        open_comfyui(page, server)
        _wait_extension(page, "selma.progress")
        _load(page, PROGRESS_GRAPH)
        shown = page.evaluate(DISPATCH_JS)
        page.wait_for_timeout(400)
        page.screenshot(path=str(ARTIFACTS / f"web-{which}-progress.png"))
        removed = page.evaluate(REMOVE_JS)
        page.wait_for_timeout(200)
        errors = _selma_errors(page)
    assert "train · counting" in shown["text"] and "step 3/10" in shown["text"]
    assert "ETA 14 s" in shown["text"] and "loss 0.7000" in shown["text"]
    assert shown["points"] == 3 and shown["drawn"] > 20  # the sparkline drew its three losses
    assert shown["other"] is None  # node 9 never saw node 5's events
    assert removed["after"] == removed["before"] - 1 and removed["error"] is None
    assert removed["state"] is None and removed["stepAfter"] == "3"  # nothing listens for node 5 any more
    assert errors == [], errors


def test_progress_speaks_japanese(any_frontend):
    which, server = any_frontend
    with browser_page(locale="ja-JP") as page:
        open_comfyui(page, server, locale="ja")
        _wait_extension(page, "selma.progress")
        _load(page, PROGRESS_GRAPH)
        shown = page.evaluate(DISPATCH_JS)
        page.screenshot(path=str(ARTIFACTS / f"web-{which}-progress-ja.png"))
    assert "学習 · counting" in shown["text"] and "ステップ 3/10" in shown["text"] and "残り 14 s" in shown["text"]


SUBGRAPH_JS = """
() => {
  const root = window.app.rootGraph ?? window.app.graph;
  const node = (root.nodes || root._nodes).find(n => String(n.id) === '5');
  const { node: instance } = root.convertToSubgraph(new Set([node]));
  const inner = instance.subgraph.nodes.find(n => n.type === 'SelmaTrainExperts');
  const send = (id, step) => window.app.api.dispatchCustomEvent('selma.progress', {node: id, prompt_id: 'p',
    stage: 'train', label: 'subgraph', step, total: 10, elapsed_s: 4, eta_s: 16, loss: 0.5});
  send(`${instance.id}:${inner.id}`, 2);  // the execution id ComfyUI gives a node inside a subgraph
  const view = inner.selmaProgress;
  const first = view ? {text: view.root.innerText, step: view.root.dataset.step} : null;
  send(String(inner.id), 7);  // the same local id in the root graph is another node
  send(`999:${inner.id}`, 8);  // a path through no instance
  return {first, step: view ? view.root.dataset.step : null, instanceType: instance.type,
          instanceShows: instance.selmaProgress ?? null, innerGraphIsRoot: inner.graph === root};
}
"""


def test_progress_reaches_a_node_inside_a_subgraph(any_frontend):
    which, server = any_frontend
    with browser_page() as page:
        open_comfyui(page, server)
        _wait_extension(page, "selma.progress")
        _load(page, PROGRESS_GRAPH)
        shown = page.evaluate(SUBGRAPH_JS)
        errors = _selma_errors(page)
    assert shown["innerGraphIsRoot"] is False, shown  # the node really is inside a subgraph now
    assert shown["first"] is not None and "train · subgraph" in shown["first"]["text"], shown
    assert "step 2/10" in shown["first"]["text"] and shown["first"]["step"] == "2"
    assert shown["step"] == "2", shown  # events naming other nodes did not reach it
    assert errors == [], errors


def test_merge_editor_writes_weights_and_previews_the_report(any_frontend):
    which, server = any_frontend
    _, names = write_web_experts(server.base_dir / "models" / "loras")
    graph = {"21": {"class_type": "SelmaMergeExperts", "inputs": {
        "lora_names": "\n".join(names), "method": "svd", "weights": "", "rank": 2, "density": 0.5, "block_weights": "",
        "seed": 0, "name": "webtest"}}}
    node_js = "(window.app.graph.nodes || window.app.graph._nodes).find(n => String(n.id) === '21')"
    with browser_page(1400, 1000) as page:
        open_comfyui(page, server)
        _wait_extension(page, "selma.merge")
        _load(page, graph)
        page.evaluate(f"() => {{ const n = {node_js}; n.pos = [120, 110]; window.app.graph.setDirtyCanvas(true, true); }}")
        preview = page.locator(".selma-merge-preview")
        page.wait_for_function("() => document.querySelector('.selma-merge-preview')?.dataset.state === 'ok'",
                               timeout=60_000)
        first = preview.inner_text()
        assert page.locator(".selma-merge .w-row").count() == 2
        with page.expect_response(lambda r: "/selma/merge/preview" in r.url, timeout=60_000) as resp:
            page.locator(".selma-merge .w-slider").first.fill("1.5")
        assert resp.value.ok
        page.wait_for_function("(old) => { const p = document.querySelector('.selma-merge-preview');"
                               " return p.dataset.state === 'ok' && p.innerText !== old; }", arg=first, timeout=60_000)
        second = preview.inner_text()
        weights = page.evaluate(f"() => {node_js}.widgets.find(w => w.name === 'weights').value")
        box = page.locator(".selma-merge .w-value").first.input_value()
        page.screenshot(path=str(ARTIFACTS / f"web-{which}-merge-editor.png"))
        errors = _selma_errors(page)
    assert "+0.5 x a.safetensors" in first and "svd merge of 2 experts -> (in memory)" in first
    assert weights == "1.5, 0.5" and box == "1.5"
    assert "+1.5 x a.safetensors" in second and "+0.5 x b.safetensors" in second
    assert errors == [], errors


def test_merge_editor_shows_the_servers_refusal(comfy_server):
    graph = {"21": {"class_type": "SelmaMergeExperts", "inputs": {
        "lora_names": "../../outside.safetensors", "method": "svd", "weights": "", "rank": 0, "density": 0.5,
        "block_weights": "", "seed": 0, "name": "webtest"}}}
    with browser_page() as page:
        open_comfyui(page, comfy_server)
        _wait_extension(page, "selma.merge")
        _load(page, graph)
        page.wait_for_function("() => document.querySelector('.selma-merge-preview')?.dataset.state === 'error'",
                               timeout=60_000)
        text = page.locator(".selma-merge-preview").inner_text()
    assert "lora_names:" in text and "../../outside.safetensors" in text


def _train_graph(name: str) -> dict:
    from test_nodes_train import _graph

    graph = _graph(name, 4, name)
    graph["5"]["inputs"]["checkpoint_every"] = 100
    return graph


@pytest.mark.slow
def test_a_real_training_run_shows_its_progress_in_the_browser(comfy_server):
    """Prompts -> render -> train (4 steps) queued from the page: the render and train nodes show their progress,
    the train node its loss sparkline."""
    with browser_page(1400, 1100) as page:
        open_comfyui(page, comfy_server)
        _wait_extension(page, "selma.progress")
        page.evaluate("() => { window.__selmaSeen = []; window.app.api.addEventListener('selma.progress',"
                      " e => window.__selmaSeen.push(e.detail)); }")
        queued = _load(page, _train_graph("webtrain"), queue=True)
        assert queued["status"] == 200, queued
        comfy_server.wait(queued["body"]["prompt_id"], timeout=600)
        page.wait_for_function("() => { const n = (window.app.graph.nodes || window.app.graph._nodes)"
                               ".find(n => String(n.id) === '5'); return n?.selmaProgress?.root.dataset.step === '4'; }",
                               timeout=30_000)
        shown = page.evaluate("""() => {
          const nodes = window.app.graph.nodes || window.app.graph._nodes;
          const view = (id) => nodes.find(n => String(n.id) === id)?.selmaProgress;
          const train = view('5'), render = view('4');
          nodes.find(n => String(n.id) === '5').pos = [120, 110];
          window.app.graph.setDirtyCanvas(true, true);
          return {train: train.root.innerText, points: Number(train.canvas.dataset.points),
                  render: render?.root.innerText ?? null,
                  stages: [...new Set(window.__selmaSeen.map(d => d.stage + ':' + d.node))]};
        }""")
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "web-pinned-progress-live-train.png"))
        errors = _selma_errors(page)
    assert {"prompts:2", "render:4", "train:5"} <= set(shown["stages"]), shown["stages"]
    assert "train · spatial" in shown["train"] and "step 4/4" in shown["train"] and "loss" in shown["train"]
    assert shown["points"] >= 2  # real losses drawn
    assert shown["render"] is not None and "render" in shown["render"] and "step 3/3" in shown["render"]
    assert errors == [], errors
