"""Draws the example workflows' thumbnails (``example_workflows/<title>.jpg``): the bundled
picture with its hole, and the graph's steps as a labelled diagram, large enough to read in
ComfyUI's template browser.

    scripts/host.sh python scripts/thumbnails.py
"""

from __future__ import annotations

import os
import sys

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workflows  # noqa: E402

INPUT = os.path.join(workflows.WORKFLOW_DIR, "input")
SIZE = (768, 432)
HOLE = (230, 40, 160)

# The steps of each graph, in plain words (the node that does it after the dash).
STEPS = {
    "asuka_flux_fill": ("Remove an object, fill to match", workflows.ASUKA_IMAGE, [
        "your picture + painted hole", "MAE prior: what the rest suggests", "FLUX.1-Fill fills the hole",
        "ASUKA decoder: no colour seams", "result"]),
    "hd_painter_sd15": ("Paint a prompt into a hole", workflows.HD_PAINTER_IMAGE, [
        "your picture + painted hole", "prompt: \"" + workflows.HD_PAINTER_PROMPT + "\"",
        "PAIntA: prompt stays in the hole", "RASG sampler: follows the prompt", "result"]),
    "hd_painter_2k": ("HD-Painter at 2048 px", workflows.HD_PAINTER_IMAGE_2K, [
        "2048 px picture + painted hole", "inpaint at 512 px (SD1.5)", "x4 upscaler, known pixels kept",
        "Poisson blend into the original", "result at 2048 px"]),
    "asuka_sd15_inpaint": ("ASUKA on SD1.5", workflows.ASUKA_IMAGE, [
        "your picture + painted hole", "MAE prior", "aligner you trained (none is published)",
        "SD1.5 inpainting sampler", "masked decoder: no colour seams"]),
    "asuka_sd15_train_aligner": ("Train an SD1.5 aligner", workflows.ASUKA_IMAGE, [
        "a folder of your photos", "frozen SD1.5 inpainting model + MAE", "Train ASUKA Aligner (GPU, hours)",
        "aligner saved to models/asuka", "then: ASUKA on SD1.5"]),
    "asuka_sd15_train_decoder": ("Train an SD1.5 masked decoder", workflows.ASUKA_IMAGE, [
        "a folder of your photos", "colour + latent augmentation", "Train Masked Decoder (GPU, hours)",
        "decoder saved to models/asuka", "then: ASUKA on SD1.5"]),
}


def _picture(name: str, side: int) -> Image.Image:
    im = Image.open(os.path.join(INPUT, name)).convert("RGBA")
    im = im.resize((side, side), Image.LANCZOS)
    hole = Image.new("RGBA", im.size, HOLE + (255,))
    return Image.alpha_composite(hole, im).convert("RGB")


def draw(name: str) -> Image.Image:
    title, picture, steps = STEPS[name]
    img = Image.new("RGB", SIZE, (32, 34, 38))
    d = ImageDraw.Draw(img)
    big, small = ImageFont.load_default(size=40), ImageFont.load_default(size=24)
    d.text((24, 16), title, font=big, fill=(240, 240, 240))
    side = 300
    img.paste(_picture(picture, side), (20, 80))
    d.text((20, SIZE[1] - 14), "pink = the hole", font=ImageFont.load_default(size=20), fill=(220, 220, 220),
           anchor="ls")
    x0, x1 = 20 + side + 20, SIZE[0] - 14
    box_h, gap = 50, 18
    y = 80 + (side - len(steps) * box_h - (len(steps) - 1) * gap) // 2
    for i, step in enumerate(steps):
        d.rounded_rectangle((x0, y, x1, y + box_h), radius=10, fill=(58, 62, 70), outline=(120, 170, 230), width=2)
        d.text(((x0 + x1) // 2, y + box_h // 2), step, font=small, fill=(240, 240, 240), anchor="mm")
        if i < len(steps) - 1:
            cx = (x0 + x1) // 2
            d.line((cx, y + box_h, cx, y + box_h + gap - 4), fill=(120, 170, 230), width=3)
            d.polygon([(cx - 7, y + box_h + gap - 9), (cx + 7, y + box_h + gap - 9), (cx, y + box_h + gap)],
                      fill=(120, 170, 230))
        y += box_h + gap
    return img


def main() -> None:
    for name in workflows.WORKFLOWS:
        if name not in STEPS:
            print("no diagram for", name, "(add it to STEPS)")
            continue
        target = workflows.path(name, ".jpg")
        draw(name).save(target, quality=88)
        print("wrote", os.path.relpath(target, workflows.REPO), os.path.getsize(target) // 1024, "KB")


if __name__ == "__main__":
    main()
