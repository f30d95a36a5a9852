"""Names from widgets and routes cannot escape their root folder."""

from __future__ import annotations

import pytest

from selma_backend.errors import SelmaError
from selma_backend.paths import safe_join, slug


def test_plain_and_nested_names_stay_inside(tmp_path):
    assert safe_join(tmp_path, "shop") == tmp_path.resolve() / "shop"
    assert safe_join(tmp_path, "shop/spatial") == tmp_path.resolve() / "shop" / "spatial"


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "..", ".", "", "  ", "a\\..\\b", "C:/x",
                                  "~/x", "x\x00y", "%2e%2e/x/../.."])
def test_escapes_are_refused_naming_the_field(tmp_path, name):
    with pytest.raises(SelmaError, match="dataset: got"):
        safe_join(tmp_path, name, field="dataset")


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(SelmaError, match="outside"):
        safe_join(root, "link/data")
    (root / "inner").mkdir()
    (root / "ok").symlink_to(root / "inner")
    assert safe_join(root, "ok/data") == root.resolve() / "ok" / "data"


def test_slug():
    assert slug("SD 1.5 / my model!") == "SD-1.5-my-model"
    assert slug("..") == "unnamed"
