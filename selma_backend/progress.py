"""Progress events of long stages: stage, step/total, elapsed time, ETA and (training) loss, throttled.

The web extension (``web/js/selma_progress.js``) draws them on the node that runs the stage. This module
only builds and throttles the payloads; ``nodes/glue.py`` supplies the node id and the send function.

    events = ProgressEvents(send, node="5", prompt_id="…", stage="render")
    events(1, 10)            # sent: the first update always is
    events(2, 10)            # dropped if it comes within ``min_interval`` of the last one sent
    events(10, 10)           # sent: the last update always is

Payload (the ``selma.progress`` websocket event)::

    {"node": "5", "prompt_id": "…", "stage": "train", "label": "counting", "step": 3, "total": 10,
     "elapsed_s": 1.5, "eta_s": 3.5 | None, "loss": 0.12 | None}
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

Send = Callable[[dict], None]

#: Stages a SELMA node reports (``stage`` of the event).
STAGES = ("prompts", "render", "filter", "train", "merge", "eval")
#: At most one event per this many seconds per node (the first and the last always go out).
MIN_INTERVAL_S = 0.25


class ProgressEvents:
    """A callable ``(step, total, *, label=None, loss=None)`` that sends throttled progress payloads.

    ETA comes from the observed rate since the first update of the current run of steps (one expert of a
    training, say): ``(now - t_first) / (step - step_first) * (total - step)``; None until two updates with
    different steps were seen, 0 at the end. A new label or a step going backwards starts a new run.
    """

    def __init__(self, send: Send, *, node: str | None, prompt_id: str | None, stage: str, label: str | None = None,
                 min_interval: float = MIN_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.send, self.node, self.prompt_id, self.stage, self.label = send, node, prompt_id, stage, label
        self.min_interval, self.clock = min_interval, clock
        self.start = clock()
        self.first: tuple[float, int] | None = None  # (time, step) of the current run's first update
        self.last_step: int | None = None
        self.last_sent: float | None = None
        self.sent = 0

    def __call__(self, step: int, total: int, *, label: str | None = None, loss: float | None = None) -> bool:
        """Record an update; return True if an event was sent."""
        now = self.clock()
        new_run = (label is not None and label != self.label) or (self.last_step is not None and step < self.last_step)
        if label is not None:
            self.label = label
        if self.first is None or new_run:
            self.first = (now, step)
        self.last_step = step
        last = step >= total
        due = self.last_sent is None or new_run or last or now - self.last_sent >= self.min_interval
        if not due:
            return False
        self.last_sent = now
        self.sent += 1
        self.send(self.payload(step, total, now, loss))
        return True

    def eta(self, step: int, total: int, now: float) -> float | None:
        """Seconds left at the observed rate; None until known."""
        if step >= total:
            return 0.0
        t0, s0 = self.first or (now, step)
        if step <= s0 or now <= t0:
            return None
        return (now - t0) / (step - s0) * (total - step)

    def payload(self, step: int, total: int, now: float, loss: float | None = None) -> dict:
        eta = self.eta(step, total, now)
        return {"node": self.node, "prompt_id": self.prompt_id, "stage": self.stage, "label": self.label,
                "step": int(step), "total": int(total), "elapsed_s": round(now - self.start, 3),
                "eta_s": None if eta is None else round(eta, 3),
                "loss": None if loss is None or not math.isfinite(loss) else float(loss)}
