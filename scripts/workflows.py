"""The pack's example workflows: one compact description each, turned into the
frontend's workflow format (``example_workflows/*.json``) and into API prompts.

    scripts/host.sh python scripts/workflows.py --server http://127.0.0.1:8188

writes ``example_workflows/<name>.json`` from the live server's ``/object_info`` (so input
names, widget order and types always match the nodes). The host tests regenerate them the
same way, compare with the committed files, and run them as API prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW_DIR = os.path.join(REPO, "example_workflows")

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

NOTE = (
    "ASUKA inpainting for SD1.5 (comfyui-asuka)\n\n"
    "Model files, all in ComfyUI/models/asuka:\n"
    "- mae_300.pth: the MAE prior, from the official ASUKA-FLUX.1-Fill release "
    "(Hugging Face yikaiwang/ASUKA-FLUX.1-Fill).\n"
    "- an SD1.5 aligner (.safetensors marked 'sd15'): NOT published by the ASUKA authors; it must "
    "be trained (see the pack's README). The released FLUX aligners do not work here.\n"
    "- a masked decoder: the public Asymmetric VQGAN decoders for SD1.5 "
    "(cross-attention/asymmetric-autoencoder-kl-x-1-5 or -x-2). No 4-channel ASUKA decoder is "
    "published.\n\n"
    "Checkpoint: your SD1.5 inpainting model (9-channel UNet). Sampler: cfg 1.0 (ASUKA runs "
    "without classifier-free guidance)."
)


@dataclass
class Node:
    type: str
    widgets: dict = field(default_factory=dict)   # widget name -> value
    links: dict = field(default_factory=dict)     # input name -> (node key, output slot)
    pos: tuple = (0, 0)
    title: str | None = None


def sd15_inpaint_graph() -> dict[str, Node]:
    """LoadImage -> MAE prior -> aligner conditioning -> InpaintModelConditioning -> KSampler
    -> masked decode -> SaveImage."""
    return {
        "ckpt": Node("CheckpointLoaderSimple", {"ckpt_name": "sd-v1-5-inpainting.safetensors"}, pos=(0, 0)),
        "load": Node("LoadImage", {"image": "example.png"}, pos=(0, 160)),
        "mae_loader": Node("ASUKA_MAELoader", {"mae_name": "mae_300.pth"}, pos=(400, 0)),
        "prior": Node("ASUKA_MAEPrior", links={"mae": ("mae_loader", 0), "image": ("load", 0),
                                               "mask": ("load", 1)}, pos=(800, 0)),
        "aligner_loader": Node("ASUKA_AlignerLoader", {"aligner_name": "asuka_sd15_aligner.safetensors"},
                               pos=(400, 140)),
        "cond": Node("ASUKA_AlignerConditioning", {"strength": 1.0},
                     links={"aligner": ("aligner_loader", 0), "prior": ("prior", 0)}, pos=(1200, 0)),
        "inpaint": Node("InpaintModelConditioning", {"noise_mask": True},
                        links={"positive": ("cond", 0), "negative": ("cond", 1), "vae": ("ckpt", 2),
                               "pixels": ("load", 0), "mask": ("load", 1)}, pos=(1200, 180)),
        "sampler": Node("KSampler", {"seed": 42, "steps": 30, "cfg": 1.0, "sampler_name": "euler",
                                     "scheduler": "normal", "denoise": 1.0},
                        links={"model": ("ckpt", 0), "positive": ("inpaint", 0), "negative": ("inpaint", 1),
                               "latent_image": ("inpaint", 2)}, pos=(1600, 0)),
        "decoder_loader": Node("ASUKA_DecoderLoader",
                               {"decoder_name": "asymmetric-autoencoder-kl-x-1-5.safetensors"}, pos=(2000, 0)),
        "decode": Node("ASUKA_MaskedDecode", {"composite": True, "tile_size": 0, "tile_overlap": 64},
                       links={"decoder": ("decoder_loader", 0), "samples": ("sampler", 0), "image": ("load", 0),
                              "mask": ("load", 1)}, pos=(2000, 140)),
        "save": Node("SaveImage", {"filename_prefix": "asuka"}, links={"images": ("decode", 0)}, pos=(2400, 0)),
        "preview": Node("PreviewImage", links={"images": ("prior", 1)}, pos=(800, 200),
                        title="MAE reconstruction (what the prior sees)"),
    }


WORKFLOWS = {"asuka_sd15_inpaint": (sd15_inpaint_graph, NOTE)}


# --- aligner training (docs/training.md) ----------------------------------------------

TRAIN_NOTE = (
    "Train an SD1.5 ASUKA aligner inside ComfyUI (comfyui-asuka)\n\n"
    "No SD1.5 aligner is published, so this graph makes one: 'Train ASUKA Aligner' trains for the "
    "given steps on a folder of your photos (in ComfyUI/input/asuka_photos, or an absolute path), "
    "with your SD1.5 inpainting checkpoint frozen, then the rest of the graph inpaints the loaded "
    "picture with the freshly trained aligner.\n\n"
    "It blocks the queue while it trains; Cancel stops it and keeps a resumable state (switch "
    "'resume' on to continue). The aligner is saved to models/asuka/<run_name>.safetensors, the "
    "run (loss curve, sample images, state) to output/asuka_training/<run_name>/.\n\n"
    "A useful aligner needs a GPU, hundreds to thousands of photos and many thousand steps: see "
    "docs/training.md. For long runs the command line (scripts/host.sh train-aligner) is easier."
)


def sd15_train_aligner_graph() -> dict[str, Node]:
    """Checkpoint + MAE -> ASUKA_TrainAligner -> (its aligner) the SD1.5 ASUKA graph; loss curve preview."""
    g = sd15_inpaint_graph()
    del g["aligner_loader"]
    g["train"] = Node("ASUKA_TrainAligner", {"images_folder": "asuka_photos", "steps": 1000},
                      links={"model": ("ckpt", 0), "vae": ("ckpt", 2), "mae": ("mae_loader", 0)}, pos=(800, 380))
    g["cond"].links["aligner"] = ("train", 0)
    g["curve"] = Node("PreviewImage", links={"images": ("train", 1)}, pos=(1200, 380), title="Loss curve")
    return g


WORKFLOWS["asuka_sd15_train_aligner"] = (sd15_train_aligner_graph, TRAIN_NOTE)


# --------------------------------------------------------------------------------------


def _inputs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            out.append((name, info["input"][section][name]))
    return out


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _widget_values(info: dict, node: Node) -> list:
    """Widget values in the order the frontend stores them (seed-like inputs carry an extra
    'control after generate' value, image uploads an extra 'image' value)."""
    values = []
    for name, spec in _inputs(info):
        if not _is_widget(spec) or name in node.links:
            continue
        opts = spec[1] if len(spec) > 1 else {}
        if name in node.widgets:
            value = node.widgets[name]
        elif "default" in opts:
            value = opts["default"]
        elif isinstance(spec[0], list) and spec[0]:
            value = spec[0][0]
        else:
            value = (opts.get("options") or [None])[0]
        values.append(value)
        if opts.get("control_after_generate"):
            values.append("fixed")
        if opts.get("image_upload"):
            values.append("image")
    return values


def to_ui_workflow(graph: dict[str, Node], object_info: dict, note: str | None = None) -> dict:
    ids = {key: i + 1 for i, key in enumerate(graph)}
    links, ui_nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    for key, node in graph.items():
        info = object_info[node.type]
        for name, (src, slot) in node.links.items():
            link_id = len(links) + 1
            src_type = object_info[graph[src].type]["output"][slot]
            links.append([link_id, ids[src], slot, ids[key], None, src_type, name])
            out_links.setdefault((ids[src], slot), []).append(link_id)
    for order, (key, node) in enumerate(graph.items()):
        info = object_info[node.type]
        socket_inputs = []
        for name, spec in _inputs(info):
            if _is_widget(spec) and name not in node.links:
                continue
            link = next((lk for lk in links if lk[3] == ids[key] and lk[6] == name), None)
            if link is not None:
                link[4] = len(socket_inputs)
            kind = spec[0] if isinstance(spec[0], str) else "COMBO"
            socket_inputs.append({"name": name, "type": kind, "link": link[0] if link else None})
        outputs = [
            {"name": name, "type": kind, "links": out_links.get((ids[key], slot), []), "slot_index": slot}
            for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))
        ]
        ui = {
            "id": ids[key], "type": node.type, "pos": list(node.pos), "size": [320, 120],
            "flags": {}, "order": order, "mode": 0, "inputs": socket_inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node.type},
            "widgets_values": _widget_values(info, node),
        }
        if node.title:
            ui["title"] = node.title
        ui_nodes.append(ui)
    if note:
        nid = len(ui_nodes) + 1
        ui_nodes.append({"id": nid, "type": "Note", "pos": [0, 560], "size": [760, 260], "flags": {},
                         "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
                         "properties": {}, "widgets_values": [note]})
    return {
        "last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes,
        "links": [lk[:6] for lk in links], "groups": [], "config": {}, "extra": {}, "version": 0.4,
    }


def to_api_prompt(workflow: dict, object_info: dict) -> dict:
    """The frontend's 'Queue' conversion, for nodes the server knows (Notes are skipped)."""
    links = {lk[0]: lk for lk in workflow["links"]}
    prompt = {}
    for ui in workflow["nodes"]:
        info = object_info.get(ui["type"])
        if info is None:
            continue
        inputs = {}
        linked = {inp["name"]: links[inp["link"]] for inp in ui["inputs"] if inp.get("link") is not None}
        values = list(ui.get("widgets_values", []))
        for name, spec in _inputs(info):
            if name in linked:
                lk = linked[name]
                inputs[name] = [str(lk[1]), lk[2]]
            elif _is_widget(spec):
                opts = spec[1] if len(spec) > 1 else {}
                inputs[name] = values.pop(0)
                if opts.get("control_after_generate") or opts.get("image_upload"):
                    values.pop(0)
        prompt[str(ui["id"])] = {"class_type": ui["type"], "inputs": inputs}
    return prompt


def fetch_object_info(server: str) -> dict:
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=60) as r:
        return json.load(r)


def render_all(object_info: dict) -> dict[str, dict]:
    return {name: to_ui_workflow(make(), object_info, note) for name, (make, note) in WORKFLOWS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    args = parser.parse_args()
    for name, workflow in render_all(fetch_object_info(args.server)).items():
        path = os.path.join(WORKFLOW_DIR, name + ".json")
        with open(path, "w") as f:
            json.dump(workflow, f, indent=1)
            f.write("\n")
        print("wrote", os.path.relpath(path, REPO))


if __name__ == "__main__":
    main()
