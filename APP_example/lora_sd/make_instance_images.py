"""Write the embedded demo's instance images: five 64x64 photos of one subject, an orange disc on a dark blue
background, a little bigger or smaller and off centre in each (what a few snapshots of one object look like).

    python APP_example/lora_sd/make_instance_images.py            # rewrites instance_images/ beside this script

The output is the same on every machine (fixed seed, flat colours, no anti-aliasing), so the shipped PNGs can be
checked against it.
"""

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

from glm_tune.atomic import atomic_dir

HERE = Path(__file__).resolve().parent
BACKGROUND, SUBJECT = (25, 45, 110), (245, 150, 30)
COUNT, SIZE = 5, 64


def instance_image(index, size=SIZE):
    rng = random.Random(index)
    image = Image.new("RGB", (size, size), BACKGROUND)
    radius = size * rng.uniform(0.22, 0.3)
    cx = size / 2 + rng.uniform(-0.1, 0.1) * size
    cy = size / 2 + rng.uniform(-0.1, 0.1) * size
    ImageDraw.Draw(image).ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=SUBJECT)
    return image


def write_instance_images(folder=HERE / "instance_images", count=COUNT, size=SIZE):
    with atomic_dir(folder) as tmp:
        for i in range(count):
            instance_image(i, size).save(tmp / f"disc-{i}.png", format="PNG")
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(HERE / "instance_images"),
                        help="folder to (re)write (default: instance_images/ beside this script)")
    parser.add_argument("--count", type=int, default=COUNT, help=f"number of images (default: {COUNT})")
    parser.add_argument("--size", type=int, default=SIZE, help=f"width and height in pixels (default: {SIZE})")
    args = parser.parse_args()
    print(f"wrote {write_instance_images(Path(args.output_dir), args.count, args.size)}")


if __name__ == "__main__":
    main()
