"""Every bundled workflow uses only node types the server registers, with the right number of
widget values (UI format) or known input names (API format)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness.schema import describe, widget_slots

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[1]
UI = sorted((REPO / "workflows").glob("*.json"))
API = sorted((REPO / "workflows" / "api").glob("*.json"))


@pytest.fixture(scope="module")
def schemas(comfy_server):
    return {k: describe(v) for k, v in comfy_server.get_json("/object_info").items()}


def test_there_are_bundled_workflows_in_both_formats():
    assert UI and API
    assert {p.stem for p in UI} == {p.stem for p in API}, "each UI workflow has an API-format copy of the same name"


@pytest.mark.parametrize("path", UI, ids=[p.stem for p in UI])
def test_ui_workflow_nodes_exist_with_the_right_widget_count(schemas, path):
    wf = json.loads(path.read_text())
    assert wf["nodes"], path
    for node in wf["nodes"]:
        if node["type"] in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode"):
            continue
        assert node["type"] in schemas, f"{path.name}: node {node['id']} has unknown type {node['type']}"
        expected = widget_slots(schemas[node["type"]])
        got = len(node.get("widgets_values") or [])
        assert got == expected, f"{path.name}: node {node['id']} ({node['type']}) has {got} widget values, expects {expected}"


@pytest.mark.parametrize("path", API, ids=[p.stem for p in API])
def test_api_workflow_nodes_exist_with_known_inputs(schemas, path):
    graph = json.loads(path.read_text())
    for node_id, node in graph.items():
        schema = schemas.get(node["class_type"])
        assert schema, f"{path.name}: node {node_id} has unknown type {node['class_type']}"
        names = {i["name"] for i in schema["inputs"]}
        assert set(node["inputs"]) <= names, f"{path.name}: node {node_id} unknown inputs {set(node['inputs']) - names}"
        required = {i["name"] for i in schema["inputs"] if i["section"] == "required"}
        assert required <= set(node["inputs"]), f"{path.name}: node {node_id} misses {required - set(node['inputs'])}"


def test_widget_count_check_catches_a_wrong_count(schemas):
    """The check above would fail on a workflow saved with one widget value too many."""
    assert widget_slots(schemas["SelmaListSkills"]) == 1
    assert widget_slots(schemas["KSampler"]) == 7  # seed + control_after_generate, steps, cfg, sampler, scheduler, denoise
