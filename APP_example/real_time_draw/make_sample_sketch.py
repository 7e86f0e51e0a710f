"""Write the page's starting sketch, sample_sketch.png: a child's drawing of a sun over the sea (a light sky, a dark
blue sea, an orange sun, a brown boat), 256x256, flat colours and thick outlines as a mouse on a canvas would make.

    python APP_example/real_time_draw/make_sample_sketch.py          # rewrites sample_sketch.png beside this script

The page shows it behind the canvas when no background is uploaded, and the tests draw from it. It is the same on
every machine (no randomness, no anti-aliasing), so the shipped PNG can be checked against this script.
"""

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from glm_tune.atomic import atomic_path

HERE = Path(__file__).resolve().parent
SAMPLE_SKETCH = HERE / "sample_sketch.png"
SAMPLE_PROMPT = "an orange sun over the sea, a small boat, watercolor painting"
SIZE = 256
SKY, SEA, SUN, BOAT, LINE = (205, 225, 250), (30, 60, 140), (245, 150, 30), (120, 70, 30), (20, 20, 20)


def sample_sketch(size=SIZE):
    s = size / 256  # drawn on a 256 grid, scaled
    image = Image.new("RGB", (size, size), SKY)
    pen = ImageDraw.Draw(image)
    horizon = round(150 * s)
    pen.rectangle([0, horizon, size, size], fill=SEA)
    pen.line([0, horizon, size, horizon], fill=LINE, width=max(1, round(4 * s)))
    pen.ellipse([round(150 * s), round(40 * s), round(220 * s), round(110 * s)], fill=SUN, outline=LINE,
                width=max(1, round(4 * s)))
    hull = [(60, 190), (140, 190), (125, 215), (75, 215)]
    pen.polygon([(round(x * s), round(y * s)) for x, y in hull], fill=BOAT, outline=LINE, width=max(1, round(3 * s)))
    pen.line([round(100 * s), round(190 * s), round(100 * s), round(140 * s)], fill=LINE, width=max(1, round(4 * s)))
    pen.polygon([(round(x * s), round(y * s)) for x, y in [(104, 145), (104, 185), (135, 185)]], fill=(250, 250, 250),
                outline=LINE, width=max(1, round(2 * s)))
    return image


def write_sample_sketch(path=SAMPLE_SKETCH, size=SIZE):
    with atomic_path(path) as tmp:
        sample_sketch(size).save(tmp, format="PNG")
    return Path(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(SAMPLE_SKETCH), help="the PNG to (re)write (default: sample_sketch.png "
                                                                  "beside this script)")
    parser.add_argument("--size", type=int, default=SIZE, help=f"width and height in pixels (default: {SIZE})")
    args = parser.parse_args()
    print(f"wrote {write_sample_sketch(args.out, args.size)}")


if __name__ == "__main__":
    main()
