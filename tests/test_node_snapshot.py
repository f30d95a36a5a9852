"""Saved workflows store widget values by position: node ids, input names, order, types and
defaults may only grow by appending. Record an append with SELMA_UPDATE_SNAPSHOT=1."""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
from harness.schema import describe, non_append_changes, widget_slots

SNAPSHOT = Path(__file__).parent / "snapshots" / "nodes.json"

BASE = {"SelmaX": {"inputs": [{"name": "a", "section": "required", "type": "INT", "default": 1},
                              {"name": "b", "section": "required", "type": "STRING", "default": "x"}],
                   "outputs": [{"name": "o", "type": "STRING", "is_list": False}], "output_node": False}}


def _changed(fn):
    new = copy.deepcopy(BASE)
    fn(new["SelmaX"])
    return non_append_changes(BASE, new)


def test_appends_are_allowed():
    assert _changed(lambda n: n["inputs"].append({"name": "c", "section": "optional", "type": "FLOAT", "default": 0.5})) == []
    assert _changed(lambda n: n["outputs"].append({"name": "p", "type": "IMAGE", "is_list": False})) == []
    assert non_append_changes(BASE, {**copy.deepcopy(BASE), "SelmaY": BASE["SelmaX"]}) == []


@pytest.mark.parametrize("edit", [
    lambda n: n["inputs"].reverse(),                                     # reorder
    lambda n: n["inputs"].insert(0, {"name": "z", "section": "required", "type": "INT", "default": 0}),  # insert
    lambda n: n["inputs"].pop(),                                         # remove
    lambda n: n["inputs"][0].update(default=2),                          # default
    lambda n: n["inputs"][1].update(type="COMBO"),                       # type
    lambda n: n["inputs"][0].update(name="aa"),                          # rename
    lambda n: n["outputs"][0].update(type="INT"),                        # output type
    lambda n: n.update(output_node=True),
])
def test_every_other_change_is_caught(edit):
    assert _changed(edit)


def test_removing_a_node_is_caught():
    assert non_append_changes(BASE, {}) == ["SelmaX: node removed (node ids are permanent)"]


def test_widget_slots_count_seed_control():
    desc = {"inputs": [{"name": "seed", "type": "INT", "control_after_generate": True},
                       {"name": "model", "type": "MODEL"}, {"name": "text", "type": "STRING"},
                       {"name": "n", "type": "INT", "force_input": True}]}
    assert widget_slots(desc) == 3


@pytest.mark.comfy
def test_live_nodes_only_grow_by_appending(comfy_server):
    info = comfy_server.get_json("/object_info")
    live = {k: describe(v) for k, v in info.items() if v["python_module"].startswith("custom_nodes.ComfyUI-SELMA")}
    assert live and all(k.startswith("Selma") for k in live)
    recorded = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.exists() else {}
    problems = non_append_changes(recorded, live)
    assert problems == [], "changes that break saved workflows:\n" + "\n".join(problems)
    if os.environ.get("SELMA_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.write_text(json.dumps(live, indent=1, sort_keys=True) + "\n")
        return
    unrecorded = sorted(set(live) - set(recorded)) + sorted(
        k for k in recorded if k in live and live[k] != recorded[k])
    if unrecorded:  # an append is fine, but record it so later edits are checked against it
        warnings.warn(f"appended but not recorded: {unrecorded}; run with SELMA_UPDATE_SNAPSHOT=1", stacklevel=1)
