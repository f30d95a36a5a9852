"""The real ComfyUI frontend, headless: bundled workflows load without missing nodes and queue
without validation errors — on the frontend ComfyUI 0.3.75 pins and on the newest one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness.browser import browser_page, load_workflow, open_comfyui
from harness.schema import describe, shrink

pytestmark = [pytest.mark.comfy, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
ARTIFACTS = REPO / "test-artifacts"
#: Errors the newest frontend logs against ComfyUI 0.3.75's older API whatever the graph (the Jobs
#: API arrived after 0.3.75). Anything else logged while our workflow loads and runs fails the test.
FRONTEND_OWN_ERRORS = ("[Jobs API]", "Failed to fetch jobs")


@pytest.fixture(scope="module", params=["pinned", "newest"])
def frontend_page(request):
    """(which, server, page): one browser page per frontend for every bundled workflow (the frontend boots once)."""
    which = request.param
    server = request.getfixturevalue("comfy_server" if which == "pinned" else "comfy_server_new_frontend")
    with browser_page() as page:
        open_comfyui(page, server)
        page.wait_for_timeout(1000)
        # The frontend logs errors of its own on an empty install (1.32.9: "reading 'id'" in
        # GraphView's load, also without this pack); each test judges what its workflow adds.
        page.at_open = [e for e in page.console_errors if "selma" in e.lower()]  # type: ignore[attr-defined]
        yield which, server, page


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_bundled_workflow_loads_and_queues_in_the_real_frontend(frontend_page, workflow, tmp_path):
    which, server, page = frontend_page
    ARTIFACTS.mkdir(exist_ok=True)
    # The bundled graph as saved, with sizes and steps made tiny so the CPU can run it (TINY_SETTINGS).
    schemas = {k: describe(v) for k, v in server.get_json("/object_info").items()}
    small = tmp_path / workflow.name
    small.write_text(json.dumps(shrink(json.loads(workflow.read_text()), schemas)))
    errors, failed = len(page.console_errors), len(page.failed_requests)
    result = load_workflow(page, small)
    if result["status"] == 200:
        server.wait(result["body"]["prompt_id"])
        page.wait_for_timeout(800)  # let the frontend draw the results (and log what it would)
    page.screenshot(path=str(ARTIFACTS / f"frontend-{which}-{workflow.stem}.png"))
    assert result["missing"] == [], result
    assert result["count"] >= 1
    assert not [d for d in result["dialogs"] if "missing" in d.lower() or "error" in d.lower()], result["dialogs"]
    assert result["status"] == 200, result["body"]
    assert result["body"].get("node_errors") in ({}, None), result["body"]
    # The frontend probes optional endpoints (404 "Failed to load resource"); judge only our own.
    ours = [r for r in page.failed_requests[failed:] if "selma" in r.lower()]
    assert ours == [], ours
    assert page.at_open == [], page.at_open
    added = [e for e in page.console_errors[errors:]
             if not e.startswith("Failed to load resource") and not any(p in e for p in FRONTEND_OWN_ERRORS)]
    assert added == [], added


def test_japanese_ui_shows_our_translations(any_frontend):
    which, server = any_frontend
    with browser_page(locale="ja-JP") as page:
        open_comfyui(page, server, locale="ja")
        load_workflow(page, REPO / "workflows" / "selma_list_skills.json")
        page.wait_for_timeout(500)
        title = page.evaluate("() => (window.app.graph.nodes || window.app.graph._nodes)[0].title")
        served = page.evaluate("async () => (await window.app.api.getCustomNodesI18n()).ja.nodeDefs.SelmaListSkills")
        page.screenshot(path=str(ARTIFACTS / f"frontend-{which}-ja.png"))
    assert served["inputs"]["include_user_skills"]["name"] == "ユーザースキルを含める"
    if which == "newest":
        assert title == "SELMA スキル一覧"
    else:  # 1.32.9 merges custom-node locales after registering nodes: titles stay English, menus and
        assert title == "SELMA List Skills"  # tooltips translate. If this starts failing, the pin moved.


def test_status_events_show_as_toasts(any_frontend):
    """web/js/selma_status.js: a `selma.status` event from the server becomes a toast."""
    which, server = any_frontend
    with browser_page() as page:
        open_comfyui(page, server)
        page.wait_for_function("() => (window.app.extensions || []).some(e => e.name === 'selma.status')",
                               timeout=30_000)  # web/js/selma_status.js registered
        page.evaluate("() => window.app.api.dispatchCustomEvent('selma.status', "
                      "{level: 'warning', title: 'SELMA render', text: 'out of memory: batch halved to 4'})")
        page.wait_for_selector("text=out of memory: batch halved to 4", timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / f"frontend-{which}-status-toast.png"))
    assert not [e for e in page.console_errors if "selma" in e.lower()]
