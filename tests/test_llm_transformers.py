"""The transformers backend on the tiny random-weight chat model (``selma_backend.tiny_models``)."""

from __future__ import annotations

import gc
import json
import shutil
import weakref

import pytest
import torch

from selma_backend.errors import SelmaError
from selma_backend.llm.backends import ChatConfig, make_chat_backend
from selma_backend.llm.base import ChatMessage, LLMError
from selma_backend.llm.transformers_backend import TransformersChatBackend, list_local_llms
from selma_backend.tiny_models import write_llm

MSGS = [ChatMessage("system", "You write text-to-image prompts."), ChatMessage("user", "Write 3 new prompts.")]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return write_llm(tmp_path_factory.mktemp("LLM") / "tiny-chat", seed=0)


@pytest.fixture(scope="module")
def llm(llm_dir):
    backend = make_chat_backend(ChatConfig(backend="transformers", model_path=str(llm_dir), device="cpu"))
    yield backend
    backend.close()


def test_source_names_the_folder(llm, llm_dir):
    assert llm.source == f"transformers:{llm_dir.name}"


def test_same_seed_same_text_other_seed_other_text_and_global_rng_untouched(llm):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = llm.chat(MSGS, temperature=1.0, max_tokens=24, seed=7)
    assert torch.rand(1) == expected_next  # seeding happened on a forked RNG
    b = llm.chat(MSGS, temperature=1.0, max_tokens=24, seed=7)
    others = {llm.chat(MSGS, temperature=1.0, max_tokens=24, seed=s) for s in (8, 9, 10)}
    assert a == b and a
    assert others != {a}  # random weights + sampling: different seeds give different text


def test_greedy_at_temperature_zero_ignores_the_seed(llm):
    assert llm.chat(MSGS, temperature=0, max_tokens=16, seed=1) == llm.chat(MSGS, temperature=0, max_tokens=16, seed=2)


def test_returns_only_the_new_tokens(llm, monkeypatch):
    tok = llm._tokenizer
    prompt_ids = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in MSGS],
                                         add_generation_prompt=True, return_dict=True)["input_ids"]
    captured = {}
    real_generate = llm._model.generate

    def spy(**kwargs):
        out = real_generate(**kwargs)
        captured["out"] = out
        return out

    monkeypatch.setattr(llm._model, "generate", spy)
    text = llm.chat(MSGS, temperature=1.0, max_tokens=12, seed=3)
    out = captured["out"][0]
    assert out[: len(prompt_ids)].tolist() == list(prompt_ids)  # generate echoes the prompt...
    new = tok.decode(out[len(prompt_ids):], skip_special_tokens=True).strip()
    assert text == new  # ...and chat() returns only what came after it
    assert "You write text-to-image prompts." not in text and "<|im_start|>" not in text
    assert 0 < len(out) - len(prompt_ids) <= 12


def test_close_releases_the_model_and_is_idempotent(llm_dir):
    backend = TransformersChatBackend(ChatConfig(backend="transformers", model_path=str(llm_dir), device="cpu"))
    backend.chat(MSGS, temperature=1.0, max_tokens=4, seed=0)
    model_ref = weakref.ref(backend._model)
    with backend:
        pass  # leaving the with-block closes it
    gc.collect()
    assert model_ref() is None
    backend.close()
    with pytest.raises(LLMError, match="closed"):
        backend.chat(MSGS, temperature=1.0, max_tokens=4)


def test_pickle_weights_are_refused_without_opt_in(llm_dir, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(llm_dir, folder)
    weights = {}
    for st in folder.glob("*.safetensors"):
        weights.update(load_file(st))
        st.unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    cfg = ChatConfig(backend="transformers", model_path=str(folder), device="cpu")
    with pytest.raises(SelmaError, match=r"allow_pickle: got False.*pickle weights \(\.bin\)"):
        TransformersChatBackend(cfg)
    with TransformersChatBackend(ChatConfig(**{**cfg.to_dict(), "allow_pickle": True})) as opted_in:
        assert isinstance(opted_in.chat(MSGS, temperature=0, max_tokens=4), str)


def test_a_tokenizer_without_chat_template_is_a_clear_error(llm_dir, tmp_path):
    folder = tmp_path / "base-model"
    shutil.copytree(llm_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg_file = folder / "tokenizer_config.json"
    data = json.loads(cfg_file.read_text())
    data.pop("chat_template", None)
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(LLMError, match="no chat template"):
        TransformersChatBackend(ChatConfig(backend="transformers", model_path=str(folder), device="cpu"))


def test_a_folder_without_a_model_is_refused_before_loading(tmp_path):
    with pytest.raises(SelmaError, match=r"model_path: got .*config\.json"):
        TransformersChatBackend(ChatConfig(backend="transformers", model_path=str(tmp_path), device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_refused(llm_dir):
    with pytest.raises(SelmaError, match="device: got 'cuda'"):
        TransformersChatBackend(ChatConfig(backend="transformers", model_path=str(llm_dir), device="cuda"))


def test_list_local_llms(llm_dir, tmp_path):
    root = tmp_path / "LLM"
    shutil.copytree(llm_dir, root / "tiny-chat")
    shutil.copytree(llm_dir, root / "Org" / "nested-chat")
    (root / "not-a-model").mkdir()
    (root / "no-tokenizer").mkdir()
    (root / "no-tokenizer" / "config.json").write_text("{}")
    shutil.copytree(llm_dir, root / ".cache" / "hidden")
    assert list_local_llms(root) == ["Org/nested-chat", "tiny-chat"]
    assert list_local_llms(tmp_path / "missing") == []
