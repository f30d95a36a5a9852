"""CLIP tokenizer files rebuilt from open_clip's bundled BPE: the same ids as open_clip and as OpenAI's files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from harness.comfy import comfyui_source_dir

from selma_backend.clip_tokenizer import (
    BOS,
    EOS,
    VOCAB_SIZE,
    bytes_to_unicode,
    clip_vocab_and_merges,
    default_bpe_path,
    write_clip_tokenizer,
)
from selma_backend.errors import SelmaError

CAPTIONS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "two dogs, three cats & one bird!!!",
    "3 red cubes on top of 12 blue spheres",
    "the year 1999, 2024 and 3.14159",
    "an astronaut riding a horse on the moon; trending on artstation",
    "it's the dog's ball, isn't it? they'll see; we'd go; i'm here; you're there; we've been",
    "naïve café résumé über façade",
    "猫が二匹、テーブルの上に座っている",
    "一只猫和一只狗",
    "고양이 두 마리",
    "кошка на столе",
    "emoji 🐱🔥👍🏽 test",
    "quotes \"double\" and 'single' and `back`",
    "brackets (round) [square] {curly} <angle>",
    "math: 2+2=4, 10% off, $5.99, #hashtag, @user, a/b\\c",
    "hyphen-ated words and snake_case and camelCaseWords",
    "  lots   of\tspaces\nand\nnew lines  ",
    "ellipsis... and em—dash – en dash",
    "x" * 300,
    "a " * 100,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "1girl, solo, masterpiece, best quality, (detailed:1.2)",
    "ÀÉÎÕÜ ß ø å æ œ",
    "Ελληνικά γράμματα",
    "שלום עולם",
    "مرحبا بالعالم",
    "",
    "!",
    "a photo of a red apple to the left of a green pear, in the style of Monet",
    "The word 'SELMA' written in neon, 8k, ultra-detailed",
    "three hundred and sixty-five days",
    "tabs\tand\ttabs",
    "mixed 漢字 and latin 123abc456",
    "a long caption " + " ".join(f"word{i}" for i in range(60)),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip-tok"))


def test_vocabulary_layout():
    vocab, merges = clip_vocab_and_merges()
    symbols = list(bytes_to_unicode().values())
    assert len(vocab) == VOCAB_SIZE == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and [vocab[s] for s in symbols] == list(range(256))  # byte symbols first, CLIP order
    assert [vocab[s + "</w>"] for s in symbols] == list(range(256, 512))  # then their end-of-word forms
    assert vocab["".join(merges[0].split())] == 512  # then one token per merge, in rank order
    assert vocab[BOS] == 49406 and vocab[EOS] == 49407
    assert len(set(bytes_to_unicode().values())) == 256


def test_files_equal_openais_as_bundled_by_comfyui(tokenizer_dir):
    ref = comfyui_source_dir() / "comfy" / "sd1_tokenizer"  # openai/clip-vit-large-patch14's vocab.json and merges.txt
    assert json.loads((tokenizer_dir / "vocab.json").read_text()) == json.loads((ref / "vocab.json").read_text())
    assert (tokenizer_dir / "merges.txt").read_text().split("\n") == (ref / "merges.txt").read_text().split("\n")


def test_hf_tokenizer_gives_open_clips_ids(tokenizer_dir):
    import open_clip
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    oc = open_clip.tokenizer.SimpleTokenizer()  # the tokenizer in open_clip's wheel, context 77
    assert hf.model_max_length == 77 and hf.pad_token == EOS and len(hf) == VOCAB_SIZE
    expected = oc(CAPTIONS)  # (N, 77): sot, ids, eot, zero padding; truncated to 77 with eot last
    for caption, row in zip(CAPTIONS, expected, strict=True):
        ids = hf(caption, truncation=True, max_length=77)["input_ids"]
        assert ids == row[: len(ids)].tolist(), caption
        assert ids[0] == 49406 and ids[-1] == 49407 and (len(ids) == 77 or row[len(ids)] == 0)
    assert len(hf("x " * 200, truncation=True)["input_ids"]) == 77  # model_max_length truncates by default


def test_only_ftfy_cleaning_differs(tokenizer_dir):
    """OpenAI/open_clip clean text with ftfy + html.unescape first; transformers' fast CLIPTokenizer only
    NFC-normalises. Ligatures, full-width letters and HTML entities therefore differ, and agree once cleaned."""
    import html

    import ftfy
    import open_clip
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    oc = open_clip.tokenizer.SimpleTokenizer()
    for caption in ["ligature ﬁsh and full-width ＡＢＣ", "salt &amp; pepper"]:
        ids = hf(html.unescape(ftfy.fix_text(caption)))["input_ids"]
        assert ids == oc(caption)[0, : len(ids)].tolist(), caption


def test_second_tokenizer_pads_with_exclamation_mark(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, pad_token="!"), local_files_only=True)
    ids = tok("a cat", padding="max_length", max_length=77)["input_ids"]
    assert tok.pad_token_id == 0 and ids[:4] == [49406, 320, 2368, 49407] and ids[4:] == [0] * 73


def test_existing_files_are_not_overwritten_unless_asked(tokenizer_dir, tmp_path):
    write_clip_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(SelmaError, match="exists already"):
        write_clip_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").read_text() == "{}"
    write_clip_tokenizer(tmp_path, overwrite=True)
    assert (tmp_path / "vocab.json").read_bytes() == (tokenizer_dir / "vocab.json").read_bytes()


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(SelmaError, match=r"pad_token: got '<pad>'"):
        write_clip_tokenizer(tmp_path / "a", pad_token="<pad>")
    damaged = tmp_path / "bpe.txt.gz"
    damaged.write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h\n"))
    with pytest.raises(SelmaError, match="expected 48894 BPE merges"):
        write_clip_tokenizer(tmp_path / "b", bpe_path=damaged)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert default_bpe_path().name == "bpe_simple_vocab_16e6.txt.gz"
