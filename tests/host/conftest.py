"""Host tier: a real ComfyUI server (0.3.75, or 0.33.0 with ``ASUKA_COMFY=0.33.0``;
subprocess, CPU) driven over HTTP.

One server per pytest session. It runs from ``$ASUKA_COMFY_DIR`` (``scripts/host.sh test``
sets it; without it every host test is skipped) with:

* the pack, as installed by ``scripts/host.sh`` (``custom_nodes/comfyui-asuka`` -> this checkout);
* the test-only probe pack ``tests/host/probe_nodes``, linked into a temporary
  ``custom_nodes`` folder that the generated ``extra_model_paths.yaml`` names (ComfyUI
  loads every ``.py`` file of a custom_nodes folder, so ``tests/host`` itself cannot be one);
* ``asuka:`` -> a temporary folder of random-weight pack models written by the fixtures in
  ``tests/fixtures`` (the large ones cached under ``$ASUKA_HOST_CACHE``);
* ``checkpoints:`` -> ``$ASUKA_HOST_CACHE/models/checkpoints`` holding the random SD1.5
  inpainting checkpoint (``tests/fixtures/sd15_checkpoint.py``);
* temporary input / output / temp / user folders and an in-memory database, so nothing is
  written into the shared ComfyUI tree;
* the flag that keeps it offline as ``scripts/host.sh`` read it from the tree
  (``$ASUKA_COMFY_OFFLINE_FLAG``: ``--disable-api-nodes`` up to 0.33.0, ``--offline`` later).

The server log is kept in a file (``HostServer.log_path``); fixtures that fail show its tail.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
import yaml

from tests.host.comfy_client import REPO, ComfyClient

HERE = os.path.dirname(os.path.abspath(__file__))
STARTUP_TIMEOUT = 240


# ------------------------------------------------------------------------------ models

@dataclass
class HostModels:
    """File names (as the loaders' combos list them) of the models in the test asuka folder."""

    folder: str
    mae: str = "mae_small.pth"                    # small official-format MAE (fast)
    mae_vitb: str = "mae_300.pth"                 # full ViT-B shaped official MAE
    sd15_aligner: str = "asuka_sd15_aligner.safetensors"
    flux_aligner: str = "asuka_alignment_clip.pt"
    avq_decoder: str = "avq_decoder_small.safetensors"   # 4-channel latents (SD1.5)
    asuka_decoder: str = "asuka_decoder_small.ckpt"      # 16-channel latents (FLUX), narrow (fast)
    asuka_decoder_full: str = "asuka_decoder.ckpt"       # 16-channel, official size and layout
    # broken / wrong files for the robustness tests
    checkpoint_as_mae: str = "sd15_inpainting_in_asuka_folder.safetensors"
    truncated_mae: str = "mae_truncated.pth"
    truncated_decoder: str = "decoder_truncated.safetensors"
    timings: dict = field(default_factory=dict)


def _source_hash(module) -> str:
    """Version of a generator module: cached files are rebuilt when its source changes."""
    return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()[:12]


def _cached(cache_dir: str, name: str, key: str, write) -> str:
    """Build ``name`` once per generator version (``key``) under ``cache_dir``."""
    os.makedirs(cache_dir, exist_ok=True)
    stem, ext = os.path.splitext(name)
    path = os.path.join(cache_dir, f"{stem}-{key}{ext}")
    if not os.path.exists(path):
        tmp = path + f".{os.getpid()}.tmp{ext}"
        write(tmp)
        os.replace(tmp, path)
        # drop the versions made by older generator code
        for old in glob.glob(os.path.join(glob.escape(cache_dir), f"{glob.escape(stem)}-" + "?" * len(key) + ext)):
            if old != path:
                os.remove(old)
    return path


def _truncate_copy(src: str, dst: str, fraction: float = 0.5) -> None:
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * fraction)])


def build_test_models(models_dir: str, cache_dir: str, sd15_checkpoint: str) -> HostModels:
    """Write the random pack models into ``models_dir`` (the server's ``asuka`` folder)."""
    from safetensors.torch import save_file

    from tests.fixtures import aligner_files, decoder_files, mae_files

    m = HostModels(folder=models_dir)
    os.makedirs(models_dir, exist_ok=True)
    fixture_cache = os.path.join(cache_dir, "models", "asuka-test")

    def timed(name, fn):
        t0 = time.time()
        fn(os.path.join(models_dir, name))
        m.timings[name] = round(time.time() - t0, 2)

    def link_cached(name, key, write):
        def go(dst):
            src = _cached(fixture_cache, name, key, write)
            os.symlink(src, dst)
        timed(name, go)

    # MAE: a small one (the architecture is read from the tensors) for speed, and one
    # full ViT-B file shaped exactly like the released mae_300.pth.
    mae_key = _source_hash(mae_files)
    link_cached(m.mae, mae_key, lambda p: mae_files.write_official_mae_pth(
        p, seed=11, embed_dim=192, depth=2, decoder_dim=512, decoder_depth=8))
    link_cached(m.mae_vitb, mae_key, lambda p: mae_files.write_official_mae_pth(p, seed=12))
    # Aligners: an SD1.5 one (safetensors marked sd15) and the released FLUX CLIP-branch layout.
    timed(m.sd15_aligner, lambda p: aligner_files.write_sd15_aligner(p, seed=21))
    link_cached(m.flux_aligner, _source_hash(aligner_files),
                lambda p: aligner_files.write_official_aligner_pt(p, width=768))
    # Decoders: narrow 4-channel AVQ (SD1.5 latents) and 16-channel ASUKA (FLUX latents) ones
    # for speed (the architecture is read from the tensors), and one official-size ASUKA file.
    timed(m.avq_decoder, lambda p: save_file(
        {k: v.contiguous() for k, v in decoder_files.avq_ldm_state_dict(31, z_channels=4, ch=32).items()}, p))
    timed(m.asuka_decoder, lambda p: decoder_files.write_official_asuka_decoder_ckpt(p, seed=33, ch=32))
    link_cached(m.asuka_decoder_full, _source_hash(decoder_files),
                lambda p: decoder_files.write_official_asuka_decoder_ckpt(p, seed=32))
    # Wrong and broken files.
    os.symlink(sd15_checkpoint, os.path.join(models_dir, m.checkpoint_as_mae))
    _truncate_copy(os.path.join(models_dir, m.mae), os.path.join(models_dir, m.truncated_mae))
    _truncate_copy(os.path.join(models_dir, m.avq_decoder), os.path.join(models_dir, m.truncated_decoder))
    return m


# ------------------------------------------------------------------------------ server

@dataclass
class HostServer:
    client: ComfyClient
    process: subprocess.Popen
    log_path: str
    base_dir: str
    models: HostModels
    checkpoint: str          # name for CheckpointLoaderSimple
    record_dir: str          # where cross-attention recordings go
    startup_seconds: float

    @property
    def pid(self) -> int:
        return self.process.pid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 120) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return f"<no log: {e}>"


@pytest.fixture(scope="session")
def comfy_dir() -> str:
    d = os.environ.get("ASUKA_COMFY_DIR")
    if not d:
        pytest.skip("host tests need a ComfyUI tree: run them with `scripts/host.sh test`")
    if not os.path.isfile(os.path.join(d, "main.py")):
        pytest.fail(f"ASUKA_COMFY_DIR={d} is not a ComfyUI tree (no main.py)")
    return d


@pytest.fixture(scope="session")
def host_cache(comfy_dir) -> str:
    return os.environ.get("ASUKA_HOST_CACHE") or os.path.join(REPO, ".host", "cache")


@pytest.fixture(scope="session")
def sd15_checkpoint(host_cache, comfy_dir) -> str:
    from tests.fixtures.sd15_checkpoint import ensure_sd15_inpaint_checkpoint

    return ensure_sd15_inpaint_checkpoint(host_cache, comfy_dir=comfy_dir)


@pytest.fixture(scope="session")
def host_server(comfy_dir, host_cache, sd15_checkpoint, tmp_path_factory) -> HostServer:
    base = str(tmp_path_factory.mktemp("comfy-host"))
    dirs = {k: os.path.join(base, k) for k in ("input", "output", "temp", "user", "custom_nodes",
                                                 "models_asuka", "records",
                                                 "models_diffusion", "models_vae")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    os.symlink(os.path.join(HERE, "probe_nodes"), os.path.join(dirs["custom_nodes"], "asuka_test_probe"))

    models = build_test_models(dirs["models_asuka"], host_cache, sd15_checkpoint)

    yaml_path = os.path.join(base, "extra_model_paths.yaml")
    with open(yaml_path, "w", encoding="utf-8") as f:
        yaml.safe_dump({"asuka_host_tests": {
            "asuka": dirs["models_asuka"],
            "checkpoints": os.path.dirname(sd15_checkpoint),
            "custom_nodes": dirs["custom_nodes"],  # ComfyUI reads custom node folders from here too
            # FLUX graphs: tests link their (cached) random models in here when they need them
            "diffusion_models": dirs["models_diffusion"],
            "vae": dirs["models_vae"],
        }}, f)

    port = _free_port()
    log_path = os.path.join(base, "server.log")
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", os.environ.get("ASUKA_COMFY_OFFLINE_FLAG", "--disable-api-nodes"),
           "--use-pytorch-cross-attention",
           "--database-url", "sqlite:///:memory:", "--extra-model-paths-config", yaml_path,
           "--output-directory", dirs["output"], "--input-directory", dirs["input"],
           "--temp-directory", dirs["temp"], "--user-directory", dirs["user"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
           "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    log_file = open(log_path, "w", encoding="utf-8")
    proc = subprocess.Popen(cmd, cwd=comfy_dir, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    client = ComfyClient(f"http://127.0.0.1:{port}", input_dir=dirs["input"], output_dir=dirs["output"],
                         log_path=log_path, pid=proc.pid)
    try:
        while not client.alive():
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {proc.returncode} during start-up:\n{_tail(log_path)}")
            if time.time() - t0 > STARTUP_TIMEOUT:
                pytest.fail(f"ComfyUI did not answer /system_stats within {STARTUP_TIMEOUT}s:\n{_tail(log_path)}")
            time.sleep(0.2)
        server = HostServer(client=client, process=proc, log_path=log_path, base_dir=base, models=models,
                            checkpoint=os.path.basename(sd15_checkpoint), record_dir=dirs["records"],
                            startup_seconds=time.time() - t0)
        print(f"\n[host] ComfyUI up on port {port} in {server.startup_seconds:.1f}s (pid {proc.pid}); "
              f"log {log_path}; model files written in {models.timings}", file=sys.stderr)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log_file.close()
        # pytest keeps only its last three temporary folders: keep the log where it can be read.
        keep = os.environ.get("ASUKA_HOST_KEEP_LOG") or os.path.join(host_cache, "last-host-server.log")
        try:
            shutil.copy(log_path, keep)
        except OSError:
            pass


@pytest.fixture
def host(host_server) -> HostServer:
    """The session's server; after each test, checks that it is still up."""
    if host_server.process.poll() is not None:
        pytest.fail(f"the ComfyUI server died earlier (code {host_server.process.returncode}):\n"
                    f"{_tail(host_server.log_path)}")
    yield host_server
    if host_server.process.poll() is not None or not host_server.client.alive():
        pytest.fail(f"the ComfyUI server stopped during this test:\n{_tail(host_server.log_path)}")


@pytest.fixture
def comfy(host) -> ComfyClient:
    return host.client


# ------------------------------------------------------------------------------ x4 upscaler (HD-Painter SR)

@pytest.fixture(scope="session")
def x4_upscaler_checkpoint(host_cache, comfy_dir) -> str:
    """File name, for CheckpointLoaderSimple, of the small random SD x4 upscaler checkpoint
    (``tests/fixtures/x4_upscaler_checkpoint.py``), cached next to the SD1.5 one, in the
    folder the server lists as ``checkpoints``."""
    from tests.fixtures import x4_upscaler_checkpoint as x4
    from tests.fixtures.sd15_checkpoint import checkpoint_dir

    path = _cached(checkpoint_dir(host_cache), x4.CHECKPOINT_NAME, _source_hash(x4),
                   lambda tmp: x4.build(tmp, comfy_dir))
    return os.path.basename(path)
