"""A small HTTP client for a real ComfyUI server, for the host tests.

Covers what the tests need and nothing else: upload an image (+ mask as its alpha
channel), queue an API-format prompt, wait for its history entry, read the saved images
back as numpy arrays, interrupt, and read the server's memory use and log.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests
from PIL import Image


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_NAME = "comfyui-asuka"
# Node ids of the pack (fixed: they are saved in users' workflows).
PACK_NODES = (
    "ASUKA_MAELoader", "ASUKA_MAEPrior",
    "ASUKA_AlignerLoader", "ASUKA_AlignerConditioning",
    "ASUKA_DecoderLoader", "ASUKA_MaskedDecode",
)
PACK_NODES += ("ASUKA_TrainAligner",)


class PromptTimeout(AssertionError):
    pass


@dataclass
class Result:
    """What happened to one prompt.

    status: "success", "error" (the server ran it and a node raised, or it was
    interrupted) or "invalid" (POST /prompt refused it with 400 before running).
    """

    status: str
    prompt_id: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    messages: list = field(default_factory=list)
    error: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def interrupted(self) -> bool:
        return any(m[0] == "execution_interrupted" for m in self.messages)

    @property
    def message(self) -> str:
        """The text a user would read: the exception message of an execution error, or
        every validation message of a refused prompt."""
        if self.status == "invalid":
            parts = [self.error.get("error", {}).get("message", ""),
                     self.error.get("error", {}).get("details", "")]
            for node_id, node_err in (self.error.get("node_errors") or {}).items():
                for e in node_err.get("errors", []):
                    parts.append(f"[{node_id} {node_err.get('class_type')}] {e.get('message')}: "
                                 f"{e.get('details')}")
            return "\n".join(p for p in parts if p)
        for kind, data in self.messages:
            if kind == "execution_error":
                return str(data.get("exception_message", ""))
        return ""

    @property
    def error_node(self) -> tuple[str | None, str | None]:
        for kind, data in self.messages:
            if kind == "execution_error":
                return data.get("node_id"), data.get("node_type")
        return None, None

    @property
    def cached_nodes(self) -> set[str]:
        """Node ids the executor took from its cache instead of running."""
        out: set[str] = set()
        for kind, data in self.messages:
            if kind == "execution_cached":
                out.update(data.get("nodes", []))
        return out

    def describe(self) -> str:
        return f"status={self.status} message={self.message[:2000]!r} error={json.dumps(self.error)[:2000]}"


class ComfyClient:
    def __init__(self, base_url: str, *, input_dir: str, output_dir: str, log_path: str,
                 pid: int | None = None):
        self.base_url = base_url.rstrip("/")
        self.input_dir = input_dir
        self.output_dir = output_dir
        self.log_path = log_path
        self.pid = pid
        self.client_id = f"asuka-host-tests-{uuid.uuid4().hex[:8]}"
        self.session = requests.Session()

    # ------------------------------------------------------------------ plain HTTP
    def get(self, path: str, **kw) -> requests.Response:
        return self.session.get(self.base_url + path, timeout=kw.pop("timeout", 60), **kw)

    def get_json(self, path: str):
        r = self.get(path)
        r.raise_for_status()
        return r.json()

    def object_info(self, node: str | None = None) -> dict:
        info = self.get_json("/object_info" + (f"/{node}" if node else ""))
        return info[node] if node else info

    def alive(self) -> bool:
        try:
            return self.get("/system_stats", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    # ------------------------------------------------------------------ inputs
    def upload_image(self, image: np.ndarray, mask: np.ndarray | None = None, *, name: str | None = None,
                     mode: str | None = None) -> str:
        """Upload ``image`` (HxWx3 or HxW uint8, or float 0..1) as a PNG to the input folder.

        ``mask`` (HxW, 1 / True = area to inpaint) goes into the alpha channel: ComfyUI's
        LoadImage reads ``mask = 1 - alpha``. ``mode`` forces a PIL mode for the file
        ("L", "RGBA", ...). Returns the name to give LoadImage."""
        arr = _to_uint8(image)
        if mask is not None:
            m = np.asarray(mask, dtype=np.float32)
            alpha = np.clip(np.rint((1.0 - m) * 255.0), 0, 255).astype(np.uint8)
            rgb = arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2)
            pil = Image.fromarray(np.dstack([rgb[..., :3], alpha]), "RGBA")
        else:
            pil = Image.fromarray(arr)
        if mode is not None:
            pil = pil.convert(mode)
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        return self.upload_bytes(buf.getvalue(), name or f"asuka-test-{uuid.uuid4().hex[:10]}.png")

    def upload_bytes(self, data: bytes, name: str) -> str:
        r = self.session.post(self.base_url + "/upload/image",
                              files={"image": (name, data, "image/png")},
                              data={"overwrite": "true", "type": "input"}, timeout=60)
        r.raise_for_status()
        info = r.json()
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    # ------------------------------------------------------------------ prompts
    def queue(self, prompt: dict) -> tuple[str | None, dict]:
        """POST /prompt. Returns (prompt_id, response json); prompt_id is None when the
        server refused the prompt (validation error, HTTP 400)."""
        # json.dumps, not requests' json=: that refuses NaN, which a test may send on purpose
        # (ComfyUI's own JSON parser accepts it).
        payload = json.dumps({"prompt": prompt, "client_id": self.client_id}, allow_nan=True)
        r = self.session.post(self.base_url + "/prompt", data=payload.encode(),
                              headers={"Content-Type": "application/json"}, timeout=60)
        if r.status_code == 400:
            return None, r.json()
        assert r.status_code == 200, f"POST /prompt: HTTP {r.status_code}: {r.text[:2000]}"
        body = r.json()
        return body["prompt_id"], body

    def wait(self, prompt_id: str, timeout: float = 300, poll: float = 0.1) -> Result:
        t0 = time.time()
        while True:
            h = self.get_json(f"/history/{prompt_id}")
            entry = h.get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                st = entry["status"]
                return Result(status="success" if st.get("status_str") == "success" else "error",
                              prompt_id=prompt_id, outputs=entry.get("outputs", {}),
                              messages=st.get("messages", []), seconds=time.time() - t0)
            if time.time() - t0 > timeout:
                raise PromptTimeout(f"prompt {prompt_id} not finished after {timeout:.0f}s\n"
                                    f"server log tail:\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, prompt: dict, timeout: float = 300) -> Result:
        t0 = time.time()
        prompt_id, body = self.queue(prompt)
        if prompt_id is None:
            return Result(status="invalid", error=body, seconds=time.time() - t0)
        res = self.wait(prompt_id, timeout)
        res.seconds = time.time() - t0
        return res

    def interrupt(self) -> None:
        self.session.post(self.base_url + "/interrupt", timeout=30).raise_for_status()

    def queue_size(self) -> dict:
        return self.get_json("/queue")

    # ------------------------------------------------------------------ outputs
    def output_files(self, result: Result, node_id: str) -> list[str]:
        images = result.outputs.get(node_id, {}).get("images", [])
        paths = []
        for img in images:
            base = {"output": self.output_dir, "temp": None}.get(img.get("type", "output"), self.output_dir)
            assert base is not None, f"node {node_id} saved to {img.get('type')}, not to the output folder"
            paths.append(os.path.join(base, img.get("subfolder", ""), img["filename"]))
        return paths

    def images(self, result: Result, node_id: str) -> list[np.ndarray]:
        """The images node ``node_id`` (a SaveImage) wrote, as HxWx3 uint8 arrays."""
        paths = self.output_files(result, node_id)
        assert paths, f"node {node_id} saved no image; outputs: {result.outputs}"
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths]

    def image(self, result: Result, node_id: str) -> np.ndarray:
        imgs = self.images(result, node_id)
        assert len(imgs) == 1, f"expected one image from node {node_id}, got {len(imgs)}"
        return imgs[0]

    # ------------------------------------------------------------------ server process
    def rss_bytes(self) -> int:
        assert self.pid is not None
        with open(f"/proc/{self.pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def log_tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log_text().splitlines()[-lines:])
        except OSError as e:
            return f"<no log: {e}>"


def _to_uint8(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return arr


def unique(prefix: str = "asuka") -> str:
    """A fresh filename_prefix, so ComfyUI's output cache never skips a SaveImage."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------- test pictures

def make_picture(size: int | tuple[int, int] = 256, seed: int = 0) -> np.ndarray:
    """A deterministic photo-like RGB uint8 picture (smooth gradients, shapes, texture, noise),
    HxWx3. ``size`` is an int (square) or (height, width)."""
    from PIL import ImageDraw, ImageFilter

    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([
        0.5 + 0.4 * np.sin(xx / w * np.pi * (1 + seed % 3) + rng.uniform(0, 6)),
        0.5 + 0.4 * np.cos(yy / h * np.pi * 2 + rng.uniform(0, 6)),
        0.5 + 0.3 * np.sin((xx + yy) / (w + h) * np.pi * 3 + rng.uniform(0, 6)),
    ], axis=-1)
    pil = Image.fromarray((base * 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for _ in range(8):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(w // 10, w // 3), y0 + rng.integers(h // 10, h // 3)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    pil = pil.filter(ImageFilter.GaussianBlur(1.0))
    arr = np.asarray(pil).astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def box_mask(size: int | tuple[int, int] = 256, box: tuple[float, float, float, float] = (0.3, 0.3, 0.7, 0.7)
             ) -> np.ndarray:
    """HxW float mask, 1 inside the box given as fractions (top, left, bottom, right)."""
    h, w = (size, size) if isinstance(size, int) else size
    m = np.zeros((h, w), np.float32)
    t, l, b, r = box
    m[int(t * h):int(b * h), int(l * w):int(r * w)] = 1.0
    return m


# ---------------------------------------------------------------------- API-format graphs

class Node:
    """A node in a Graph; ``node[i]`` is a link to its output i, ``node`` alone to output 0."""

    def __init__(self, node_id: str, class_type: str):
        self.id = node_id
        self.class_type = class_type

    def __getitem__(self, index: int) -> list:
        return [self.id, index]


class Graph:
    """Builds an API-format prompt: ``g.add("KSampler", model=ckpt[0], seed=1, ...)``."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, _id: str | None = None, **inputs) -> Node:
        node_id = _id or str(len(self.nodes) + 1)
        assert node_id not in self.nodes, node_id
        self.nodes[node_id] = {
            "class_type": class_type,
            "inputs": {k: (v[0] if isinstance(v, Node) else v) for k, v in inputs.items()},
        }
        return Node(node_id, class_type)

    def find(self, class_type: str) -> list[str]:
        return [k for k, v in self.nodes.items() if v["class_type"] == class_type]

    def prompt(self) -> dict:
        return json.loads(json.dumps(self.nodes, allow_nan=True))


def sd15_inpaint_graph(*, checkpoint: str, mae: str, aligner: str, image: str, record_path: str,
                       seed: int, prefix: str, prior_image: str | None = None, steps: int = 2,
                       cfg: float = 1.0, strength: float = 1.0, vae_decode: bool = True,
                       masked_decoder: str | None = None) -> Graph:
    """The ASUKA SD1.5 inpainting graph:

    LoadImage -> ASUKA_MAELoader/ASUKA_MAEPrior -> ASUKA_AlignerLoader/ASUKA_AlignerConditioning
    -> InpaintModelConditioning (checkpoint VAE, pixels, mask) -> KSampler (model through
    ASUKATest_RecordCrossAttention) -> VAEDecode -> SaveImage ("save_vae") and/or
    ASUKA_DecoderLoader/ASUKA_MaskedDecode -> SaveImage ("save_masked").

    ``prior_image`` feeds the MAE a different upload than the sampler (to show the prior
    alone changes the result). The KSampler has id "sampler".
    """
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", _id="ckpt", ckpt_name=checkpoint)
    load = g.add("LoadImage", _id="image", image=image)
    mae_src = g.add("LoadImage", _id="prior_image", image=prior_image) if prior_image else load
    mae_node = g.add("ASUKA_MAELoader", _id="mae", mae_name=mae)
    prior = g.add("ASUKA_MAEPrior", _id="prior", mae=mae_node[0], image=mae_src[0], mask=mae_src[1])
    al = g.add("ASUKA_AlignerLoader", _id="aligner", aligner_name=aligner)
    cond = g.add("ASUKA_AlignerConditioning", _id="cond", aligner=al[0], prior=prior[0], strength=strength)
    imc = g.add("InpaintModelConditioning", _id="inpaint_cond", positive=cond[0], negative=cond[1],
                vae=ckpt[2], pixels=load[0], mask=load[1], noise_mask=True)
    rec = g.add("ASUKATest_RecordCrossAttention", _id="record", model=ckpt[0], path=record_path)
    ks = g.add("KSampler", _id="sampler", model=rec[0], seed=seed, steps=steps, cfg=cfg,
               sampler_name="euler", scheduler="normal", positive=imc[0], negative=imc[1],
               latent_image=imc[2], denoise=1.0)
    if vae_decode:
        dec = g.add("VAEDecode", _id="vae_decode", samples=ks[0], vae=ckpt[2])
        g.add("SaveImage", _id="save_vae", images=dec[0], filename_prefix=prefix + "-vae")
    if masked_decoder:
        d = g.add("ASUKA_DecoderLoader", _id="decoder", decoder_name=masked_decoder)
        md = g.add("ASUKA_MaskedDecode", _id="masked_decode", decoder=d[0], samples=ks[0], image=load[0],
                   mask=load[1], composite=True, tile_size=0, tile_overlap=64)
        g.add("SaveImage", _id="save_masked", images=md[0], filename_prefix=prefix + "-masked")
    return g


def read_records(path: str) -> list[dict]:
    """The JSON lines ASUKATest_RecordCrossAttention appended to ``path``."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
