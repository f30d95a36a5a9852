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


def test_bundled_files_are_what_the_specs_generate(comfy_server):
    """scripts/build_workflows.py against this server writes exactly the bundled files (run it after edits)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_workflows", REPO / "scripts" / "build_workflows.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # type: ignore[union-attr]
    info = comfy_server.get_json("/object_info")
    for name, nodes in script.SPECS.items():
        ui, api = script.build(name, nodes, info)
        assert json.loads((REPO / "workflows" / f"{name}.json").read_text()) == ui, name
        assert json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()) == api, name


def test_workflows_chain_through_the_names_selma_writes():
    """Stage 4 writes selma/<name>/<skill>.safetensors, stage 5 selma/<name>.safetensors: the later
    workflows read exactly those names, so a user's own runs feed them."""
    wf = {p.stem: json.loads(p.read_text()) for p in API}
    train = next(n for n in wf["selma_stage4_train"].values() if n["class_type"] == "SelmaTrainExperts")["inputs"]
    skill = next(n for n in wf["selma_stage4_train"].values() if n["class_type"] == "SelmaSkill")["inputs"]
    merge = next(n for n in wf["selma_stage5_merge"].values() if n["class_type"] == "SelmaMergeExperts")["inputs"]
    assert f"selma/{train['name']}/{skill['skill_id']}.safetensors" in merge["lora_names"].splitlines()
    evaluate = next(n for n in wf["selma_stage6_evaluate"].values() if n["class_type"] == "SelmaEvaluate")["inputs"]
    assert {evaluate["lora_1"], evaluate["lora_2"]} == {f"selma/{train['name']}/{skill['skill_id']}.safetensors",
                                                        f"selma/{merge['name']}.safetensors"}
    full = wf["selma_full_pipeline"]
    kinds = [n["class_type"] for n in full.values()]
    assert kinds.count("SelmaRenderDataset") >= 2 and kinds.count("SelmaFilterDataset") >= 2
    by_id = dict(full.items())
    train_full = next(n for n in full.values() if n["class_type"] == "SelmaTrainExperts")["inputs"]
    merge_full = next(n for n in full.values() if n["class_type"] == "SelmaMergeExperts")["inputs"]
    eval_full = next(n for n in full.values() if n["class_type"] == "SelmaEvaluate")["inputs"]
    assert by_id[train_full["dataset"][0]]["class_type"] == by_id[train_full["dataset_2"][0]]["class_type"] \
        == "SelmaFilterDataset"
    assert by_id[merge_full["experts"][0]]["class_type"] == "SelmaTrainExperts"
    assert by_id[eval_full["loras"][0]]["class_type"] == "SelmaMergeExperts"


def test_saved_values_are_real_use_settings_not_the_test_ones():
    """The tests shrink sizes and steps (TINY_SETTINGS); the files keep settings worth running."""
    from harness.schema import TINY_SETTINGS

    for path in API:
        for node in json.loads(path.read_text()).values():
            for key, tiny in TINY_SETTINGS.get(node["class_type"], {}).items():
                if key in node["inputs"] and key != "overwrite":
                    assert node["inputs"][key] != tiny, (path.name, node["class_type"], key)


def test_selma_workflows_default_to_the_shipped_world_models_and_skills():
    """SELMA's own nodes load world-sd and world-clip (shipped in the pack) and ask for world skills; the
    native-node workflows keep an SD 1.x checkpoint (CheckpointLoaderSimple cannot load world-sd)."""
    from selma_backend.world.skills import WORLD_SKILLS

    for path in API:
        graph = json.loads(path.read_text()).values()
        native = any(n["class_type"] == "CheckpointLoaderSimple" for n in graph)  # real-SD skills (e.g. product)
        for node in graph:
            inputs, kind = node["inputs"], node["class_type"]
            if kind == "SelmaLoadModel":
                assert inputs["checkpoint"] == "diffusers/world-sd", path.name
            if kind == "SelmaLoadClip":
                assert inputs["clip_model"] == "world-clip", path.name
            if kind == "SelmaSkill" and not native:
                assert inputs["skill_id"] in WORLD_SKILLS.names(), path.name
            if kind in ("SelmaRenderDataset", "SelmaEvaluate"):
                assert (inputs["width"], inputs["height"]) == (64, 64), path.name  # the world model's size
            if kind == "SelmaTrainExperts":
                assert inputs["resolution"] == 64, path.name
            if kind == "CheckpointLoaderSimple":
                assert not inputs["ckpt_name"].startswith("world-"), path.name
