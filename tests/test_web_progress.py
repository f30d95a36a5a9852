"""`selma.progress` events: payloads, ETA and throttling (selma_backend.progress, a fake clock and send), and
in a live ComfyUI the events of real nodes over the websocket, carrying the executing node's id."""

from __future__ import annotations

import pytest
from harness.comfy import collect_events

from selma_backend.progress import MIN_INTERVAL_S, ProgressEvents


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _events(**kw):
    sent: list[dict] = []
    clock = Clock()
    events = ProgressEvents(sent.append, node="7", prompt_id="p1", stage="render", clock=clock, **kw)
    return events, sent, clock


def test_payload_has_every_field_and_eta_waits_for_an_observed_rate():
    events, sent, clock = _events(label="counting")
    clock.now += 2.0
    assert events(1, 5)
    assert sent[0] == {"node": "7", "prompt_id": "p1", "stage": "render", "label": "counting", "step": 1, "total": 5,
                       "elapsed_s": 2.0, "eta_s": None, "loss": None}
    clock.now += 1.0  # 1 step in 1 s since the first update: 3 steps left -> 3 s
    events(2, 5)
    assert sent[1]["eta_s"] == pytest.approx(3.0) and sent[1]["elapsed_s"] == pytest.approx(3.0)
    clock.now += 3.0  # 3 steps in 4 s: 0 left
    events(5, 5)
    assert sent[-1]["step"] == 5 and sent[-1]["eta_s"] == 0.0


def test_throttle_drops_updates_within_the_interval_but_never_the_first_or_the_last():
    events, sent, clock = _events()
    steps = []
    for step in range(1, 101):  # 100 steps, 10 ms apart: 1 s in all
        clock.now += 0.01
        if events(step, 100):
            steps.append(step)
    assert steps[0] == 1 and steps[-1] == 100
    assert len(sent) == len(steps) <= 1 + 1.0 / MIN_INTERVAL_S + 1  # ~4 a second, plus the first and the last
    gaps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(sent, sent[1:-1], strict=False)]
    assert all(g >= MIN_INTERVAL_S - 1e-9 for g in gaps)


def test_new_expert_resets_the_rate_and_is_sent_at_once_with_the_loss():
    events, sent, clock = _events()
    for step in (1, 2, 3):
        clock.now += 1.0
        events(step, 3, label="a", loss=0.5)
    clock.now += 0.01  # within the interval, but a new expert: sent, ETA unknown again
    assert events(1, 3, label="b", loss=0.25)
    assert sent[-1]["label"] == "b" and sent[-1]["eta_s"] is None and sent[-1]["loss"] == 0.25
    clock.now += 10.0  # the new run's rate: 1 step per 10 s
    events(2, 3, label="b", loss=float("nan"))
    assert sent[-1]["eta_s"] == pytest.approx(10.0) and sent[-1]["loss"] is None  # JSON has no NaN


def test_step_going_back_starts_a_new_run():
    events, sent, clock = _events()
    clock.now += 1.0
    events(4, 4)
    clock.now += 0.01
    assert events(1, 4)  # a second pass (another stage of the node): sent although within the interval
    assert sent[-1]["eta_s"] is None


# --- live: the real nodes, their events over the websocket -------------------------------------------------


def _prompts_graph(project: str) -> dict:
    return {
        "1": {"class_type": "SelmaSkill", "inputs": {"skill_id": "countbench"}},
        "12": {"class_type": "SelmaGeneratePrompts", "inputs": {"skill": ["1", 0], "count": 6, "seed": 3,
                                                                "project": project, "dedup_threshold": 0.8,
                                                                "examples_per_request": 3, "batch_size": 20,
                                                                "blocklist": ""}},
        "13": {"class_type": "PreviewAny", "inputs": {"source": ["12", 2]}},
    }


@pytest.mark.comfy
def test_live_nodes_send_progress_events_with_their_own_node_id(comfy_server):
    ws = comfy_server.listen()
    try:
        pid = comfy_server.queue(_prompts_graph("webprogress"))
        events = collect_events(ws, pid)
    finally:
        ws.close()
    assert events[-1]["type"] == "execution_success", events[-1]
    progress = [e["data"] for e in events if e["type"] == "selma.progress"]
    assert progress, [e["type"] for e in events]
    assert {p["node"] for p in progress} == {"12"} and {p["prompt_id"] for p in progress} == {pid}
    assert {p["stage"] for p in progress} == {"prompts"} and {p["label"] for p in progress} == {"countbench"}
    last = progress[-1]
    assert last["step"] == last["total"] == 6 and last["eta_s"] == 0.0 and last["elapsed_s"] >= 0.0
    assert all(p["loss"] is None for p in progress)
    steps = [p["step"] for p in progress]
    assert steps == sorted(steps)
    # ComfyUI's own progress bar still moves for the node (progress_state is what the frontend's bars read).
    assert any(e["type"] == "progress" and e["data"].get("node") == "12" for e in events)
