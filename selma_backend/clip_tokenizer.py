"""OpenAI CLIP's BPE tokenizer files (vocab.json + merges.txt), rebuilt offline.

transformers' ``CLIPTokenizer`` needs ``vocab.json`` and ``merges.txt``; every SD 1.x / SDXL diffusers
folder carries them. open_clip ships the same BPE merges inside its wheel
(``bpe_simple_vocab_16e6.txt.gz``), so the files can be made without a download: the vocabulary is
the 256 byte symbols, the same 256 with ``</w>`` (end of word), one entry per merge in rank order,
then ``<|startoftext|>`` and ``<|endoftext|>`` — 49408 entries, the ids OpenAI's CLIP was trained on.

The construction follows OpenAI CLIP's ``simple_tokenizer.py`` (also open_clip ``tokenizer.py``),
re-implemented here; the result equals the ``openai/clip-vit-large-patch14`` tokenizer files.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

from .errors import SelmaError
from .fsio import atomic_write_json, atomic_write_text

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894: the merges OpenAI's CLIP uses, of the file's 262k
MAX_LENGTH = 77  # CLIP's context length (tokens, including BOS and EOS)
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte 0..255 to a printable unicode character, in CLIP's order.

    Printable Latin-1 bytes map to themselves; the rest (control bytes, space, ...) to 256 + n.
    The *order* of the returned dict matters: it is the order of the first 256 vocabulary ids
    (``"!"`` is id 0). Same mapping as GPT-2's and CLIP's byte-level BPE.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def default_bpe_path() -> Path:
    """Path of the BPE merges file inside the installed open_clip package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SelmaError("open_clip is not installed; it ships the CLIP BPE merges. Install open_clip_torch.")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise SelmaError(f"{path}: missing from the open_clip install; reinstall open_clip_torch")
    return path


@lru_cache(maxsize=4)
def _load_merges(bpe_path: str) -> tuple[tuple[str, str], ...]:
    lines = gzip.decompress(Path(bpe_path).read_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP keeps the first N_MERGES merges after it.
    merges = tuple(tuple(line.split()) for line in lines[1 : 1 + N_MERGES])
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise SelmaError(f"{bpe_path}: expected {N_MERGES} BPE merges 'a b' after the header; the file is damaged")
    return merges  # type: ignore[return-value]


def clip_vocab_and_merges(bpe_path: str | os.PathLike[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Return CLIP's vocabulary (token -> id, 49408 entries) and merges (``"a b"`` lines, rank order)."""
    merges = _load_merges(str(bpe_path or default_bpe_path()))
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise SelmaError(f"CLIP vocabulary: built {len(vocab)} distinct entries, expected {VOCAB_SIZE}")
    return vocab, [" ".join(m) for m in merges]


def _special(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_clip_tokenizer(
    directory: str | os.PathLike[str],
    *,
    pad_token: str = EOS,
    bpe_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a transformers ``CLIPTokenizer`` folder: vocab.json, merges.txt and the two config files.

    ``pad_token`` is ``<|endoftext|>`` for SD 1.x and SDXL's first tokenizer, ``"!"`` (id 0, as
    open_clip pads) for SDXL's second one. ``model_max_length`` is 77, as in SD's own folders, so
    pipelines pad and truncate prompts to CLIP's context. Existing files are an error unless
    ``overwrite``. Returns ``directory``.
    """
    directory = Path(directory)
    vocab, merges = clip_vocab_and_merges(bpe_path)
    if pad_token not in vocab:
        raise SelmaError(f"pad_token: got {pad_token!r}; allowed: a token of the CLIP vocabulary, e.g. {EOS!r} or '!'")
    specials = {"bos_token": _special(BOS), "eos_token": _special(EOS), "unk_token": _special(EOS), "pad_token": pad_token}
    config = {
        **specials,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": True,
    }
    atomic_write_json(directory / "vocab.json", vocab, overwrite=overwrite)
    atomic_write_text(directory / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n", overwrite=overwrite)
    atomic_write_json(directory / "special_tokens_map.json", specials, overwrite=overwrite)
    atomic_write_json(directory / "tokenizer_config.json", config, overwrite=overwrite)
    return directory

