"""HD-Painter through a real ComfyUI server: the example workflow runs (random-weight SD1.5
inpainting checkpoint, 256x256, 2 steps), PAIntA and RASG change the result, /interrupt
stops a RASG run within a step, and bad inputs end in clear errors while the server keeps
running."""

from __future__ import annotations

import json
import os
import re
import sys
import time

import numpy as np
import pytest

from tests.host.comfy_client import box_mask, make_picture, unique

pytestmark = pytest.mark.host

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import workflows  # noqa: E402  (scripts/workflows.py)

SIZE = 256
NAME = "hd_painter_sd15"


@pytest.fixture(scope="module")
def inputs(host_server):
    c = host_server.client
    pic = make_picture(SIZE, seed=1101)
    return {
        "image": c.upload_image(pic, box_mask(SIZE), name="hdp-image.png"),
        "empty": c.upload_image(pic, np.zeros((SIZE, SIZE), np.float32), name="hdp-empty.png"),
    }


def example_prompt(host, comfy, image: str, *, steps: int = 2, seed: int = 1) -> tuple[dict, dict]:
    """The committed example as the frontend queues it, with the test checkpoint, image and
    a short schedule. Returns (prompt, inputs by class type)."""
    with open(workflows.path(NAME)) as f:
        prompt = workflows.to_api_prompt(json.load(f), comfy.object_info())
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    by_type["CheckpointLoaderSimple"]["ckpt_name"] = host.checkpoint
    by_type["LoadImage"]["image"] = image
    by_type["BasicScheduler"]["steps"] = steps
    by_type["SamplerCustom"]["noise_seed"] = seed
    by_type["SaveImage"]["filename_prefix"] = unique("hdp")
    return prompt, by_type


def node_id(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def test_example_runs_and_painta_rasg_change_the_fill(host, comfy, inputs):
    prompt, by_type = example_prompt(host, comfy, inputs["image"])
    assert by_type["HDPainter_RASGSampler"]["eta"] > 0 and by_type["HDPainter_PAIntA"]["end_timestep"] < 1000
    result = comfy.run(prompt, timeout=900)
    assert result.ok, result.describe()
    out = comfy.image(result, node_id(prompt, "SaveImage"))
    assert out.shape == (SIZE, SIZE, 3)
    print(f"\n[host] HD-Painter example, 2 steps at {SIZE}x{SIZE}: {result.seconds:.1f}s")

    # Same graph with PAIntA never active and RASG at eta 0 (plain DDIM): another fill.
    plain, by_type = example_prompt(host, comfy, inputs["image"])
    by_type["HDPainter_PAIntA"]["end_timestep"] = 1000
    by_type["HDPainter_RASGSampler"]["eta"] = 0.0
    other = comfy.run(plain, timeout=900)
    assert other.ok, other.describe()
    base = comfy.image(other, node_id(plain, "SaveImage"))
    hole = box_mask(SIZE) > 0
    diff = np.abs(out.astype(int) - base.astype(int))
    print(f"[host] HD-Painter off (PAIntA end 1000, eta 0): {other.seconds:.1f}s; mean |difference| in the "
          f"hole {diff[hole].mean():.3f}, outside {diff[~hole].mean():.3f} (8-bit levels)")
    # With random weights and the official (weak) RASG scale the change is small, but it must exist.
    assert diff[hole].max() > 0, "PAIntA + RASG changed nothing"


def test_interrupt_stops_rasg_within_a_step(host, comfy, inputs):
    prompt, _ = example_prompt(host, comfy, inputs["image"], steps=60, seed=77)
    pid, body = comfy.queue(prompt)
    assert pid, body
    t0 = time.time()
    while not any(item[1] == pid for item in comfy.queue_size().get("queue_running", [])):
        assert time.time() - t0 < 120, "the prompt never started"
        time.sleep(0.1)
    time.sleep(8.0)            # the checkpoint is cached from the previous test: sampling is under way
    assert pid not in comfy.get_json(f"/history/{pid}"), "60 RASG steps finished in 8 s: the test means nothing"
    t_int = time.time()
    comfy.interrupt()
    res = comfy.wait(pid, timeout=120)
    stopped_after = time.time() - t_int
    print(f"\n[host] RASG interrupt: stopped {stopped_after:.1f}s after /interrupt")
    assert res.status == "error" and res.interrupted, res.describe()
    # one RASG step (forward + backward, full-size SD1.5 at 256x256, 2 CPU cores) takes a few seconds
    assert stopped_after < 10, f"took {stopped_after:.1f}s to stop after /interrupt"


def _assert_refused(res, pattern: str, node_type: str):
    assert res.status in ("error", "invalid") and not res.interrupted, res.describe()
    assert re.search(pattern, res.message, re.I | re.S), res.message
    assert "Traceback" not in res.message, res.message
    if res.status == "error":
        assert res.error_node[1] == node_type, res.describe()


def test_bad_inputs_give_clear_errors_and_the_server_recovers(host, comfy, inputs):
    # a prompt without words
    prompt, by_type = example_prompt(host, comfy, inputs["image"])
    by_type["HDPainter_PromptTokens"]["text"] = " , ,  "
    _assert_refused(comfy.run(prompt, timeout=600), r"at least one word", "HDPainter_PromptTokens")

    # no hole in the inpainting mask: RASG cannot relate the prompt to anything
    prompt, _ = example_prompt(host, comfy, inputs["empty"])
    _assert_refused(comfy.run(prompt, timeout=600), r"no hole.*mask", "SamplerCustom")

    # an empty MASK given to PAIntA
    prompt, _ = example_prompt(host, comfy, inputs["image"])
    prompt["hdp_mask"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE}}
    prompt[node_id(prompt, "HDPainter_PAIntA")]["inputs"]["mask"] = ["hdp_mask", 0]
    _assert_refused(comfy.run(prompt, timeout=600), r"no hole", "HDPainter_PAIntA")

    # the server still works
    prompt, _ = example_prompt(host, comfy, inputs["image"], steps=1)
    res = comfy.run(prompt, timeout=600)
    assert res.ok, res.describe()


# ---------------------------------------------------------------------------- ComfyUI's model cache

def plain_prompt(host, comfy, image: str, *, lora: str | None = None, seed: int = 5) -> dict:
    """The example graph without HD-Painter: the checkpoint's MODEL (optionally through
    the core LoraLoaderModelOnly) and Euler in SamplerCustom."""
    prompt, _ = example_prompt(host, comfy, image, seed=seed)
    painta, rasg = node_id(prompt, "HDPainter_PAIntA"), node_id(prompt, "HDPainter_RASGSampler")
    model = prompt[painta]["inputs"]["model"]
    if lora:
        prompt["lora"] = {"class_type": "LoraLoaderModelOnly",
                          "inputs": {"model": model, "lora_name": lora, "strength_model": 1.0}}
        model = ["lora", 0]
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if value == [painta, 0]:
                node["inputs"][key] = model
    prompt["euler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    prompt[node_id(prompt, "SamplerCustom")]["inputs"]["sampler"] = ["euler", 0]
    del prompt[painta], prompt[rasg]
    return prompt


def with_lora(prompt: dict, lora: str) -> dict:
    """The HD-Painter example with the LoRA between the checkpoint and PAIntA."""
    painta = node_id(prompt, "HDPainter_PAIntA")
    prompt["lora"] = {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": prompt[painta]["inputs"]["model"], "lora_name": lora,
                                 "strength_model": 1.0}}
    prompt[painta]["inputs"]["model"] = ["lora", 0]
    return prompt


@pytest.fixture(scope="module")
def test_lora(host_server, comfy_dir, sd15_checkpoint):
    """A random LoRA (kohya names) on every cross-attention k/v projection of the test
    checkpoint, in the host's models/loras folder."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(21)
    lora = {}
    with safe_open(sd15_checkpoint, "pt") as f:
        for key in f.keys():
            if key.startswith("model.diffusion_model.") and key.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")):
                out_f, in_f = f.get_slice(key).get_shape()
                name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
                lora[f"{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.05
                lora[f"{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.05
                lora[f"{name}.alpha"] = torch.tensor(4.0)
    assert len(lora) == 3 * 2 * 16
    folder = os.path.join(comfy_dir, "models", "loras")
    os.makedirs(folder, exist_ok=True)
    name = "asuka-host-test-lora.safetensors"
    save_file(lora, os.path.join(folder, name))
    return name


def test_a_plain_prompt_gives_the_same_pixels_before_and_after_rasg_and_with_a_lora(host, comfy, inputs, test_lora):
    """ComfyUI keeps the loaded checkpoint for later prompts: RASG (a backward pass through
    that UNet) must leave it exactly as it was, with and without a LoRA."""
    runs = {}

    def run(tag, prompt):
        result = comfy.run(prompt, timeout=900)
        assert result.ok, f"{tag}: {result.describe()}"
        runs[tag] = result
        return comfy.image(result, node_id(prompt, "SaveImage"))

    before = run("plain before", plain_prompt(host, comfy, inputs["image"]))
    lora_before = run("lora before", plain_prompt(host, comfy, inputs["image"], lora=test_lora))
    run("rasg", example_prompt(host, comfy, inputs["image"])[0])
    lora_rasg_prompt = with_lora(example_prompt(host, comfy, inputs["image"])[0], test_lora)
    run("lora + rasg", lora_rasg_prompt)
    after = run("plain after", plain_prompt(host, comfy, inputs["image"]))
    lora_after = run("lora after", plain_prompt(host, comfy, inputs["image"], lora=test_lora))
    for tag in ("plain after", "lora after"):
        cached = runs[tag].cached_nodes
        assert node_id(plain_prompt(host, comfy, inputs["image"]), "SamplerCustom") not in cached, \
            f"{tag}: the sampler did not run again"
        assert node_id(plain_prompt(host, comfy, inputs["image"]), "CheckpointLoaderSimple") in cached, \
            f"{tag}: the checkpoint was loaded again, so the cached model was not tested"
    assert np.array_equal(before, after), "a plain prompt gives other pixels after RASG"
    assert np.array_equal(lora_before, lora_after), "a LoRA prompt gives other pixels after LoRA + RASG"
    assert not np.array_equal(before, lora_before), "the LoRA had no effect"
    print("\n[host] plain / LoRA prompts identical before and after RASG and LoRA + RASG; "
          + ", ".join(f"{k} {r.seconds:.1f}s" for k, r in runs.items()))
