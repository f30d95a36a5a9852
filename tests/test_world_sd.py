"""The world's Stable Diffusion: parts, conversion, training, resuming, and the shipped folders."""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selma_backend.errors import SelmaError
from selma_backend.world import cli as world_cli
from selma_backend.world.clip_eval import WORLD_CLIP
from selma_backend.world.sd_model import (
    CONTEXT,
    RECORD_FILE,
    WORLD_SD,
    WORLD_SD_SMALL,
    load_text_encoder,
    write_tokenizer,
)
from selma_backend.world.sd_train import (
    BASE_MIX,
    SdTrainConfig,
    sample_batch,
    train_unet,
    train_world_sd,
    training_noise,
)

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = SdTrainConfig(preset="tiny", steps=3, vae_steps=2, batch_size=2, log_every=1, checkpoint_every=2, threads=1)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_world_sd(TINY, tmp_path_factory.mktemp("wsd") / "tiny", say=lambda m: None)


def test_text_encoder_is_the_world_clip_text_tower() -> None:
    """The converted CLIPTextModel computes exactly what open_clip's text transformer computes."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    cfg = json.loads((WORLD_CLIP / "open_clip_config.json").read_text())["model_cfg"]
    ref = open_clip.CLIP(**cfg)
    ref.load_state_dict({k: v.float() for k, v in load_file(str(WORLD_CLIP / "open_clip_model.safetensors")).items()})
    ref.eval()
    ids = SimpleTokenizer(context_length=CONTEXT)(["two red circles left of a blue square", "a green star"])
    with torch.no_grad():
        x = ref.transformer(ref.token_embedding(ids) + ref.positional_embedding, attn_mask=ref.attn_mask)
        expected = ref.ln_final(x)
        got = load_text_encoder(WORLD_CLIP)(ids).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_tokenizer_matches_open_clip_ids(tmp_path: Path) -> None:
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path / "tok")), local_files_only=True)
    text = "three blue triangles above a yellow circle on a grey background"
    ids = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids[0]
    assert tok.model_max_length == CONTEXT
    assert ids == SimpleTokenizer(context_length=CONTEXT)([text])[0].tolist()


def test_folder_loads_renders_and_records(tiny_sd: Path) -> None:
    from selma_backend.models.config import ModelConfig
    from selma_backend.models.loader import load_pipeline

    record = json.loads((tiny_sd / RECORD_FILE).read_text())
    assert record["made_by"] == "selma world train-sd" and record["unet"]["steps"] == TINY.steps
    assert record["vae"]["scaling_factor"] > 0
    assert not tiny_sd.with_name("tiny.work").exists()  # the checkpoint folder goes once the folder is published
    with load_pipeline(ModelConfig(path=str(tiny_sd))) as lp:
        assert lp.pipe.vae_scale_factor == 4 and lp.pipe.unet.dtype == torch.float32
        image = lp.pipe("a red circle", num_inference_steps=2, output_type="pil",
                        generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_same_seed_same_weights(tiny_sd: Path, tmp_path: Path) -> None:
    again = train_world_sd(TINY, tmp_path / "again", say=lambda m: None)
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(tiny_sd / part)), load_file(str(again / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reused_vae_keeps_its_weights_and_record(tiny_sd: Path, tmp_path: Path) -> None:
    reused = train_world_sd(TINY, tmp_path / "reused", vae_from=tiny_sd, say=lambda m: None)
    part = "vae/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tiny_sd / part)), load_file(str(reused / part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    source = json.loads((tiny_sd / RECORD_FILE).read_text())["vae"]
    record = json.loads((reused / RECORD_FILE).read_text())["vae"]
    assert record["from"] == str(tiny_sd) and record["curve"] == source["curve"]  # how the VAE was made survives
    assert "_name_or_path" not in json.loads((reused / "vae" / "config.json").read_text())  # no local path shipped


def test_interrupted_unet_training_resumes_exactly(tmp_path: Path) -> None:
    """Stopped after the step-2 checkpoint, a rerun continues to the same weights as an unbroken run."""
    from selma_backend.world.sd_model import build_vae
    from selma_backend.world.sd_train import _Encoder

    cfg = SdTrainConfig(preset="tiny", steps=4, batch_size=2, log_every=1, checkpoint_every=2, threads=1)
    torch.manual_seed(0)
    vae = build_vae("tiny").eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=0.5)

    class Encoder(_Encoder):
        def __call__(self, captions: list[str]) -> torch.Tensor:  # a fixed text code: the loop is what is tested
            return torch.ones(len(captions), CONTEXT, 64) * torch.tensor([len(c) for c in captions]).view(-1, 1, 1) / 50

    def stop_at_3(message: str) -> None:
        if message.startswith("unet step 3/"):
            raise KeyboardInterrupt

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(KeyboardInterrupt):
        train_unet(cfg, vae, Encoder(None, None), tmp_path / "a", say=stop_at_3)
    resumed, rec = train_unet(cfg, vae, Encoder(None, None), tmp_path / "a", say=lambda m: None)
    whole, _ = train_unet(cfg, vae, Encoder(None, None), tmp_path / "b", say=lambda m: None)
    assert rec["steps"] == 4
    for (name, p), q in zip(resumed.state_dict().items(), whole.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_training_data_is_train_split_with_captions() -> None:
    from selma_backend.world.captions import parse_caption
    from selma_backend.world.skills import split_of

    pixels, captions = sample_batch(random.Random(1), 6)
    assert pixels.shape == (6, 3, 64, 64) and -1 <= float(pixels.min()) and float(pixels.max()) <= 1
    assert all(split_of(parse_caption(c)) == "train" for c in captions)


def test_existing_folder_is_never_replaced_silently(tiny_sd: Path, tmp_path: Path) -> None:
    with pytest.raises(SelmaError, match="exists already"):
        train_world_sd(TINY, tiny_sd, say=lambda m: None)
    mine = tmp_path / "user-model"
    mine.mkdir()
    (mine / "model_index.json").write_text("{}")
    with pytest.raises(SelmaError, match="left alone"):
        train_world_sd(TINY, mine, force=True, say=lambda m: None)
    assert (mine / "model_index.json").read_text() == "{}"


def test_training_noise_carries_an_offset_per_sample_and_channel() -> None:
    """Without the offset a 16 x 16 latent's channel mean varies by 1/16; with offset o by sqrt(1/256 + o^2)."""
    latents = torch.zeros(4000, 4, 16, 16)
    torch.manual_seed(0)
    plain = training_noise(latents, 0.0).mean(dim=(2, 3)).std().item()
    torch.manual_seed(0)
    noise = training_noise(latents, 0.1)
    shifted = noise.mean(dim=(2, 3)).std().item()
    assert plain == pytest.approx(1 / 16, rel=0.03)
    assert shifted == pytest.approx((1 / 256 + 0.01) ** 0.5, rel=0.03)
    # one constant per (sample, channel): what is left around each image's channel mean is plain noise
    assert (noise - noise.mean(dim=(2, 3), keepdim=True)).std().item() == pytest.approx(1.0, rel=0.01)
    assert SdTrainConfig().noise_offset == 0.1


@pytest.mark.parametrize(("field", "value"), [("preset", "huge"), ("steps", 0), ("lr", 0.0), ("ema", 1.5),
                                              ("noise_offset", -0.1)])
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(SelmaError, match=field):
        SdTrainConfig(**{field: value})


@pytest.mark.parametrize("folder", [WORLD_SD, WORLD_SD_SMALL])
def test_shipped_models_are_small_world_sd_folders(folder: Path) -> None:
    record = json.loads((folder / RECORD_FILE).read_text())
    assert record["made_by"] == "selma world train-sd"
    assert record["mix"] == BASE_MIX  # trained on today's diet, so its training command reproduces it
    # and the README's training command for it, parsed by the real CLI, says exactly its recorded config
    row = next(line for line in README.read_text().splitlines() if line.startswith(f"| `{folder.name}` |"))
    command = re.search(r"`selma world (train-sd [^`]*)`", row).group(1).split()
    parser = argparse.ArgumentParser()
    world_cli.add_arguments(parser)
    assert asdict(world_cli.sd_config(parser.parse_args(command))) == record["config"]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 40 * 2**20, f"{folder.name}: {size / 2**20:.1f} MB"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_shipped_world_sd_takes_the_background_from_the_prompt_not_the_seed() -> None:
    """The prompt decides the background, even when the starting noise's mean leans the other way.

    Trained without a noise offset, world-sd read the background from the channel means of the seed: on
    "... on a grey background" it drew backgrounds from near black to near white, seed by seed.
    """
    from selma_backend.models.config import ModelConfig
    from selma_backend.models.loader import load_pipeline
    from selma_backend.world.judge import detect
    from selma_backend.world.spec import BACKGROUNDS

    names = list(BACKGROUNDS)
    seeds = 4
    prompts = [f"a red circle on a {bg} background" for bg in names for _ in range(seeds)]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(prompts), 4, 16, 16, generator=g)
    lean = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1, 1) * 0.06  # towards white: about 1 std of the mean
    noise = noise + lean * torch.tensor([1.0 if i % 2 else -1.0 for i in range(len(prompts))]).view(-1, 1, 1, 1)
    with load_pipeline(ModelConfig(path=str(WORLD_SD), scheduler="dpmpp_2m")) as lp:
        lp.pipe.set_progress_bar_config(disable=True)
        images = lp.pipe(prompts, latents=noise, num_inference_steps=20, guidance_scale=7.5, output_type="pil").images
    found = [detect(im).background for im in images]
    wanted = [bg for bg in names for _ in range(seeds)]
    right = sum(f == w for f, w in zip(found, wanted, strict=True))
    assert right >= len(prompts) - 1, list(zip(wanted, found, strict=True))


def test_shipped_world_sd_is_good_at_single_objects() -> None:
    """The README's measure: 30 held-out single-object prompts, 20 DPM++ 2M steps at guidance 7.5, judged.

    The shipped model passes 0.76 of the questions and gets 63 % of the objects entirely right; the
    1,500-step model before it passed 0.56 and got 33 % entirely right.
    """
    from selma_backend.models.config import ModelConfig
    from selma_backend.models.loader import load_pipeline
    from selma_backend.world.judge import judge
    from selma_backend.world.skills import world_prompts

    rows = world_prompts("world_common", 3000, seed=11, split="heldout")
    single = [r for r in rows if len(r["spec"]["entities"]) == 1 and r["spec"]["entities"][0]["count"] == 1][:30]
    assert len(single) == 30
    with load_pipeline(ModelConfig(path=str(WORLD_SD), scheduler="dpmpp_2m")) as lp:
        lp.pipe.set_progress_bar_config(disable=True)
        images = lp.pipe([r["prompt"] for r in single], num_inference_steps=20, guidance_scale=7.5, output_type="pil",
                         generator=[torch.Generator().manual_seed(100 + k) for k in range(len(single))]).images
    scores = [judge(im, r["prompt"]).score for r, im in zip(single, images, strict=True)]
    assert sum(scores) / len(scores) >= 0.68, scores
    assert sum(s == 1 for s in scores) >= 15, scores  # half of them entirely right
