"""Makes the example workflows' input pictures (``example_workflows/input/``): one real photo
with the hole painted into its alpha channel (WebP with alpha), as ComfyUI's LoadImage reads it (mask = 1 - alpha).

The photo is "aitzgorri" by Aitzol Berasategi (2018, CC-BY-4.0), from Debian's
``lomiri-wallpapers-16.04`` package (/usr/share/backgrounds/aitzgorri_by_Aitzol_Berasategi.jpg):

    apt-get download lomiri-wallpapers-16.04 && dpkg-deb -x lomiri-wallpapers-16.04_*.deb deb
    scripts/host.sh python scripts/example_images.py deb/usr/share/backgrounds/aitzgorri_by_Aitzol_Berasategi.jpg

The pack copies these files into ComfyUI's input folder at start-up (never over a file of the
same name), so the templates run as shipped.
"""

from __future__ import annotations

import argparse
import os

from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "example_workflows", "input")
CROP = (1040, 4, 3088, 2052)   # 2048 x 2048: the meadow, the fir tree, the mountains

# Brush strokes in 512 px coordinates: (points, brush width); a stroke that ends where it
# started is an outline and is filled.
REMOVE_TREE = [([(312, 200), (345, 255), (358, 300), (356, 352), (300, 362), (262, 348), (272, 290),
                 (290, 245), (312, 200)], 26)]
HORSE_ON_GRASS = [([(150, 440), (260, 445)], 90)]
# Lossy WebP keeps the files small (a PNG of the 512 px photo is ~470 KB); exact=True keeps the
# colours under the hole, and the alpha channel (the mask) is stored losslessly.
WEBP = {"quality": 85, "method": 6, "exact": True}


def painted(photo: Image.Image, strokes, scale: float) -> Image.Image:
    """RGBA: the photo with alpha 0 under the brush strokes (the hole), 255 elsewhere."""
    alpha = Image.new("L", photo.size, 255)
    draw = ImageDraw.Draw(alpha)
    for points, width in strokes:
        pts = [(x * scale, y * scale) for x, y in points]
        w = int(width * scale)
        if pts[0] == pts[-1]:
            draw.polygon(pts, fill=0)
        draw.line(pts, fill=0, width=w, joint="curve")
        for x, y in (pts[0], pts[-1]):
            draw.ellipse((x - w / 2, y - w / 2, x + w / 2, y + w / 2), fill=0)
    out = photo.convert("RGBA")
    out.putalpha(alpha)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photo")
    args = parser.parse_args()
    big = Image.open(args.photo).convert("RGB").crop(CROP)
    small = big.resize((512, 512), Image.LANCZOS)
    os.makedirs(OUT, exist_ok=True)
    painted(small, REMOVE_TREE, 1.0).save(os.path.join(OUT, "asuka_example_512.webp"), **WEBP)
    painted(small, HORSE_ON_GRASS, 1.0).save(os.path.join(OUT, "hd_painter_example_512.webp"), **WEBP)
    painted(big, HORSE_ON_GRASS, 4.0).save(os.path.join(OUT, "hd_painter_example_2048.webp"), **WEBP)
    for name in sorted(os.listdir(OUT)):
        print(name, os.path.getsize(os.path.join(OUT, name)) // 1024, "KB")


if __name__ == "__main__":
    main()
