"""S2 detection without loading weights, the model-file listing, pickle refusal, config validation."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from selma_backend.errors import SelmaError
from selma_backend.models import checkpoint
from selma_backend.models.config import SCHEDULERS, ModelConfig, resolve_device
from selma_backend.models.detect import PICKLE_MARK, detect_architecture, list_model_files, listed_path
from selma_backend.tiny_models import write_tiny_models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Shared with test_models_loader through the folder: models already there (same seed) are skipped."""
    return write_tiny_models(tmp_path_factory.getbasetemp() / "s2-tiny-models", seed=0,
                             only=["sd1", "sdxl", "mini-sd15"])


def test_mini_sd15_is_detected_from_its_header_alone(tiny, monkeypatch):
    import safetensors

    def no_tensor_reads(*_a, **_kw):
        raise AssertionError("detection must not read tensors of an SD 1.x file")

    monkeypatch.setattr(safetensors, "safe_open", no_tensor_reads)
    det = detect_architecture(tiny["mini-sd15"])
    assert (det.arch, det.format, det.prediction_type, det.pickle) == ("sd1", "single_file", "epsilon", False)
    unet = det.unet_config
    assert unet["block_out_channels"] == [320] and unet["layers_per_block"] == 1  # the mini UNet's one level
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] and unet["transformer_layers_per_block"] == [1]
    assert (unet["cross_attention_dim"], unet["attention_head_dim"], unet["use_linear_projection"]) == (768, 8, False)
    assert "addition_embed_type" not in unet and unet["sample_size"] == 64
    assert det.vae_config["block_out_channels"] == [128, 256, 512, 512] and det.vae_config["layers_per_block"] == 2
    text = det.text_encoders["text_encoder"]
    assert (text["class"], text["layout"], text["pad_token"]) == ("CLIPTextModel", "hf", "<|endoftext|>")
    assert (text["config"]["hidden_size"], text["config"]["num_attention_heads"], text["config"]["hidden_act"]) == (768, 12, "quick_gelu")
    assert any("8 heads" in n for n in det.notes)
    assert det.to_dict()["unet_config"] == unet  # JSON-friendly for records and the node


def test_diffusers_folders_are_detected_from_their_json(tiny):
    sd1, sdxl = detect_architecture(tiny["sd1"]), detect_architecture(tiny["sdxl"])
    assert (sd1.arch, sd1.format, sd1.prediction_type) == ("sd1", "diffusers", "epsilon")
    assert (sdxl.arch, sdxl.unet_config["addition_embed_type"]) == ("sdxl", "text_time")


def test_unknown_architecture_lists_what_is_supported(tmp_path):
    path = tmp_path / "random.safetensors"
    save_file({"encoder.weight": torch.randn(4, 4), "head.bias": torch.randn(4)}, str(path))
    with pytest.raises(SelmaError) as e:
        detect_architecture(path)
    msg = str(e.value)
    assert str(path) in msg and "unknown architecture" in msg
    assert all(arch in msg for arch in ("sd1", "sd2", "sdxl"))
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(SelmaError, match="looks like a LoRA"):
        detect_architecture(lora)


def test_damaged_or_foreign_files_get_a_teaching_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(SelmaError, match=r"bad\.safetensors: not a readable \.safetensors file"):
        detect_architecture(bad)
    with pytest.raises(SelmaError, match=r"unknown checkpoint type '\.gguf'"):
        (tmp_path / "m.gguf").write_bytes(b"x")
        detect_architecture(tmp_path / "m.gguf")
    with pytest.raises(SelmaError, match="path: got .*nope"):
        detect_architecture(tmp_path / "nope.safetensors")
    with pytest.raises(SelmaError, match="without model_index.json"):
        detect_architecture(tmp_path)


def test_pickle_is_refused_naming_the_file_and_the_opt_in(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}}, path)
    with pytest.raises(SelmaError) as e:
        detect_architecture(path)
    assert str(path) in str(e.value) and "allow_pickle=True" in str(e.value) and "weights_only=True" in str(e.value)


def test_pickle_opt_in_reads_with_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "small.ckpt"
    torch.save({"state_dict": {"a.weight": torch.ones(2, 3), "b": torch.zeros(5)}, "global_step": 7}, path)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    tf = checkpoint.open_checkpoint(path, allow_pickle=True)
    assert calls and calls[0]["weights_only"] is True
    assert tf.shapes == {"a.weight": (2, 3), "b": (5,)} and torch.equal(tf.get("a.weight"), torch.ones(2, 3))


class Payload:  # anything beyond tensors and containers: weights_only unpickling must refuse it
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_with_python_objects_is_refused_even_with_the_opt_in(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f, protocol=2)
    with pytest.raises(SelmaError, match=r"evil\.pt: torch\.load\(weights_only=True\) refused it"):
        checkpoint.open_checkpoint(path, allow_pickle=True)


def test_list_model_files_for_the_dropdown(tmp_path):
    ckpts, diff = tmp_path / "checkpoints", tmp_path / "diffusers"
    for rel in ("b.safetensors", "sub/a.sft", "old.ckpt", ".hidden.safetensors", "notes.txt", ".cache/x.safetensors"):
        (ckpts / rel).parent.mkdir(parents=True, exist_ok=True)
        (ckpts / rel).write_bytes(b"")
    for rel in ("sd-a", "group/sd-b", "sd-a/unet"):  # a pipeline's own subfolders are not listed again
        (diff / rel).mkdir(parents=True, exist_ok=True)
        (diff / rel / "model_index.json").write_text("{}")
    (diff / "empty").mkdir()
    (ckpts / "loop").symlink_to(ckpts)  # a cycle is walked once
    got = list_model_files([str(ckpts)], [str(diff)])
    assert got == [str(ckpts / "b.safetensors"), str(ckpts / "old.ckpt") + PICKLE_MARK, str(ckpts / "sub/a.sft"),
                   str(diff / "group/sd-b"), str(diff / "sd-a")]
    assert listed_path(got[1]) == str(ckpts / "old.ckpt")
    assert list_model_files([str(tmp_path / "missing")], []) == []


@pytest.mark.parametrize(("field", "value"), [
    ("dtype", "fp8"), ("device", "tpu"), ("prediction_type", "x0"), ("scheduler", "karras"),
    ("compile", "yes"), ("allow_pickle", 1), ("vae_tiling", None),
])
def test_bad_config_values_name_the_field_and_the_allowed_set(field, value):
    with pytest.raises(SelmaError) as e:
        ModelConfig(path="m.safetensors", **{field: value})
    assert str(e.value).startswith(f"{field}: got {value!r}; allowed: ")


def test_config_path_and_defaults():
    with pytest.raises(SelmaError, match="^path: got ''"):
        ModelConfig(path="")
    cfg = ModelConfig(path=Path("m.safetensors"))  # a PathLike is kept as its string
    assert cfg.path == "m.safetensors" and cfg.to_dict()["dtype"] == "auto"
    assert "scheduler: got 'karras'; allowed: '', 'dpmpp_2m'" in str(pytest.raises(SelmaError, ModelConfig, "m", scheduler="karras").value)
    assert {"ddim", "euler", "dpmpp_2m"} <= set(SCHEDULERS.names())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_an_unavailable_device_is_refused_before_anything_loads():
    with pytest.raises(SelmaError, match=r"^device: got 'cuda'; allowed: 'auto'.*'cpu'"):
        resolve_device("cuda")
    assert resolve_device("auto") in ("cpu", "mps")
