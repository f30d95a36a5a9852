"""Helpers of the web-extension tests (tests/test_web_*.py): expert files in a live server's loras folder,
and the JavaScript that loads an API-format graph into the real frontend and queues it from there."""

from __future__ import annotations

import uuid
from pathlib import Path

#: Load an API-format graph into the frontend (node ids kept), optionally queue it as the Run button
#: would (this page's client id: the server's events for the prompt come to this page).
LOAD_API_GRAPH_JS = """
async ([graph, queue]) => {
  await window.app.loadApiJson(graph, 'selma-test.json');
  await new Promise(r => setTimeout(r, 300));
  if (!queue) return null;
  const p = await window.app.graphToPrompt();
  const res = await window.app.api.fetchApi('/prompt', {method: 'POST',
      body: JSON.stringify({prompt: p.output, client_id: window.app.api.clientId})});
  return {status: res.status, body: await res.json()};
}
"""


def write_web_experts(loras: Path) -> tuple[str, list[str]]:
    """Two experts (ranks 4 and 2, different alphas) in a new sub-folder of ``loras``: (folder, listed names)."""
    from merge_helpers import write_expert

    folder = f"webtest-{uuid.uuid4().hex[:8]}"
    write_expert(loras / folder / "a.safetensors", rank=4, alpha=8.0, seed=1, te=False)
    write_expert(loras / folder / "b.safetensors", rank=2, alpha=2.0, seed=2, te=False)
    return folder, [f"{folder}/a.safetensors", f"{folder}/b.safetensors"]
