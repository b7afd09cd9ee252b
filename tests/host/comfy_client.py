"""A small HTTP client for a real ComfyUI server, for the host tests.

The HTTP part (queue a prompt, wait for its history entry, upload, interrupt) is
``scripts/comfy_http.py``, shared with the scripts; this adds what the tests need: upload
an image (+ mask as its alpha channel), read the saved images back as numpy arrays, and
read the server's memory use and log.
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
from PIL import Image

from scripts.comfy_http import ComfyAPI, PromptTimeout, Result, png_bytes  # noqa: F401  (re-exported for the tests)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_NAME = "comfyui-asuka"
# Node ids of the pack (fixed: they are saved in users' workflows).
PACK_NODES = (
    "ASUKA_MAELoader", "ASUKA_MAEPrior",
    "ASUKA_AlignerLoader", "ASUKA_AlignerConditioning",
    "ASUKA_DecoderLoader", "ASUKA_MaskedDecode",
    "ASUKA_FluxConditioning",
    "HDPainter_SRSampler", "ASUKA_PoissonBlend",
    "HDPainter_PromptTokens", "HDPainter_PAIntA", "HDPainter_RASGSampler",
    "ASUKA_TrainAligner", "ASUKA_TrainDecoder",
)


class ComfyClient(ComfyAPI):
    """The shared HTTP client plus what only the tests need: local input/output folders,
    uploads with the mask in the alpha channel, saved images as arrays, the server
    process's memory and log."""

    def __init__(self, base_url: str, *, input_dir: str, output_dir: str, log_path: str,
                 pid: int | None = None):
        super().__init__(base_url, client_name="asuka-host-tests")
        self.input_dir = input_dir
        self.output_dir = output_dir
        self.log_path = log_path
        self.pid = pid

    def timeout_detail(self) -> str:
        return f"server log tail:\n{self.log_tail()}"

    # ------------------------------------------------------------------ inputs
    def upload_image(self, image: np.ndarray, mask: np.ndarray | None = None, *, name: str | None = None,
                     mode: str | None = None) -> str:
        """Upload ``image`` (HxWx3 or HxW uint8, or float 0..1) as a PNG to the input folder.

        ``mask`` (HxW, 1 / True = area to inpaint) goes into the alpha channel: ComfyUI's
        LoadImage reads ``mask = 1 - alpha``. ``mode`` forces a PIL mode for the file
        ("L", "RGBA", ...). Returns the name to give LoadImage."""
        data = png_bytes(_to_uint8(image), mask, mode)
        return self.upload_bytes(data, name or f"asuka-test-{uuid.uuid4().hex[:10]}.png")

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
