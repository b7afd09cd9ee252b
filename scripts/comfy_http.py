"""A small HTTP client for a running ComfyUI server, shared by the scripts (evaluation) and
the host tests (``tests/host/comfy_client.py`` builds on it).

Upload an input file, queue an API-format prompt, wait for its history entry, read an
output image back over ``/view`` (so the server may run anywhere), interrupt.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests
from PIL import Image


def png_bytes(image: np.ndarray, mask: np.ndarray | None = None, mode: str | None = None) -> bytes:
    """``image`` (HxWx3 or HxW uint8) as PNG bytes. ``mask`` (HxW, 1 = area to inpaint, 0..1)
    goes into the alpha channel, where ComfyUI's LoadImage reads it (``mask = 1 - alpha``).
    ``mode`` forces a PIL mode ("L", "RGBA", ...)."""
    arr = np.asarray(image)
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
    return buf.getvalue()


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


class ComfyAPI:
    def __init__(self, base_url: str, client_name: str = "asuka"):
        self.base_url = base_url.rstrip("/")
        self.client_id = f"{client_name}-{uuid.uuid4().hex[:8]}"
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
    def upload_bytes(self, data: bytes, name: str, subfolder: str = "") -> str:
        """Upload a file to the input folder; returns the name to give LoadImage."""
        form = {"overwrite": "true", "type": "input"}
        if subfolder:
            form["subfolder"] = subfolder
        r = self.session.post(self.base_url + "/upload/image", files={"image": (name, data, "image/png")},
                              data=form, timeout=60)
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

    def timeout_detail(self) -> str:
        """Extra text for a timeout message (the tests add the server log)."""
        return ""

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
                                    f"{self.timeout_detail()}")
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
    def view(self, image: dict) -> bytes:
        """The bytes of one entry of a node's ``images`` output (``filename``, ``subfolder``,
        ``type``), read over ``/view``."""
        r = self.get("/view", params={"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                      "type": image.get("type", "output")})
        r.raise_for_status()
        return r.content
