"""The pack installs and loads the ways users install it, and its metadata is what tools expect."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
BIN = Path(sys.executable).parent


def _names(reqs: list[str]) -> list[str]:
    return [re.split(r"[<>=!~;\[ ]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in reqs]


def _requirements_txt() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def test_requirements_txt_matches_pyproject():
    assert _requirements_txt() == PYPROJECT["project"]["dependencies"]


def test_torch_is_never_a_runtime_requirement():
    """ComfyUI owns torch: a pack that pins torch can replace the user's CUDA build."""
    for name in _names(PYPROJECT["project"]["dependencies"]) + _names(_requirements_txt()):
        assert name not in {"torch", "torchvision", "torchaudio"}


def test_the_user_fixed_top_level_exists():
    for name in ("__init__.py", "nodes", "selma_backend", "workflows", "web", "pyproject.toml", "tests", "README.md"):
        assert (REPO / name).exists(), name


def test_importing_the_pack_has_no_side_effects():
    """``import comfyui_selma`` (pip-installed name) loads nothing of ComfyUI and no heavy library."""
    code = ("import sys, inspect, comfyui_selma as p; "
            "assert inspect.iscoroutinefunction(p.comfy_entrypoint); "
            "assert p.WEB_DIRECTORY == './web'; "
            "bad = [m for m in ('comfy', 'comfy_api', 'folder_paths', 'server', 'torch', 'diffusers') if m in sys.modules]; "
            "assert not bad, bad; print(p.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == (REPO / "__init__.py").resolve()


def test_selma_console_script_and_module_are_the_same_command():
    a = subprocess.run([str(BIN / "selma"), "--help"], capture_output=True, text=True)
    b = subprocess.run([sys.executable, "-m", "selma_backend", "--help"], capture_output=True, text=True)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout.replace("selma", "X") == b.stdout.replace("selma", "X")
    for command in ("tiny-models", "skills", "prompts", "demo"):
        assert command in a.stdout


def test_selma_version():
    out = subprocess.run([str(BIN / "selma"), "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"selma {PYPROJECT['project']['version']}"


def test_unknown_command_is_a_clear_error():
    out = subprocess.run([str(BIN / "selma"), "renderr"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "invalid choice: 'renderr'" in out.stderr


def test_comfy_node_validate_accepts_the_pack():
    """comfy-cli's own registry validation of pyproject.toml ([tool.comfy] and [project])."""
    out = subprocess.run([str(BIN / "comfy"), "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "error" not in out.stdout.lower(), out.stdout


def test_tool_comfy_section():
    tc = PYPROJECT["tool"]["comfy"]
    assert tc["PublisherId"] and tc["DisplayName"] == "ComfyUI-SELMA"
    assert set(tc["includes"]) >= {"web", "locales", "workflows"}


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    m = re.search(r"<!-- test-command -->\s*```(?:sh|bash)?\n(.+?)\n```", readme, re.S)
    assert m, "README must show the test command in a block marked <!-- test-command -->"
    command = m.group(1).strip()
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(rf"^exec {re.escape(command)}$", ci, re.M), (command, ci)


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    for init in (REPO / "selma_backend").rglob("__init__.py"):
        dotted = ".".join(init.parent.relative_to(REPO).parts)
        assert dotted in listed and f"comfyui_selma.{dotted}" in listed, dotted
    for init in (REPO / "nodes").rglob("__init__.py"):
        assert "comfyui_selma." + ".".join(init.parent.relative_to(REPO).parts) in listed


def test_a_built_wheel_carries_the_pack_and_loads_without_comfyui(tmp_path):
    """A non-editable install: `comfyui_selma` and `selma_backend` with their data files."""
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("comfyui_selma-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in ("comfyui_selma/__init__.py", "comfyui_selma/nodes/glue.py", "comfyui_selma/locales/ja/nodeDefs.json",
                 "comfyui_selma/workflows/selma_list_skills.json", "comfyui_selma/selma_backend/cli.py",
                 "selma_backend/cli.py", "selma_backend/prompts/offline_vocab.json",
                 "comfyui_selma/workflows/selma_full_pipeline.jpg",  # template browser thumbnails
                 "selma_backend/world/assets/world-clip/open_clip_model.safetensors",  # the shipped world CLIP
                 "comfyui_selma/selma_backend/world/assets/world-clip/open_clip_config.json",
                 "selma_backend/world/assets/world-sd/unet/diffusion_pytorch_model.safetensors",  # the world's SD
                 "selma_backend/world/assets/world-sd/model_index.json",
                 "comfyui_selma/selma_backend/world/assets/world-sd-small/tokenizer/vocab.json"):
        assert must in names, must
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    code = ("import sys, comfyui_selma.selma_backend.skills as s, selma_backend.cli as c; "
            "assert len(s.builtin_skills()) == 8; assert 'comfy' not in sys.modules; print(comfyui_selma.__file__)")
    check = subprocess.run([sys.executable, "-c", "import comfyui_selma; " + code], capture_output=True, text=True,
                           cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert check.returncode == 0, check.stderr
    assert str(target) in check.stdout
