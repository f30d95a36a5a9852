"""English and Japanese text for every node: display name, description, each input and output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


def _defs(lang: str) -> dict:
    return json.loads((REPO / "locales" / lang / "nodeDefs.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def live(comfy_server):
    info = comfy_server.get_json("/object_info")
    return {k: v for k, v in info.items() if v["python_module"].startswith("custom_nodes.ComfyUI-SELMA")}


@pytest.mark.comfy
def test_english_locale_is_the_code_text(live):
    """locales/en mirrors the node schemas, so the two cannot drift apart."""
    en = _defs("en")
    assert set(en) == set(live)
    for node_id, info in live.items():
        d = en[node_id]
        assert d["display_name"] == info["display_name"]
        assert d["description"] == info["description"]
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert d["inputs"][name]["tooltip"] == spec[1].get("tooltip"), (node_id, name)
        for i, tip in enumerate(info["output_tooltips"]):
            assert d["outputs"][str(i)]["tooltip"] == tip, (node_id, i)


@pytest.mark.comfy
def test_every_node_input_and_output_has_japanese(live):
    ja = _defs("ja")
    assert set(ja) == set(live)
    for node_id, info in live.items():
        d = ja[node_id]
        assert JAPANESE.search(d["display_name"]) and JAPANESE.search(d["description"]), node_id
        names = [n for s in ("required", "optional") for n in info["input"].get(s, {})]
        for name in names:
            entry = d["inputs"][name]
            assert JAPANESE.search(entry["name"]) and JAPANESE.search(entry["tooltip"]), (node_id, name)
        for i in range(len(info["output"])):
            entry = d["outputs"][str(i)]
            assert JAPANESE.search(entry["name"]) and JAPANESE.search(entry["tooltip"]), (node_id, i)


@pytest.mark.comfy
def test_server_serves_our_translations(comfy_server):
    i18n = comfy_server.get_json("/i18n")
    assert i18n["ja"]["nodeDefs"]["SelmaListSkills"]["display_name"] == "SELMA スキル一覧"
