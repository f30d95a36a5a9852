"""Node schemas as saved workflows see them: ordered inputs, widget slots, outputs."""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}  # the frontend adds a control_after_generate slot to these


def describe(entry: dict) -> dict:
    """Reduce one /object_info entry to what saved workflows depend on."""
    inputs = []
    for section in ("required", "optional"):
        spec = entry["input"].get(section, {})
        for name in entry.get("input_order", {}).get(section, list(spec)):
            type_, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            kind = "COMBO" if isinstance(type_, list) else type_
            item = {"name": name, "section": section, "type": kind, "default": opts.get("default")}
            if kind == "COMBO" and isinstance(type_, list):
                item["default"] = opts.get("default", type_[0] if type_ else None)
            if opts.get("forceInput"):
                item["force_input"] = True
            control = opts.get("control_after_generate")  # the frontend: explicit value ?? name is a seed name
            if kind == "INT" and (control if control is not None else name in SEED_NAMES):
                item["control_after_generate"] = True
            inputs.append(item)
    outputs = [{"name": n, "type": t, "is_list": bool(lst)}
               for n, t, lst in zip(entry["output_name"], entry["output"], entry["output_is_list"], strict=True)]
    return {"inputs": inputs, "outputs": outputs, "output_node": bool(entry.get("output_node"))}


def widget_slots(desc: dict) -> int:
    """How many ``widgets_values`` a UI-format node of this type carries."""
    n = 0
    for item in desc["inputs"]:
        if item["type"] in WIDGET_TYPES and not item.get("force_input"):
            n += 1 + int(bool(item.get("control_after_generate")))
    return n


def non_append_changes(old: dict[str, dict], new: dict[str, dict]) -> list[str]:
    """Every difference between two snapshots that is not an append.

    Allowed: new nodes, new inputs after the existing ones, new outputs after the existing ones.
    Anything else (a node removed, an input renamed, moved, retyped, given another default, an
    output changed) breaks workflows people saved, which store widget values by position.
    """
    problems = []
    for node_id, before in old.items():
        if node_id not in new:
            problems.append(f"{node_id}: node removed (node ids are permanent)")
            continue
        after = new[node_id]
        for key in ("inputs", "outputs"):
            a, b = before[key], after[key]
            if len(b) < len(a):
                problems.append(f"{node_id}: {key} removed ({len(a)} → {len(b)})")
            for i, (x, y) in enumerate(zip(a, b, strict=False)):
                if x != y:
                    problems.append(f"{node_id}: {key}[{i}] changed from {x} to {y}")
        if before["output_node"] != after["output_node"]:
            problems.append(f"{node_id}: output_node changed")
    return problems


def widget_index(desc: dict, name: str) -> int:
    """Position of widget ``name`` in a UI node's ``widgets_values`` (control slots counted)."""
    i = 0
    for item in desc["inputs"]:
        if item["type"] not in WIDGET_TYPES or item.get("force_input"):
            continue
        if item["name"] == name:
            return i
        i += 1 + int(bool(item.get("control_after_generate")))
    raise KeyError(name)


#: Cheap settings for running bundled workflows on CPU (same graph, smaller numbers). The SELMA-node workflows
#: already render and train at the world model's 64 px; the native ones run the mini SD 1.5 at 64 px here.
TINY_SETTINGS = {
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
    "SelmaGeneratePrompts": {"count": 2},
    "SelmaRenderDataset": {"steps": 2, "images_per_prompt": 1, "batch_size": 8},
    # overwrite: the test server starts with world fixture experts under the names training writes
    # (tests/conftest.py world_loras, for the stage-5 and stage-6 workflows); a trained expert replaces them.
    # Same base model (the world-sd the server lists), so any mix of fixture and trained experts merges.
    "SelmaTrainExperts": {"steps": 2, "rank": 4, "alpha": 4.0, "batch_size": 2, "validation_every": 0,
                          "checkpoint_every": 1, "overwrite": True},
    "SelmaEvaluate": {"steps": 2, "heldout_count": 2, "max_per_skill": 1, "batch_size": 8},
}

def shrink(workflow: dict, schemas: dict[str, dict]) -> dict:
    """A copy of a UI- or API-format workflow with :data:`TINY_SETTINGS` applied."""
    import copy

    wf = copy.deepcopy(workflow)
    if "nodes" in wf:  # UI format
        for node in wf["nodes"]:
            for name, value in TINY_SETTINGS.get(node["type"], {}).items():
                node["widgets_values"][widget_index(schemas[node["type"]], name)] = value
    else:
        for node in wf.values():
            node["inputs"].update(TINY_SETTINGS.get(node["class_type"], {}))
    return wf
