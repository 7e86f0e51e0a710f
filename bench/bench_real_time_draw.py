"""Seconds per real-time drawing frame (glm_tune.sd_draw.draw: sketch in, LCM img2img, image out; what the page does
after each stroke) at a few step counts and sizes, on the embedded small pipeline or any SD folder.

    python bench/bench_real_time_draw.py                                     # steps 1 2 4, the pipeline's size
    python bench/bench_real_time_draw.py --threads 1 --sizes 32 64 128 --frames 40 --json out.json
    python bench/bench_real_time_draw.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --lcm_lora lcm-lora-sdv1-5 --dtype fp16 --sizes 512                  # on a GPU

Every frame draws a new stroke on the sample sketch first (the sketch differs from frame to frame, as while
drawing), with the same seed, prompt and strength. Reported per configuration: the median and fastest of --frames
timed frames after --warmup untimed ones, frames per second at the median, the time the model took to load, and on
CUDA the peak memory.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import ImageDraw

from _common import cpu_name, peak_memory_bytes, report
from glm_tune.sd_draw import DTYPES, DrawSettings, draw, load_draw_pipeline, load_sketch

ROOT = Path(__file__).resolve().parent.parent
SKETCH = ROOT / "APP_example" / "real_time_draw" / "sample_sketch.png"
PROMPT = "an orange sun over the sea, a small boat, watercolor painting"


def stroked(sketch, i):
    """The sketch with a short stroke that moves with i."""
    image = sketch.copy()
    w, h = image.size
    x, y = (37 * i) % w, (23 * i) % h
    ImageDraw.Draw(image).line([x, y, x + w // 8, y + h // 16], fill=(20, 20, 20), width=max(1, w // 64))
    return image


def time_config(pipeline, sketch, steps, size, args):
    settings = DrawSettings(PROMPT, steps=steps, guidance=args.guidance, strength=args.strength, seed=0,
                            width=size[0], height=size[1], dtype=args.dtype).check()
    times = []
    for i in range(args.warmup + args.frames):
        times.append(draw(stroked(sketch, i), settings, pipeline).seconds)
    timed = times[args.warmup:]
    median = statistics.median(timed)
    return {"steps": steps, "width": size[0], "height": size[1], "seconds_per_frame": median, "min_s": min(timed),
            "fps": 1 / median, "frames": args.frames, "strength": args.strength, "guidance": args.guidance}


def parse_size(text):
    w, _, h = text.partition("x")
    return int(w), int(h or w)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help="pipeline folder or hub id (default: the embedded small pipeline)")
    parser.add_argument("--lcm_lora", default=None, help="an LCM-LoRA file or folder, fused (default: none)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights dtype (default: fp32)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="step counts (default: 1 2 4)")
    parser.add_argument("--sizes", nargs="+", default=None, metavar="W[xH]",
                        help="image sizes (default: the pipeline's own, 32 for the embedded, 512 for SD 1.x)")
    parser.add_argument("--strength", type=float, default=0.6, help="img2img strength (default: 0.6)")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance scale (default: 1.0, no CFG)")
    parser.add_argument("--frames", type=int, default=20, help="timed frames per configuration (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed frames first (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pipeline = load_draw_pipeline(args.pretrained_model_name_or_path, args.lcm_lora, args.dtype)
    load_seconds = time.perf_counter() - started
    sketch = load_sketch(SKETCH)
    sizes = [parse_size(s) for s in args.sizes] if args.sizes else [pipeline.default_size]
    results = [time_config(pipeline, sketch, steps, size, args) for size in sizes for steps in args.steps]
    device = pipeline.pipe.device
    rows = [(f"{r['width']}x{r['height']}, {r['steps']} step(s), {args.dtype}, {device}: s/frame (median)",
             f"{r['seconds_per_frame']:.4f}  ({r['fps']:.1f} frames/s; fastest {r['min_s']:.4f})") for r in results]
    rows.append(("pipeline load s (first, includes imports)", f"{load_seconds:.1f}"))
    report(rows, {"model": args.pretrained_model_name_or_path or "embedded small pipeline", "lcm_lora": args.lcm_lora,
                  "device": str(device), "threads": torch.get_num_threads(), "cpu": cpu_name(),
                  "torch": torch.__version__, "load_seconds": load_seconds, "results": results,
                  "peak_memory_bytes": peak_memory_bytes(device) if device.type == "cuda" else None}, args.json)


if __name__ == "__main__":
    sys.exit(main())
