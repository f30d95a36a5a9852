"""Shared fixtures: the provisioned ComfyUI, a live server with this pack, tiny models, a browser.

scripts/dev.sh provisions everything and exports SELMA_COMFYUI_DIR (and SELMA_CHROMIUM,
SELMA_FRONTEND_NEW_ROOT). Running pytest without it fails with a message naming that script.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from harness.comfy import DEFAULT_CACHE, ComfyServer, comfyui_source_dir, make_base_dir

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    return comfyui_source_dir()


@pytest.fixture(scope="session", autouse=True)
def _private_selma_cache(tmp_path_factory):
    """Caches the code writes (weight hashes, latents) go to a temp dir, not the user's ~/.cache.

    The provisioned ComfyUI is found first, through the real cache location."""
    default = DEFAULT_CACHE / "comfyui-0.3.75"
    if (default / "main.py").is_file():
        os.environ.setdefault("SELMA_COMFYUI_DIR", str(default))
    old = os.environ.get("SELMA_CACHE_DIR")
    os.environ["SELMA_CACHE_DIR"] = str(tmp_path_factory.mktemp("selma-cache"))
    yield
    if old is None:
        os.environ.pop("SELMA_CACHE_DIR", None)
    else:
        os.environ["SELMA_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The five tiny models of ``selma tiny-models`` (seed 0), written once per test session."""
    from selma_backend.tiny_models import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"), seed=0)


#: Where the live server finds the tiny models: the names bundled workflows use.
TINY_INSTALL = {"mini-sd15": "checkpoints/selma-mini-sd15.safetensors", "sd1": "diffusers/selma-tiny-sd1",
                "sdxl": "diffusers/selma-tiny-sdxl", "clip": "clip/selma-tiny-clip", "llm": "LLM/selma-tiny-llm"}


#: Tiny LoRA experts and their merge (``write_tiny_loras``) for the stage-5 and apply-experts workflows,
#: under the names SELMA's train and merge nodes write. Copied, not linked: the merge node refuses
#: paths in models/loras/selma/ that resolve elsewhere, and training in a test may replace them.
TINY_LORA_INSTALL = {"lora-countbench": "loras/selma/experts/countbench.safetensors",
                     "lora-spatial": "loras/selma/experts/spatial.safetensors", "lora-merged": "loras/selma/merged.safetensors"}


@pytest.fixture(scope="session")
def tiny_loras(tmp_path_factory) -> dict[str, Path]:
    from selma_backend.tiny_models import write_tiny_loras

    return write_tiny_loras(tmp_path_factory.mktemp("tiny-loras"), seed=0)


@pytest.fixture(scope="session")
def world_sd(tmp_path_factory) -> Path:
    """The shipped world-sd (selma_backend/world/assets, which the live server lists itself); while it is
    not there (a checkout before its training finished), a tiny one of the same layout (~20 s)."""
    from selma_backend.world.sd_model import WORLD_SD

    if (WORLD_SD / "model_index.json").is_file():
        return WORLD_SD
    from selma_backend.world.sd_train import SdTrainConfig, train_world_sd

    out = tmp_path_factory.mktemp("tiny-world-sd") / "world-sd"
    train_world_sd(SdTrainConfig(preset="tiny", steps=2, vae_steps=2, batch_size=4, threads=1), out)
    return out


@pytest.fixture(scope="session")
def world_loras(tmp_path_factory, world_sd) -> dict[str, Path]:
    """World experts and their merge for the stage-5/6 workflows (tests/world_helpers.py WORLD_LORA_INSTALL)."""
    from world_helpers import write_world_loras

    return write_world_loras(world_sd, tmp_path_factory.mktemp("world-loras"))


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory, tiny_models, tiny_loras, world_sd, world_loras) -> Path:
    from world_helpers import WORLD_LORA_INSTALL

    base = make_base_dir(tmp_path_factory.mktemp("comfy-base"))
    for name, rel in WORLD_LORA_INSTALL.items():  # copied, as the tiny LoRAs below
        (base / "models" / "loras" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(world_loras[name], base / "models" / "loras" / rel)
    from selma_backend.world.sd_model import WORLD_SD

    if world_sd != WORLD_SD:  # only the stand-in needs installing; the server lists the shipped one itself
        (base / "models" / "diffusers" / "world-sd").symlink_to(world_sd)
    for name, rel in TINY_INSTALL.items():
        (base / "models" / rel).symlink_to(tiny_models[name])
    for name, rel in TINY_LORA_INSTALL.items():
        (base / "models" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_loras[name], base / "models" / rel)
    return base


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir, comfy_base):
    server = ComfyServer(comfyui_dir, comfy_base).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def comfy_server_new_frontend(comfyui_dir, comfy_base):
    """The same ComfyUI with the newest frontend (``SELMA_FRONTEND_NEW_ROOT``), one per session."""
    root = os.environ.get("SELMA_FRONTEND_NEW_ROOT")
    if not root or not (Path(root) / "index.html").is_file():
        pytest.fail("SELMA_FRONTEND_NEW_ROOT is not set: run the tests with `scripts/dev.sh test`")
    server = ComfyServer(comfyui_dir, comfy_base, front_end_root=Path(root)).start()
    yield server
    server.stop()


@pytest.fixture(params=["pinned", "newest"])
def any_frontend(request):
    """(which, server): the frontend ComfyUI 0.3.75 pins, and the newest one."""
    name = "comfy_server" if request.param == "pinned" else "comfy_server_new_frontend"
    return request.param, request.getfixturevalue(name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """When a test that used a live ComfyUI fails, attach the server's log tail to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for name in ("comfy_server", "comfy_server_new_frontend"):
            server = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if isinstance(server, ComfyServer):
                report.sections.append((f"ComfyUI log ({name})", server.log_tail()))
