"""Debian's Chromium, headless, driven by Playwright (no browser download: the system binary)."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--lang=en-US"]


def chromium_path() -> str:
    path = os.environ.get("SELMA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("no chromium: `scripts/dev.sh test` installs Debian's chromium")
    return path


_playwright = None


def _driver():
    """One Playwright driver for the whole test process: its sync API refuses a second one while the
    first is open, and a module-scoped page (tests/test_frontend.py) stays open across other tests."""
    global _playwright
    if _playwright is None:
        import atexit

        from playwright.sync_api import sync_playwright

        _playwright = sync_playwright().start()
        atexit.register(_playwright.stop)
    return _playwright


@contextmanager
def browser_page(width: int = 1400, height: int = 900, locale: str = "en-US"):
    """A fresh headless Chromium (its own process) with one page; pages of several calls may be open at once."""
    browser = _driver().chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
    try:
        context = browser.new_context(viewport={"width": width, "height": height}, locale=locale)
        page = context.new_page()
        page.console_errors = []  # type: ignore[attr-defined]
        page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
        page.on("pageerror", lambda e: page.console_errors.append(str(e)))
        page.failed_requests = []  # type: ignore[attr-defined]
        page.on("response", lambda r: r.status >= 400 and page.failed_requests.append(f"{r.status} {r.url}"))
        yield page
    finally:
        browser.close()


def open_comfyui(page, server, timeout_ms: int = 120_000, locale: str = "en") -> None:
    """Open the real frontend and wait until the app has registered the server's node types."""
    # Skip first-run dialogs (tutorial/templates) so screenshots show the graph.
    for key, value in {"Comfy.TutorialCompleted": True, "Comfy.Locale": locale}.items():
        try:
            server.post_json(f"/settings/{key}", value)
        except Exception:  # noqa: BLE001 - older servers: the dialog is merely cosmetic
            pass
    page.goto(server.url + "/", wait_until="domcontentloaded")
    page.wait_for_function(
        "() => window.app && window.app.graph && window.LiteGraph && "
        "window.LiteGraph.registered_node_types && 'SelmaListSkills' in window.LiteGraph.registered_node_types",
        timeout=timeout_ms)


LOAD_AND_CHECK_JS = """
async (wf) => {
  await window.app.loadGraphData(wf);
  await new Promise(r => setTimeout(r, 500));
  const nodes = window.app.graph.nodes || window.app.graph._nodes;
  const registered = window.LiteGraph.registered_node_types;
  const missing = nodes.filter(n => !(n.type in registered)).map(n => n.type);
  const dialogs = [...document.querySelectorAll('.p-dialog, .comfy-modal')]
      .filter(d => d.offsetParent !== null).map(d => d.innerText.slice(0, 300));
  const p = await window.app.graphToPrompt();
  const res = await window.app.api.fetchApi('/prompt', {method: 'POST',
      body: JSON.stringify({prompt: p.output, client_id: window.app.api.clientId})});
  const body = await res.json();
  return {count: nodes.length, types: nodes.map(n => n.type), missing, dialogs, status: res.status, body};
}
"""


def load_workflow(page, workflow: Path) -> dict:
    """Load a UI-format workflow into the graph, then queue it: returns what the frontend saw."""
    return page.evaluate(LOAD_AND_CHECK_JS, json.loads(workflow.read_text()))
