"""``selma tiny-models``: every model loads with the real loader (diffusers, ComfyUI, open_clip,
transformers) and runs; same seed, same bytes; nothing is overwritten silently."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from harness.comfy import COMFY_PROLOGUE, comfyui_source_dir

from selma_backend import cli
from selma_backend.errors import SelmaError
from selma_backend.tiny.common import MARKER
from selma_backend.tiny_models import TINY_MODELS, write_llm, write_tiny_models

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# Runs inside ComfyUI's folder, in its own process: ComfyUI's top-level modules (``nodes``, ``server``,
# ``utils``...) must not enter pytest's interpreter. Prints one JSON line.
COMFY_CHECK = COMFY_PROLOGUE + r"""
logging.getLogger().setLevel(logging.DEBUG)
import torch
import comfy.sample, comfy.sd
model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(os.environ["CKPT"], output_vae=True, output_clip=True)
with torch.inference_mode():
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a cat, 35mm"), return_pooled=True)
    empty, empty_pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    latent = torch.zeros(1, 4, 8, 8)  # a 64 px image
    samples = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), 2, 7.0, "euler", "normal",
                                  [[cond, {"pooled_output": pooled}]], [[empty, {"pooled_output": empty_pooled}]],
                                  latent, disable_pbar=True, seed=0)
    image = vae.decode(samples)
config = model.model.model_config
print(json.dumps({
    "config": type(config).__name__,
    "unet": {k: config.unet_config.get(k) for k in ("model_channels", "channel_mult", "num_res_blocks", "context_dim", "num_heads")},
    "shapes": [list(t.shape) for t in (cond, pooled, samples, image)],
    "finite": [bool(torch.isfinite(t).all()) for t in (cond, pooled, samples, image)],
    "cond_differs": bool((cond - empty).abs().max() > 0),
    "log": [m[:400] for m in messages if any(w in m.lower() for w in ("missing", "unexpected", "leftover"))],
}))
"""


@dataclass
class Tiny:
    paths: dict[str, Path]
    comfy: subprocess.Popen | None  # ComfyUI's check, running beside the in-process tests

    def comfy_result(self) -> dict:
        assert self.comfy is not None
        out, err = self.comfy.communicate(timeout=240)
        assert self.comfy.returncode == 0, err[-4000:]
        return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    """All five models, written once, offline with an empty HF cache.

    The single file goes first so that ComfyUI's check (a separate process, ~20 s of imports and
    loading) runs while the other models are written and the in-process tests run.
    """
    root = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**OFFLINE, "HF_HOME": str(root / "empty-hf-home")}.items():
            mp.setenv(k, v)
        first = write_tiny_models(root / "models", seed=0, only=["mini-sd15"])
        env = {**os.environ, "CKPT": str(first["mini-sd15"]), "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen([sys.executable, "-c", COMFY_CHECK], cwd=comfyui_source_dir(), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        paths = write_tiny_models(root / "models", seed=0)  # skips the file written above
    yield Tiny(paths, proc)
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _safetensors_digests(path: Path) -> dict[str, str]:
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    return {str(f.relative_to(path) if path.is_dir() else f.name): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_writes_every_model_with_its_provenance(tiny, tmp_path_factory):
    assert list(tiny.paths) == ["sd1", "sdxl", "mini-sd15", "clip", "llm"] == TINY_MODELS.names()
    for name, path in tiny.paths.items():
        if path.is_dir():
            facts = json.loads((path / MARKER).read_text())
            assert facts["name"] == name and facts["seed"] == 0 and facts["made_by"] == "selma tiny-models"
            assert oct(path.stat().st_mode & 0o777) != "0o700"  # published with usual modes, not mkdtemp's
    assert not any(p.name.startswith(".") for p in tiny.paths["sd1"].parent.iterdir())  # no temp leftovers
    hf_home = tiny.paths["sd1"].parent.parent / "empty-hf-home"
    assert not hf_home.exists() or not any(hf_home.rglob("*"))  # nothing fetched or cached


def test_sd1_pipeline_loads_and_renders_64px(tiny):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny.paths["sd1"], local_files_only=True)
    assert pipe.safety_checker is None and pipe.config.requires_safety_checker is False
    assert pipe.vae_scale_factor == 8 and pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer) == 49408
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.beta_schedule == "scaled_linear"
    image = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 64, 64, 3) and (image >= 0).all() and (image <= 1).all()


def test_sdxl_pipeline_loads_and_renders_64px(tiny):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny.paths["sdxl"], local_files_only=True)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    # pooled text of encoder 2 + 6 time ids (original size, crop, target size), each embedded to 8 dims
    assert unet.projection_class_embeddings_input_dim == pipe.text_encoder_2.config.projection_dim + 6 * unet.addition_time_embed_dim
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token_id == 49407
    image = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_mini_sd15_has_ldm_layout_and_every_tensor_set(tiny):
    from safetensors import safe_open

    with safe_open(str(tiny.paths["mini-sd15"]), framework="pt") as f:
        keys = list(f.keys())
        assert json.loads(f.metadata()["selma.tiny_model"]) == {"made_by": "selma tiny-models", "name": "mini-sd15", "seed": 0}
        emb = f.get_tensor("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
        norm = f.get_tensor("first_stage_model.decoder.norm_out.weight")
        conv = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert {next(p for p in prefixes if k.startswith(p)) for k in keys} == set(prefixes)  # StopIteration if stray
    assert sum(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.") for k in keys) == 12 * 16
    assert emb.shape == (49408, 768) and emb.dtype == torch.float16 and conv.shape == (320, 4, 3, 3)
    assert 0.015 < emb.float().std() < 0.025 and bool((norm == 1).all())


def test_mini_sd15_loads_in_comfyui_as_sd15_and_runs(tiny):
    result = tiny.comfy_result()
    assert result["config"] == "SD15"
    assert result["unet"] == {"model_channels": 320, "channel_mult": [1], "num_res_blocks": [1], "context_dim": 768,
                              "num_heads": 8}
    assert result["shapes"] == [[1, 77, 768], [1, 768], [1, 4, 8, 8], [1, 64, 64, 3]]
    assert all(result["finite"]) and result["cond_differs"]
    # Every weight ComfyUI's SD15 modules hold was found. The only acceptable "missing" are the two
    # that no SD 1.x file has and ComfyUI fills itself (logit_scale) or never uses for SD15.
    log = result["log"]
    assert not [m for m in log if m.startswith(("unet missing", "unet unexpected", "Missing VAE keys", "clip unexpected"))], log
    for m in log:
        if m.startswith("clip missing"):
            assert m == "clip missing: ['clip_l.logit_scale', 'clip_l.transformer.text_projection.weight']"


def test_clip_loads_with_open_clip_and_scores(tiny):
    import open_clip
    from PIL import Image

    name = f"local-dir:{tiny.paths['clip']}"
    model, preprocess = open_clip.create_model_from_pretrained(name)  # raises if the weights do not load
    tokenizer = open_clip.get_tokenizer(name)
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)  # the bundled BPE: nothing fetched
    image = preprocess(Image.new("RGB", (80, 60), (200, 30, 30))).unsqueeze(0)
    with torch.no_grad():
        img = model.encode_image(image, normalize=True)
        txt = model.encode_text(tokenizer(["a red square", "a photo of a cat"]), normalize=True)
    scores = (img @ txt.T)[0]
    assert image.shape == (1, 3, 32, 32) and scores.shape == (2,)
    assert torch.isfinite(scores).all() and (scores.abs() <= 1 + 1e-5).all() and scores[0] != scores[1]


def test_llm_chats_and_generates_10_tokens(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.paths["llm"], local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny.paths["llm"], local_files_only=True)
    messages = [{"role": "system", "content": "You write prompts."}, {"role": "user", "content": "A cat, 猫 🐱?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nYou write prompts.<|im_end|>\n<|im_start|>user\nA cat, 猫 🐱?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: any string round-trips
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    runs = [model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False) for _ in range(2)]
    assert runs[0].shape == (1, inputs["input_ids"].shape[1] + 10) and torch.equal(runs[0], runs[1])
    assert int(runs[0].max()) < len(tok) == model.config.vocab_size


def test_same_seed_same_bytes_other_seed_other_bytes(tiny, tmp_path):
    small = [n for n in TINY_MODELS.names() if n != "mini-sd15"]  # the 465 MB file: see the next test
    again = write_tiny_models(tmp_path / "again", seed=0, only=small)
    for name in small:
        assert _safetensors_digests(again[name]) == _safetensors_digests(tiny.paths[name]), name
    other = write_llm(tmp_path / "other", seed=1)
    assert _safetensors_digests(other) != _safetensors_digests(tiny.paths["llm"])


def test_mini_sd15_bytes_are_a_function_of_the_seed(tmp_path, monkeypatch):
    """Same machinery as the full file (one seeded generator in key order, fixed header), on its first 40 tensors."""
    from selma_backend.tiny import ldm

    params = ldm.mini_sd15_params()
    monkeypatch.setattr(ldm, "mini_sd15_params", lambda: params[:40])
    files = [ldm.write_mini_sd15(tmp_path / f"{i}.safetensors", seed=s) for i, s in enumerate((5, 5, 6))]
    digests = [_safetensors_digests(f)[f.name] for f in files]
    assert digests[0] == digests[1] != digests[2]


def test_second_run_skips_what_is_there(tiny):
    before = {p: p.stat().st_mtime_ns for p in tiny.paths.values()}
    messages: list[str] = []
    assert write_tiny_models(tiny.paths["sd1"].parent, seed=0, log=messages.append) == tiny.paths
    assert len(messages) == 5 and all("skipped" in m and "--force" in m for m in messages)
    assert {p: p.stat().st_mtime_ns for p in tiny.paths.values()} == before
    with pytest.raises(SelmaError, match="made from seed 0, not 3; pass --force"):
        write_tiny_models(tiny.paths["sd1"].parent, seed=3, only=["llm"])


def test_force_rewrites_our_models_but_never_a_users(tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    write_tiny_models(tmp_path, seed=0, only=["llm"])
    assert torch.rand(1) == expected_next  # seeding happened on a forked RNG: the caller's stream is untouched
    write_tiny_models(tmp_path, seed=1, only=["llm"], force=True)
    assert json.loads((tmp_path / "llm" / MARKER).read_text())["seed"] == 1
    users = tmp_path / "mine"
    (users / "llm").mkdir(parents=True)
    (users / "llm" / "config.json").write_text("{}")
    for force in (False, True):
        with pytest.raises(SelmaError, match="not written by selma tiny-models; it is left alone"):
            write_tiny_models(users, only=["llm"], force=force)
    assert (users / "llm" / "config.json").read_text() == "{}"
    with pytest.raises(SelmaError, match=r"tiny model: got 'sd3'; allowed: 'sd1', 'sdxl', 'mini-sd15'"):
        write_tiny_models(tmp_path, only=["sd3"])


def test_cli_writes_offline_then_skips(tmp_path, capsys):
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    out = tmp_path / "tm"
    cmd = [sys.executable, "-m", "selma_backend", "tiny-models", "--out", str(out), "--only", "llm", "--seed", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "llm: wrote" in done.stdout and "1 tiny model(s)" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["llm"]
    assert cli.main(["tiny-models", "--out", str(out), "--only", "llm", "--seed", "2"]) == 0
    assert "llm: " in (second := capsys.readouterr().out) and "skipped" in second
    assert cli.main(["tiny-models", "--out", str(out), "--only", "llm"]) == 2  # seed 0 asked, seed 2 there
    assert "made from seed 2, not 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["tiny-models", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "skipped when it was made by this command with the same seed" in help_text and "--force" in help_text
