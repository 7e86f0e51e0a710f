"""Turn a sketch into an image in a few latent-consistency (LCM) steps: what the real-time drawing page does on every
stroke, for scripts and tests.

    python APP_example/real_time_draw/draw.py --sketch APP_example/real_time_draw/sample_sketch.png \\
        --prompt "an orange sun over the sea" --out output/real_time_draw/sun.png
    python APP_example/real_time_draw/draw.py --sketch cat.png --prompt "a photo of a cat, best quality" \\
        --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --lcm_lora lcm-lora-sdv1-5 \\
        --steps 4 --guidance 1.0 --strength 0.6 --seed 0 --width 512 --height 512 --dtype fp16 --out cat-lcm.png

Writes --out (a PNG) and beside it the same name with .json: every setting, the sketch's digest, the scheduler and
the seconds, so that the frame can be made again. Prints the latency (sketch in to image out, the model already
loaded). The same --seed and sketch give the same image; a new stroke or prompt changes it.

--steps counts the denoising steps that run (each one UNet call), spread over LCM's schedule below --strength x 1000:
4 steps at --strength 0.6 run at timesteps 599, 459, 299, 159 (as latent-consistency's own img2img pipeline). An
LCM-LoRA (a pytorch_lora_weights.safetensors, e.g. latent-consistency/lcm-lora-sdv1-5, or its folder) is what makes
a base SD model usable at 1-8 steps; without one the base model gets few-step LCM sampling it was not distilled for
(blurry). The embedded small pipeline (the default) has random weights: it shows the mechanics and the speed, not
pictures.
"""

import argparse
from pathlib import Path

from glm_tune.atomic import atomic_path, write_json
from glm_tune.errors import UserError, exit_on_user_error
from glm_tune.sd_checkpoint import add_pipeline_arguments
from glm_tune.sd_draw import MAX_STEPS, DrawSettings, draw, load_draw_pipeline, load_sketch

DEFAULT_OUT = "output/real_time_draw/frame.png"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sketch", required=True,
                   help="the drawing: a PNG/JPEG/WebP file (transparent parts count as white); it is stretched to "
                        "--width x --height")
    p.add_argument("--prompt", required=True, help="what the sketch should become")
    p.add_argument("--steps", type=int, default=4,
                   help=f"denoising steps that run, 1-{MAX_STEPS} (LCM: 1-8; default: 4)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale; 1 or less turns it off, which LCM-LoRA wants (up to ~2 "
                        "still works, at twice the UNet work per step; default: 1.0)")
    p.add_argument("--strength", type=float, default=0.6,
                   help="how much of the sketch is repainted, (0, 1]: low keeps its shapes and colours, 1 keeps "
                        "almost nothing (default: 0.6)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed and sketch give the same image "
                                                       "(default: 0)")
    p.add_argument("--width", type=int, default=None,
                   help="image width, a multiple of 8 (default: the pipeline's, 512 for SD 1.x, 32 for the "
                        "embedded)")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (default: as --width)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"the PNG to write; its settings go beside it as .json (default: {DEFAULT_OUT})")
    add_pipeline_arguments(p, dtype_help="weights dtype (default: fp32; fp16 halves memory and time on a GPU)")
    p.add_argument("--lcm_lora", default=None,
                   help="an LCM-LoRA for the base model: its pytorch_lora_weights.safetensors or the folder holding "
                        "it (fused into the weights; default: none)")
    return p


def settings_from_args(args):
    return DrawSettings(prompt=args.prompt, steps=args.steps, guidance=args.guidance, strength=args.strength,
                        seed=args.seed, width=args.width, height=args.height,
                        pretrained_model_name_or_path=getattr(args, "pretrained_model_name_or_path"),
                        revision=args.revision, variant=args.variant, lcm_lora=args.lcm_lora,
                        dtype=args.dtype).check()


def check_out(out):
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: must end in .png (the frame is written as PNG)")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name ending in .png")
    return out


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    out = check_out(args.out)
    sketch = load_sketch(args.sketch)  # before the model loads: a bad file is reported at once
    pipeline = load_draw_pipeline(settings.pretrained_model_name_or_path, settings.lcm_lora, settings.dtype,
                                  settings.revision, settings.variant)
    frame = draw(sketch, settings, pipeline)
    with atomic_path(out) as tmp:
        frame.image.save(tmp, format="PNG")
    settings_path = out.with_suffix(".json")
    write_json(settings_path, {**frame.record, "sketch": str(args.sketch), "image": out.name})
    done = frame.record["settings"]
    print(f"wrote {out} ({done['width']}x{done['height']}, {settings.steps} steps; settings: {settings_path})")
    print(f"latency {frame.seconds * 1000:.0f} ms")
    return frame, out, settings_path


if __name__ == "__main__":
    main()
