"""Generate images with Stable Diffusion and any number of LoRA adapters mixed by weight.

    python APP_example/lora_sd/generate.py --prompt "a photo of sks disc" --lora output/lora_sd
    python APP_example/lora_sd/generate.py --prompt "a photo of sks dog in the snow" \\
        --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --lora output/sks_dog/pytorch_lora_weights.safetensors:0.8 --lora output/watercolor:0.5 --fuse \\
        --seed 7 --steps 30 --guidance 7.5 --width 512 --height 512 --num_images 4 --out_dir output/images
    python APP_example/lora_sd/generate.py --settings output/images/gen-0001.json   # the same images again
    python APP_example/lora_sd/generate.py --prompt "a photo of sks disc" --image sketch.png --strength 0.7

Each run writes --out_dir/gen-NNNN-I.png (image I, drawn from seed + I) and gen-NNNN.json with every setting that
made them; --settings reads such a file back and makes the same images. An adapter is a
pytorch_lora_weights.safetensors (train_lora_sd.py's or diffusers' train_dreambooth_lora.py's), or a folder holding
one, optionally followed by :WEIGHT (default 1). --fuse adds the adapters into the base weights first: the same
images, faster steps.
"""

import argparse
import sys

from glm_tune.errors import UserError, exit_on_user_error
from glm_tune.locking import hold_output_lock
from glm_tune.sd_checkpoint import add_pipeline_arguments
from glm_tune.sd_generate import (GenerationSettings, add_generation_arguments, generate, generation_fields,
                                   parse_lora_spec, save_run)

DEFAULT_OUT_DIR = "output/lora_sd_images"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=None, help="what to draw (required unless --settings)")
    add_pipeline_arguments(p, dtype_help="weights dtype (default: fp32; fp16 halves memory on a GPU)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="a LoRA adapter (pytorch_lora_weights.safetensors or its folder) and its weight (default "
                        "1); repeat to mix several")
    p.add_argument("--fuse", action="store_true", help="add the adapters into the base weights before generating")
    add_generation_arguments(p)
    p.add_argument("--out_dir", default=DEFAULT_OUT_DIR, help=f"where the images and settings go (default: "
                                                              f"{DEFAULT_OUT_DIR})")
    p.add_argument("--settings", default=None,
                   help="a gen-NNNN.json of an earlier run: make its images again (other flags are ignored, except "
                        "--out_dir)")
    return p


def settings_from_args(args):
    if args.settings:
        return GenerationSettings.from_json(args.settings)
    if args.prompt is None:
        raise UserError("--prompt: required (or --settings FILE to repeat a run)")
    return GenerationSettings(
        prompt=args.prompt, pretrained_model_name_or_path=args.pretrained_model_name_or_path, revision=args.revision,
        variant=args.variant, loras=[list(parse_lora_spec(spec)) for spec in args.lora], fuse=args.fuse,
        dtype=args.dtype, **generation_fields(args)).check()


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    with hold_output_lock(args.out_dir, "--out_dir"):
        images, record = generate(settings)
        paths, settings_path = save_run(images, record, args.out_dir)
    for path in paths:
        print(path)
    print(f"settings: {settings_path} ({record['seconds']:.1f} s; again: python {sys.argv[0]} --settings "
          f"{settings_path})")
    return paths, settings_path


if __name__ == "__main__":
    main()
