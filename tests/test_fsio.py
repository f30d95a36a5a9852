"""Atomic writes, durable appends and torn-tail repair: nothing a user made is lost."""

from __future__ import annotations

import json
import os
import stat

import pytest

from selma_backend.errors import SelmaError
from selma_backend.fsio import append_jsonl, atomic_write_json, atomic_write_text, folder_fingerprint, read_jsonl


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.txt"]


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644


def test_no_silent_overwrite(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(SelmaError, match="exists already"):
        atomic_write_json(p, {"a": 2}, overwrite=False)
    assert json.loads(p.read_text()) == {"a": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": 1}


def test_torn_tail_is_dropped_on_read_and_repaired_on_append(tmp_path):
    p = tmp_path / "x.jsonl"
    append_jsonl(p, [{"i": 1}, {"i": 2}])
    with open(p, "ab") as f:
        f.write(b'{"i": 3, "tor')  # a crash in the middle of a write
    assert read_jsonl(p) == [{"i": 1}, {"i": 2}]
    append_jsonl(p, [{"i": 3}])
    assert read_jsonl(p) == [{"i": 1}, {"i": 2}, {"i": 3}]


def test_malformed_middle_line_is_an_error_naming_the_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"i": 1}\nnot json\n{"i": 2}\n')
    with pytest.raises(SelmaError, match="line 2"):
        read_jsonl(p)


def test_folder_fingerprint_changes_with_files(tmp_path):
    a = folder_fingerprint(tmp_path, (".toml",))
    (tmp_path / "s.toml").write_text("x")
    b = folder_fingerprint(tmp_path, (".toml",))
    (tmp_path / "other.txt").write_text("y")
    assert a != b == folder_fingerprint(tmp_path, (".toml",))
    assert folder_fingerprint(tmp_path / "missing") == "none"
