"""A local chat model with ``transformers``: a folder from ComfyUI's ``models/LLM`` (or any path).

The folder holds ``config.json``, a tokenizer with a chat template, and weights. Loading is offline
(``local_files_only=True``), never runs code from the folder (``trust_remote_code=False``) and
prefers ``.safetensors``; pickle ``.bin`` weights load only with ``allow_pickle=True``, because
unpickling a file can run arbitrary code. ``close()`` (or leaving the ``with`` block) frees the
model, so the renderer gets the memory back.
"""

from __future__ import annotations

import gc
import inspect
from pathlib import Path
from typing import Any

from ..errors import invalid
from .backends import ChatConfig
from .base import ChatMessage, LLMError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def list_local_llms(root: Path) -> list[str]:
    """Model folders under ``root`` (depth ≤ 2, e.g. ``Qwen2.5-0.5B`` or ``Qwen/Qwen2.5-0.5B``), as
    sorted relative POSIX paths: folders with ``config.json`` and a tokenizer file. For dropdowns."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for config in [*root.glob("*/config.json"), *root.glob("*/*/config.json")]:
        folder = config.parent
        rel = folder.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if any((folder / name).is_file() for name in _TOKENIZER_FILES):
            found.append(rel.as_posix())
    return sorted(found)


class TransformersChatBackend:
    """``ChatBackend`` over ``AutoModelForCausalLM``; see the module docstring."""

    def __init__(self, config: ChatConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        folder = Path(config.model_path).expanduser()
        self.source = f"transformers:{folder.name}"
        use_safetensors = _check_folder(folder, config.allow_pickle)
        self.device = _pick_device(config.device, torch)
        dtype = _pick_dtype(config.dtype, self.device, torch)
        self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        if not getattr(self._tokenizer, "chat_template", None):
            raise LLMError(
                f"{folder}: the tokenizer has no chat template, so SELMA cannot format messages for it. "
                "Use an instruction/chat model (e.g. a '-Instruct' or '-chat' variant) whose "
                "tokenizer_config.json or chat_template.jinja defines one"
            )
        dtype_kw = "dtype" if _transformers_major() >= 5 else "torch_dtype"
        self._model: Any = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, use_safetensors=use_safetensors,
            **{dtype_kw: dtype},
        ).to(self.device)
        self._model.eval()
        self._template_kwargs = (
            {"sanitize_control_tokens": True}
            if "sanitize_control_tokens" in inspect.signature(self._tokenizer.apply_chat_template).parameters
            else {}
        )

    def __repr__(self) -> str:
        state = "closed" if self._model is None else str(self.device)
        return f"TransformersChatBackend({self.source!r}, {state})"

    # -- ChatBackend
    def chat(self, messages: list[ChatMessage], *, temperature: float, max_tokens: int, seed: int | None = None) -> str:
        """Sample a reply (greedy at ``temperature == 0``); the same ``seed`` gives the same text."""
        import torch

        if self._model is None:
            raise LLMError(f"{self.source}: the backend was closed; create a new one")
        if not temperature >= 0:
            raise invalid("temperature", temperature, "a number >= 0 (0 = greedy)")
        if max_tokens < 1:
            raise invalid("max_tokens", max_tokens, "an integer >= 1")
        if any(m.images for m in messages):
            raise LLMError(f"{self.source}: this backend reads text only; images need an OpenAI-compatible "
                           "vision-language server (backend 'openai')")
        inputs = self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True, return_tensors="pt", return_dict=True, **self._template_kwargs,
        ).to(self.device)
        n_in = inputs["input_ids"].shape[-1]
        max_new = self._room(n_in, max_tokens)
        gen: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": self._pad_id()}
        if temperature == 0:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            gen.update(do_sample=True, temperature=temperature, top_p=self.config.top_p, top_k=None)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:  # fork_rng: seeding here leaves the caller's global RNG untouched
                torch.manual_seed(seed)
            out = self._model.generate(**inputs, **gen)
        return self._tokenizer.decode(out[0, n_in:], skip_special_tokens=True).strip()

    def close(self) -> None:
        """Drop the model and tokenizer and return their memory. Safe to call twice."""
        if self._model is None:
            return
        self._model = None
        self._tokenizer = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> TransformersChatBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals
    def _room(self, n_in: int, max_tokens: int) -> int:
        """``max_tokens``, clipped to what is left of the model's context window."""
        ctx = getattr(self._model.config, "max_position_embeddings", None)
        if ctx is None:
            return max_tokens
        if n_in >= ctx:
            raise LLMError(f"{self.source}: the prompt is {n_in} tokens but the model's context is {ctx}; "
                           "use fewer seed examples or a model with a longer context")
        return min(max_tokens, ctx - n_in)

    def _pad_id(self) -> int | None:
        tok = self._tokenizer
        if tok.pad_token_id is not None:
            return tok.pad_token_id
        eos = self._model.generation_config.eos_token_id
        return eos[0] if isinstance(eos, list) else (eos if eos is not None else tok.eos_token_id)


def _check_folder(folder: Path, allow_pickle: bool) -> bool:
    """Check the folder before spending time loading; True when the weights are safetensors."""
    if not (folder / "config.json").is_file():
        raise invalid("model_path", str(folder), "a folder with config.json, a tokenizer and weights",
                      "put the model under ComfyUI/models/LLM/<name>/ (a Hugging Face model folder) and choose it")
    if any(folder.glob("*.safetensors")):
        return True
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        if not allow_pickle:
            raise invalid("allow_pickle", False, [True],
                          f"{folder} has only pickle weights (.bin), which can run code when loaded. Convert them "
                          "to .safetensors, or set allow_pickle=True if you trust where the model came from")
        return False
    raise invalid("model_path", str(folder), "a folder containing *.safetensors weights", "the folder has no weights")


def _pick_device(name: str, torch: Any) -> Any:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise invalid("device", name, ["auto", "cpu"], "this machine has no CUDA GPU that torch can use")
    if name == "mps" and not torch.backends.mps.is_available():
        raise invalid("device", name, ["auto", "cpu"], "MPS is not available on this machine")
    return torch.device(name)


def _pick_dtype(name: str, device: Any, torch: Any) -> Any:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    return getattr(torch, name)


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])
