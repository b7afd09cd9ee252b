"""Compare inpainting workflows on your own photos, with numbers.

    scripts/host.sh evaluate --workflow A.json [--workflow B.json ...] --images DIR
                             [--masks DIR | --mask-generator] [--out DIR] [--server URL ...]
                             [--protocol project|misato]

Every workflow runs on every image / mask pair through a ComfyUI server's HTTP API: the
workflow's ``LoadImage`` nodes get the pair's image with the mask in its alpha channel
(``LoadImageMask`` nodes the same file, channel ``alpha``), its ``SaveImage`` output is
read back and scored. Workflows are the frontend's saved files (``Save`` or ``Export
(API)``); with several ``SaveImage`` nodes, name the one to score: ``--workflow A.json#12``.

Without ``--server`` a CPU server is started from ``--comfy-dir`` (``scripts/host.sh``
passes its own ComfyUI tree) for the run; with it, any running server is used (a GPU one,
with your models). Several ``--server`` options spread the pairs over the servers
(``dispatch``): a pair that fails on one is retried on another, a server that stops
answering drops out, and the report is the same as from one server.
``--protocol misato``: the official MISATO evaluation's definitions (docs/evaluation.md),
with its CLIP score from ``--clip-weights DIR`` (a local transformers CLIP model folder).

The report folder (``--out``, default ``eval-report``) gets:

* ``per_image.csv``: one row per workflow and image, every metric; written after each
  pair, and read back on a re-run, which skips the pairs already scored (resumable);
* ``summary.md`` / ``summary.html``: per workflow and metric the mean and its 95 %
  interval (Student's t over images);
* ``contact_sheet.png``: original, mask, and each workflow's result side by side;
* ``inputs/``, ``masks/``, ``results/<workflow>/``: the images as scored.

Metrics (``asuka_core/metrics.py``; every one after pasting the result into the original
outside the binarised mask, as the ASUKA evaluation does, except ``unmasked_de2000``):
PSNR, SSIM, the ASUKA boundary gradient score ``grad``, colour ``seam`` and
``unmasked_de2000``. LPIPS, FID and U-IDS / P-IDS need network weights that this script
never downloads: pass the files (``--lpips-weights``, ``--alexnet-weights``,
``--inception-weights``; see ``docs/evaluation.md``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import html
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import requests
from PIL import Image, ImageDraw, ImageOps

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

from comfy_http import ComfyAPI, PromptTimeout, png_bytes  # noqa: E402
from workflows import to_api_prompt  # noqa: E402

from asuka_core import metrics  # noqa: E402
from asuka_core.errors import InputError  # noqa: E402
from asuka_core.masks import EVALUATION_SHARES, MaskGenerator  # noqa: E402

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
METRIC_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "grad": "Grad", "seam": "Seam ΔE",
                 "unmasked_de2000": "Unmasked ΔE2000", "lpips": "LPIPS"}
CSV_FIELDS = ["workflow", "image", "status", *metrics.METRICS, "lpips", "seconds", "resized",
              "workflow_sha", "pair_sha", "mask_source", "error"]


class EvalError(Exception):
    """A problem with the command's inputs: printed as one clear message."""


# ------------------------------------------------------------------------------ inputs

def list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise EvalError(f"--images {folder}: not a folder.")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise EvalError(f"--images {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}).")
    stems = [os.path.splitext(n)[0] for n in names]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise EvalError(f"--images {folder}: several files share a name: {dup}; rename them.")
    return [os.path.join(folder, n) for n in names]


def _fit(img: Image.Image, size: int, resample) -> Image.Image:
    """Centre crop to a square and resize to ``size`` (0: keep the size, crop to a multiple of 8)."""
    w, h = img.size
    if size:
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        return img.resize((size, size), resample) if s != size else img
    w8, h8 = w - w % 8, h - h % 8
    if w8 < 64 or h8 < 64:
        raise EvalError(f"image of {w}x{h} px is too small (at least 64x64)")
    return img.crop(((w - w8) // 2, (h - h8) // 2, (w - w8) // 2 + w8, (h - h8) // 2 + h8))


def load_image(path: str, size: int) -> np.ndarray:
    with Image.open(path) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
    return np.asarray(_fit(img, size, Image.LANCZOS))


def load_mask(folder: str, stem: str, size: int, shape: tuple[int, int], grey: bool = False) -> np.ndarray:
    """The mask of image ``stem`` (``stem.png`` or any image extension; the MISATO 1K set's
    ``00stem.png`` too), fitted like the images: bool (``>= 128``), or with ``grey`` the
    uint8 grey levels as given (the MISATO protocol)."""
    for name in (stem, "00" + stem):
        path = next((os.path.join(folder, name + ext) for ext in IMAGE_EXTENSIONS
                     if os.path.exists(os.path.join(folder, name + ext))), None)
        if path:
            break
    else:
        raise EvalError(f"--masks {folder}: no mask for image '{stem}' (expected {stem}.png, white = hole).")
    with Image.open(path) as im:
        m = _fit(im.convert("L"), size, Image.NEAREST)
    grey_levels = np.asarray(m)
    arr = grey_levels >= 128
    if arr.shape != shape:
        raise EvalError(f"mask {path} is {arr.shape[1]}x{arr.shape[0]} after fitting, the image "
                        f"{shape[1]}x{shape[0]}: give masks of the images' size.")
    if not arr.any():
        raise EvalError(f"mask {path} is empty (no white pixel): nothing to inpaint.")
    return grey_levels.copy() if grey else arr


# ------------------------------------------------------------------------------ workflows

class Workflow:
    def __init__(self, spec: str, object_info: dict, names: set[str]):
        path, _, node = spec.partition("#")
        if not os.path.isfile(path):
            raise EvalError(f"--workflow {path}: no such file.")
        with open(path, "rb") as f:
            raw = f.read()
        self.sha = hashlib.sha256(raw + node.encode()).hexdigest()[:12]
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise EvalError(f"--workflow {path}: not JSON ({e}).") from None
        if isinstance(data, dict) and "nodes" in data and "links" in data:
            missing = sorted({n["type"] for n in data["nodes"]} - set(object_info) - {"Note", "MarkdownNote"})
            if missing:
                raise EvalError(f"--workflow {path}: the server does not know the node types {missing} "
                                "(custom nodes not installed?).")
            data = to_api_prompt(data, object_info)
        if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
            raise EvalError(f"--workflow {path}: neither a saved workflow nor an API-format prompt.")
        self.prompt = data
        self.loads = [k for k, v in data.items() if v["class_type"] == "LoadImage"]
        self.mask_loads = [k for k, v in data.items() if v["class_type"] == "LoadImageMask"]
        if not self.loads:
            raise EvalError(f"--workflow {path}: no LoadImage node to feed the images into.")
        saves = [k for k, v in data.items() if v["class_type"] == "SaveImage"]
        if node:
            if node not in data:
                raise EvalError(f"--workflow {spec}: no node with id {node}.")
            self.output = node
        elif len(saves) == 1:
            self.output = saves[0]
        else:
            raise EvalError(f"--workflow {path}: {'no' if not saves else len(saves)} SaveImage nodes; name the "
                            f"one to score: --workflow {path}#<node id> (SaveImage ids: {saves}).")
        base = os.path.splitext(os.path.basename(path))[0]
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        self.name = name
        self.path = path

    def for_pair(self, upload: str, prefix: str) -> dict:
        prompt = json.loads(json.dumps(self.prompt))
        for k in self.loads:
            prompt[k]["inputs"]["image"] = upload
        for k in self.mask_loads:
            prompt[k]["inputs"]["image"] = upload
            prompt[k]["inputs"]["channel"] = "alpha"
        for k, v in prompt.items():
            if v["class_type"] == "SaveImage":
                v["inputs"]["filename_prefix"] = f"{prefix}-{k}"
        return prompt


# ------------------------------------------------------------------------------ server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """A CPU ComfyUI server for the duration of the run (as ``scripts/host.sh serve`` starts it)."""

    def __init__(self, comfy_dir: str, log_path: str, extra: list[str], timeout: float = 300):
        if not comfy_dir or not os.path.isfile(os.path.join(comfy_dir, "main.py")):
            raise EvalError("no --server given and no ComfyUI tree to start one (--comfy-dir): run through "
                            "`scripts/host.sh evaluate`, or pass --server http://host:port.")
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w", encoding="utf-8")
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--disable-api-nodes", "--use-pytorch-cross-attention", *extra]
        print(f"starting ComfyUI ({comfy_dir}) on {self.url}; log {log_path}", file=sys.stderr)
        self.proc = subprocess.Popen(cmd, cwd=comfy_dir, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        api = ComfyAPI(self.url)
        t0 = time.time()
        while not api.alive():
            if self.proc.poll() is not None or time.time() - t0 > timeout:
                self.close()
                raise EvalError(f"ComfyUI did not start; see {log_path}")
            time.sleep(0.5)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------------------ several servers

class ServerDown(Exception):
    """A server stopped answering (connection refused or reset, HTTP error): it takes no more pairs."""


def dispatch(jobs: list, servers: list, attempt, record) -> None:
    """Run ``jobs`` on ``servers``, one worker thread per server, each taking the next job it
    has not tried yet. ``attempt(server, job)`` returns a report row (``row["status"]`` "ok"
    or "failed") or raises ``ServerDown``. A job that fails on a server is retried on a live
    server that has not tried it; when none is left its last failure is recorded. A server
    that is down takes no more jobs (its job in flight goes back to the others).
    ``record(job, row)`` is called once per job, under a lock, in completion order."""
    cond = threading.Condition()
    pending = list(range(len(jobs)))
    tried: list[set] = [set() for _ in jobs]
    last: dict[int, dict] = {}
    alive = set(range(len(servers)))
    busy = [0]

    def takeable(j: int) -> bool:
        return any(s not in tried[j] for s in alive)

    def worker(i: int) -> None:
        while True:
            with cond:
                while True:
                    if i not in alive:
                        return
                    j = next((j for j in pending if i not in tried[j]), None)
                    if j is not None:
                        pending.remove(j)
                        busy[0] += 1
                        break
                    if busy[0] == 0 and not any(takeable(k) for k in pending):
                        cond.notify_all()
                        return
                    cond.wait()
            down = False
            try:
                row = attempt(servers[i], jobs[j])
            except ServerDown as e:
                down = True
                row = {"status": "failed", "error": f"server {getattr(servers[i], 'base_url', i)} stopped "
                                                    f"answering: {e}"[:500]}
            with cond:
                busy[0] -= 1
                tried[j].add(i)
                if down:
                    alive.discard(i)
                    print(f"{row['error']}; {len(alive)} server(s) left", file=sys.stderr)
                if row.get("status") == "ok":
                    record(jobs[j], row)
                else:
                    last[j] = row
                    if takeable(j):
                        pending.insert(0, j)
                    else:
                        record(jobs[j], row)
                cond.notify_all()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j in pending:          # every server is down
        record(jobs[j], last.get(j, {"status": "failed", "error": "not run: every server stopped answering"}))


# ------------------------------------------------------------------------------ report files

def read_rows(path: str) -> dict[tuple[str, str], dict]:
    if not os.path.exists(path):
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {(r["workflow"], r["image"]): r for r in csv.DictReader(f)}


def write_rows(path: str, rows: dict[tuple[str, str], dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for key in sorted(rows):
            w.writerow(rows[key])
    os.replace(tmp, path)


class Saved:
    """Images of the report folder read back on demand (a large set is never held in memory):
    ``saved[key]`` -> RGB uint8 (or a mask: uint8 grey levels, 255 = hole), ``key`` an image
    stem or (workflow, stem)."""

    def __init__(self, folder: str, mask: bool = False):
        self.folder, self.mask = folder, mask
        self.keys: set = set()

    def path(self, key) -> str:
        parts = key if isinstance(key, tuple) else (key,)
        return os.path.join(self.folder, *parts[:-1], parts[-1] + ".png")

    def put(self, key, arr: np.ndarray) -> None:
        os.makedirs(os.path.dirname(self.path(key)), exist_ok=True)
        if self.mask:
            arr = arr.astype(np.uint8) * 255 if arr.dtype == bool else arr.astype(np.uint8)
        Image.fromarray(arr).save(self.path(key))
        self.keys.add(key)

    def __contains__(self, key) -> bool:
        return key in self.keys

    def __getitem__(self, key) -> np.ndarray:
        with Image.open(self.path(key)) as im:
            return np.asarray(im.convert("L")) if self.mask else np.asarray(im.convert("RGB"))

    def get(self, key):
        return self[key] if key in self.keys else None


MISATO_DECIMALS = 3     # the official summary (cal_sum.py) rounds every number to 3 decimals


def _fmt(v: float, metric: str, protocol: str = "project") -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    if protocol == "misato":
        return f"{round(v, MISATO_DECIMALS):.{MISATO_DECIMALS}f}"
    return f"{v:.2f}" if metric in ("psnr", "grad", "seam", "unmasked_de2000") else f"{v:.4f}"


def summarise(rows: dict, workflows: list[Workflow], stems: list[str], columns: list[str]) -> list[dict]:
    """Per workflow: photos scored, failures, and (mean, low, high) per metric, over the
    photos of this run (rows of other photos an earlier run left in the CSV are ignored)."""
    out = []
    current = set(stems)
    for wf in workflows:
        mine = [r for (w, stem), r in rows.items() if w == wf.name and stem in current]
        ok = [r for r in mine if r["status"] == "ok"]
        entry = {"workflow": wf.name, "n": len(ok), "failed": len(mine) - len(ok), "metrics": {}}
        for m in columns:
            vals = [float(r[m]) for r in ok if r.get(m) not in (None, "")]
            entry["metrics"][m] = metrics.mean_interval(vals)
        out.append(entry)
    return out


def _cell(mean_lo_hi: tuple, metric: str, protocol: str = "project") -> str:
    m, lo, hi = mean_lo_hi
    if not math.isfinite(m):
        return "n/a"
    return f"{_fmt(m, metric, protocol)} [{_fmt(lo, metric, protocol)}, {_fmt(hi, metric, protocol)}]"


def _arrow(metric: str) -> str:
    return "↑" if metrics.HIGHER_IS_BETTER.get(metric, False) else "↓"


def write_summary(out_dir: str, summary: list[dict], columns: list[str], dataset: dict, notes: list[str],
                  header: list[str], protocol: str = "project") -> str:
    head = ["workflow", "images", *[f"{METRIC_LABELS.get(m, m)} {_arrow(m)}" for m in columns]]
    ds_cols = [c for c in ("FID", "U-IDS", "P-IDS", "CLIP") if any(c in d for d in dataset.values())]
    head += [f"{c} {'↓' if c == 'FID' else '↑'}" for c in ds_cols]
    lines = ["# Inpainting evaluation", ""] + [f"- {h}" for h in header] + [""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    html_rows = []
    for s in summary:
        cells = [s["workflow"], f"{s['n']}" + (f" ({s['failed']} failed)" if s["failed"] else "")]
        cells += [_cell(s["metrics"][m], m, protocol) for m in columns]
        cells += [_fmt(dataset.get(s["workflow"], {}).get(c, math.nan), c, protocol) if protocol == "misato"
                  else f"{dataset.get(s['workflow'], {}).get(c, math.nan):.4g}" for c in ds_cols]
        lines.append("| " + " | ".join(cells) + " |")
        html_rows.append(cells)
    lines += ["", "Mean [95 % interval] over images (Student's t). ↑ higher is better, ↓ lower is better."]
    lines += [f"- {n}" for n in notes]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(md)
    e = html.escape
    doc = ["<!doctype html><html><head><meta charset='utf-8'><title>Inpainting evaluation</title>",
           "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
           "td,th{border:1px solid #999;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style>",
           "</head><body><h1>Inpainting evaluation</h1><ul>", *[f"<li>{e(h)}</li>" for h in header], "</ul>",
           "<table><thead><tr>", *[f"<th>{e(h)}</th>" for h in head], "</tr></thead><tbody>"]
    for cells in html_rows:
        doc.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    doc += ["</tbody></table><p>Mean [95 % interval] over images (Student's t). ↑ higher is better, "
            "↓ lower is better.</p><ul>", *[f"<li>{e(n)}</li>" for n in notes], "</ul>",
            "<p><img src='contact_sheet.png' alt='contact sheet' style='max-width:100%'></p></body></html>"]
    with open(os.path.join(out_dir, "summary.html"), "w", encoding="utf-8") as f:
        f.write("\n".join(doc) + "\n")
    return md


def contact_sheet(path: str, stems: list[str], inputs: Saved, masks: Saved, results: Saved,
                  workflows: list[Workflow], thumb: int = 160, max_rows: int = 12) -> None:
    """Rows of original | mask over the original | each workflow's result."""
    cols = ["original", "mask", *[wf.name for wf in workflows]]
    stems = stems[:max_rows]
    label_h = 18
    sheet = Image.new("RGB", (len(cols) * (thumb + 4) + 4, label_h + len(stems) * (thumb + label_h + 4) + 4),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(cols):
        draw.text((4 + c * (thumb + 4), 3), name[:24], fill="black")
    for r, stem in enumerate(stems):
        y = label_h + r * (thumb + label_h + 4)
        draw.text((4, y + 2), stem[:40], fill="black")
        y += label_h
        img, m = inputs[stem], masks[stem]
        shown = img.astype(np.float32)
        m = m >= 128
        shown[m] = shown[m] * 0.35 + np.array([255, 0, 255], np.float32) * 0.65
        tiles = [img, shown.astype(np.uint8)]
        for wf in workflows:
            res = results.get((wf.name, stem))
            tiles.append(res if res is not None else np.full_like(img, 128))
        for c, tile in enumerate(tiles):
            t = Image.fromarray(tile)
            t.thumbnail((thumb, thumb), Image.LANCZOS)
            sheet.paste(t, (4 + c * (thumb + 4), y))
    sheet.save(path)


# ------------------------------------------------------------------------------ main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/evaluation.md for the metrics and the report.")
    p.add_argument("--workflow", action="append", required=True, metavar="FILE[#NODE]",
                   help="a saved workflow or API prompt (repeat to compare several)")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of photos (the ground truth)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--masks", metavar="DIR", help="folder of masks named like the images (white = hole)")
    g.add_argument("--mask-generator", action="store_true",
                   help="seeded masks of the MISATO families (object + irregular, hole 20-80%%)")
    p.add_argument("--seed", type=int, default=0, help="mask generator seed (default 0)")
    p.add_argument("--protocol", choices=("project", "misato"), default="project",
                   help="metric definitions: the project's (default), or the official MISATO evaluation's "
                        "(grey masks as given, soft Grad, IDS after PCA to the image size, CLIP score with "
                        "--clip-weights, 3-decimal summary)")
    p.add_argument("--size", type=int, default=None,
                   help="centre-crop and resize images to SIZE² (default 512, or 0 under --protocol misato; "
                        "0: keep, cropped to multiples of 8)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N images")
    p.add_argument("--out", default="eval-report", help="report folder (default eval-report)")
    p.add_argument("--server", action="append", default=[], metavar="URL",
                   help="URL of a running ComfyUI; repeat to spread the pairs over several (one per GPU or "
                        "machine); default: start a CPU one for the run")
    p.add_argument("--comfy-dir", help="ComfyUI tree to start a server from (scripts/host.sh passes its own)")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for the started server")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for one prompt")
    p.add_argument("--lpips-weights", help="LPIPS linear layers (the lpips package's weights/v0.1/alex.pth)")
    p.add_argument("--alexnet-weights", help="torchvision AlexNet ImageNet weights (alexnet-owt-7be5be79.pth)")
    p.add_argument("--inception-weights",
                   help="torchvision Inception v3 ImageNet weights (inception_v3_google-0cc3c7bd.pth), for FID and IDS")
    p.add_argument("--clip-weights", metavar="DIR",
                   help="a local Hugging Face CLIP model folder (config.json + model.safetensors; the official "
                        "evaluation uses openai/clip-vit-large-patch14), for the CLIP score of --protocol misato")
    p.add_argument("--ids-seed", type=int, default=0,
                   help="seed of the randomized PCA before the IDS SVM under --protocol misato (default 0)")
    p.add_argument("--sheet-rows", type=int, default=12, help="images on the contact sheet (default 12)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = 0 if args.protocol == "misato" else 512
    if args.clip_weights and args.protocol != "misato":
        p.error("--clip-weights: the CLIP score is part of --protocol misato only; add --protocol misato.")
    return args


def _progress(total: int, disabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if tqdm is None or disabled:
        class _Plain:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                print(f"[{self.n}/{total}]", file=sys.stderr)

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass
        return _Plain()
    return tqdm(total=total, unit="pair", dynamic_ncols=True, file=sys.stderr)


CLIP_SKIPPED = ("CLIP score not computed: it needs a CLIP image model, which is never downloaded; pass "
                "--clip-weights DIR (a local copy of openai/clip-vit-large-patch14: config.json + "
                "model.safetensors).")


def clip_note(clip_weights: str | None) -> str:
    """The report's line on the MISATO CLIP score: what it is, or why it was skipped."""
    if not clip_weights:
        return CLIP_SKIPPED
    return (f"CLIP: mean cosine similarity of the CLIP image embeddings ({os.path.basename(os.path.normpath(clip_weights))}) "
            "of each result and its original, both kept only inside the hole (mask == 255); the official "
            "script as published scores a product of means instead (docs/evaluation.md).")


def dataset_scores(learned, workflows, stems, inputs, masks, results, misato: bool, ids_seed: int,
                   notes: list[str]) -> dict:
    """Per workflow, the scores of its whole set of scored pairs: FID, U-IDS, P-IDS (with
    Inception weights) and, under the MISATO protocol, the CLIP score (with CLIP weights)."""
    dataset = {}
    if learned is not None and learned.has_inception:
        pca_dim = inputs[stems[0]].shape[0] if misato else None
        for wf in workflows:
            done = [s for s in stems if (wf.name, s) in results]
            if len(done) < 2:
                continue
            if pca_dim is not None and 2 * len(done) < pca_dim:
                notes.append(f"{wf.name}: U-IDS/P-IDS not computed: the MISATO protocol reduces the features to "
                             f"{pca_dim} dimensions first, which needs at least {(pca_dim + 1) // 2} scored pairs "
                             f"(here {len(done)}).")
                pasted = [metrics.paste(results[(wf.name, s)], inputs[s], masks[s]).numpy() for s in done]
                scores = learned.dataset_scores([inputs[s] for s in done], pasted, pca_dim=None)
                dataset[wf.name] = {"FID": scores["FID"]}
                continue
            pasted = [metrics.paste(results[(wf.name, s)], inputs[s], masks[s]).numpy() for s in done]
            dataset[wf.name] = learned.dataset_scores([inputs[s] for s in done], pasted, pca_dim=pca_dim,
                                                      seed=ids_seed)
        if misato and dataset:
            notes.append(f"IDS: features reduced by PCA to {pca_dim} dimensions (randomized solver, seed "
                         f"{ids_seed}; the official script's PCA is unseeded), then the squared-hinge "
                         "linear SVM solved to its optimum.")
    if misato and learned is not None and learned.has_clip:
        for wf in workflows:
            done = [s for s in stems if (wf.name, s) in results]
            if done:
                dataset.setdefault(wf.name, {})["CLIP"] = learned.clip_score(
                    [inputs[s] for s in done], [results[(wf.name, s)] for s in done], [masks[s] for s in done])
    return dataset


def run(args: argparse.Namespace) -> int:
    import torch

    # scoring takes a fraction of a second per pair (benchmarks/bench_metrics.py: 0.36 s on one
    # thread, 0.28 s on two, 512² on an idle 2-core CPU), negligible beside sampling; one
    # thread leaves the other cores to a server running on the same machine
    torch.set_num_threads(1)
    misato = args.protocol == "misato"
    out = os.path.abspath(args.out)
    for sub in ("inputs", "masks", "results"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    paths = list_images(args.images)
    if args.limit:
        paths = paths[:args.limit]

    learned = None
    notes = []
    if misato:
        notes.append("Protocol: MISATO (the official evaluation's definitions: masks as given, Grad blended by "
                     "the grey mask, IDS after PCA to the image size, CLIP score of the hole, every number rounded "
                     "to 3 decimals).")
    if args.lpips_weights or args.alexnet_weights or args.inception_weights or args.clip_weights:
        from evaluate_learned import LearnedMetrics
        learned = LearnedMetrics(lpips=args.lpips_weights, alexnet=args.alexnet_weights,
                                 inception=args.inception_weights, clip=args.clip_weights)
        notes += learned.notes
    else:
        notes.append("LPIPS, FID and U-IDS/P-IDS not computed: they need network weights, which are never "
                     "downloaded; pass --lpips-weights + --alexnet-weights and/or --inception-weights.")
    if misato:
        notes.append(clip_note(args.clip_weights))

    # inputs as scored (saved, so a person can look and a re-run reuses them)
    stems, pairs = [], {}
    inputs, masks = Saved(os.path.join(out, "inputs")), Saved(os.path.join(out, "masks"), mask=True)
    results = Saved(os.path.join(out, "results"))
    gen = None
    for i, path in enumerate(paths):
        stem = os.path.splitext(os.path.basename(path))[0]
        try:
            img = load_image(path, args.size)
        except EvalError as e:
            raise EvalError(f"{path}: {e}") from None
        if args.masks:
            m = load_mask(args.masks, stem, args.size, img.shape[:2], grey=misato)
        else:
            if gen is None or (gen.height, gen.width) != img.shape[:2]:
                gen = MaskGenerator(img.shape[:2], seed=args.seed, shares=EVALUATION_SHARES, hole_ratio=(0.2, 0.8))
            m = gen.numpy(i)
        stems.append(stem)
        inputs.put(stem, img)
        masks.put(stem, m)
        # identifies what LoadImage gets (the photo, the mask as alpha) for resuming
        pairs[stem] = hashlib.sha256(png_bytes(img, masks[stem] / 255.0)).hexdigest()[:12]
    mask_source = "folder " + os.path.abspath(args.masks) if args.masks else f"generator seed {args.seed}"
    if misato:
        mask_source += "; protocol misato"
    sides = {inputs[s].shape[:2] for s in stems} if misato else set()
    if misato and (len(sides) != 1 or len({*next(iter(sides))}) != 1):
        raise EvalError("--protocol misato scores square images of one size (MISATO's 512 and 1024 sets, each "
                        f"run on its own); these are {sorted(sides)}: give one set, or --size N.")

    local = None
    if args.server:
        apis = []
        for url in args.server:
            api = ComfyAPI(url, client_name="asuka-eval")
            if api.alive():
                apis.append(api)
            else:
                print(f"--server {url}: no ComfyUI answers there; not used", file=sys.stderr)
        if not apis:
            raise EvalError(f"--server {', '.join(args.server)}: no ComfyUI answers there.")
    else:
        local = LocalServer(args.comfy_dir, os.path.join(out, "server.log"), args.server_arg)
        apis = [ComfyAPI(local.url, client_name="asuka-eval")]
    try:
        object_info = apis[0].object_info()
        workflows: list[Workflow] = []
        for spec in args.workflow:
            workflows.append(Workflow(spec, object_info, {w.name for w in workflows}))

        csv_path = os.path.join(out, "per_image.csv")
        rows = read_rows(csv_path)
        todo = []
        for wf in workflows:
            os.makedirs(os.path.join(out, "results", wf.name), exist_ok=True)
        # image by image, so workflows that share their first nodes reuse the server's cache
        for stem in stems:
            for wf in workflows:
                row = rows.get((wf.name, stem))
                res_path = results.path((wf.name, stem))
                if (row and row["status"] == "ok" and row["workflow_sha"] == wf.sha
                        and row.get("pair_sha") == pairs[stem] and row["mask_source"] == mask_source
                        and os.path.exists(res_path)):
                    results.keys.add((wf.name, stem))
                    if learned is not None and learned.has_lpips and not row.get("lpips"):
                        # asked for now, not when the pair ran: scored from the saved files
                        img, m, res = inputs[stem], masks[stem], results[(wf.name, stem)]
                        row["lpips"] = f"{learned.lpips(metrics.paste(res, img, m).numpy(), img):.6f}"
                else:
                    todo.append((wf, stem))
        skipped = len(workflows) * len(stems) - len(todo)
        if skipped:
            print(f"resuming: {skipped} pairs already scored in {csv_path}", file=sys.stderr)
            write_rows(csv_path, rows)

        def attempt(api: ComfyAPI, job) -> dict:
            """Run one pair on one server and score it: the report row."""
            wf, stem = job
            img, m = inputs[stem], masks[stem]
            pair_sha = pairs[stem]
            row = {"workflow": wf.name, "image": stem, "workflow_sha": wf.sha, "pair_sha": pair_sha,
                   "mask_source": mask_source}
            t0 = time.time()
            try:
                upload = api.upload_bytes(png_bytes(img, m / 255.0), f"{stem}-{pair_sha}.png", subfolder="asuka-eval")
                token = hashlib.sha256(f"{time.time()}{wf.name}{stem}{api.base_url}".encode()).hexdigest()[:8]
                res = api.run(wf.for_pair(upload, f"asuka-eval/{wf.name}/{stem}-{token}"), timeout=args.timeout)
                images = res.outputs.get(wf.output, {}).get("images", []) if res.ok else []
                data = api.view(images[0]) if images else None
            except PromptTimeout:
                row.update(status="failed", seconds=f"{time.time() - t0:.2f}",
                           error=f"no result after --timeout {args.timeout:.0f} s on {api.base_url}")
                return row
            except (requests.RequestException, AssertionError) as e:
                if not api.alive():
                    raise ServerDown(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
                row.update(status="failed", seconds=f"{time.time() - t0:.2f}",
                           error=f"{api.base_url}: {e}".replace("\n", " ")[:500])
                return row
            row["seconds"] = f"{time.time() - t0:.2f}"
            if data is None:
                row["status"] = "failed"
                row["error"] = (res.message or res.status if not res.ok else
                                f"node {wf.output} saved no image").replace("\n", " ")[:500]
                return row
            out_img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            row["resized"] = ""
            if out_img.shape != img.shape:
                row["resized"] = f"{out_img.shape[1]}x{out_img.shape[0]}"
                out_img = np.asarray(Image.fromarray(out_img).resize((img.shape[1], img.shape[0]), Image.LANCZOS))
            scores = metrics.score(out_img, img, m)
            if misato:
                scores["grad"] = metrics.grad(out_img, img, m, soft=True)
            if learned is not None and learned.has_lpips:
                scores["lpips"] = learned.lpips(metrics.paste(out_img, img, m).numpy(), img)
            row.update({k: f"{v:.6f}" for k, v in scores.items()})
            row["status"] = "ok"
            row["error"] = ""
            row["_image"] = out_img
            return row

        bar = _progress(len(todo), args.no_progress)

        def record(job, row: dict) -> None:
            wf, stem = job
            out_img = row.pop("_image", None)
            if out_img is not None:
                results.put((wf.name, stem), out_img)
            rows[(wf.name, stem)] = row
            write_rows(csv_path, rows)
            if row["status"] != "ok":
                bar.set_postfix_str(f"{wf.name}/{stem}: failed")
            bar.update(1)

        if len(apis) > 1:
            print(f"spreading {len(todo)} pairs over {len(apis)} servers", file=sys.stderr)
        dispatch(todo, apis, attempt, record)
        bar.close()
    finally:
        if local is not None:
            local.close()

    columns = list(metrics.METRICS) + (["lpips"] if learned is not None and learned.has_lpips else [])
    dataset = dataset_scores(learned, workflows, stems, inputs, masks, results, misato, args.ids_seed, notes)
    header = [f"images: {os.path.abspath(args.images)} ({len(stems)}, {args.size or 'native'} px)",
              f"masks: {mask_source}",
              "workflows: " + ", ".join(f"{w.name} = {w.path} (output node {w.output})" for w in workflows),
              f"written {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"]
    summary = summarise(rows, workflows, stems, columns)
    md = write_summary(out, summary, columns, dataset, notes, header, protocol=args.protocol)
    contact_sheet(os.path.join(out, "contact_sheet.png"), stems, inputs, masks, results, workflows,
                  max_rows=args.sheet_rows)
    print(md)
    print(f"report: {out}", file=sys.stderr)
    failed = sum(s["failed"] for s in summary)
    return 1 if failed else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (EvalError, InputError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
