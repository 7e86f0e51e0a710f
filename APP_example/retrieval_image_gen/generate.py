"""Retrieval-augmented image generation: a request in words; ChatGLM turns it into an image prompt; CLIP finds the
closest reference picture in an image index; Stable Diffusion redraws that picture towards the prompt (img2img).

    python APP_example/retrieval_image_gen/generate.py --request "红色圆形"      # the embedded demo (see below)
    python APP_example/clip_retrieval/build_index.py --img_dir photos --index_dir photos_index   # once
    python APP_example/retrieval_image_gen/generate.py --request "一只在雪地里奔跑的红色狐狸" \\
        --index_dir photos_index --model_name_or_path THUDM/chatglm-6b --lora_path output \\
        --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --sd_dtype fp16 \\
        --width 512 --height 512 --steps 30 --strength 0.7 --seed 7
    python APP_example/retrieval_image_gen/generate.py --settings output/retrieval_image_gen/gen-0001.json

Each run writes --out_dir/gen-NNNN-0.png and gen-NNNN.json: the request, the prompt used and where it came from
(ChatGLM's answer, or the raw request when that answer was unusable, which is printed), the reference image with
its sha256 and score, and every generation setting; --settings reads the file back and makes the same image (the
reference must be unchanged). --prompt skips ChatGLM. The CLIP model is the one the index was built with unless
--clip_model says otherwise. With --json the last line is the run as JSON.

Without --index_dir, the sample collection (the small captioned shapes that the embedded CLIP was trained on) is
indexed on first use; without model flags the embedded small models run (random ChatGLM and Stable Diffusion: the
mechanics, not pictures).
"""

import argparse
import json
import sys
from pathlib import Path

from glm_tune.arguments import add_model_arguments
from glm_tune.clip_model import add_clip_arguments
from glm_tune.errors import UserError, exit_on_user_error
from glm_tune.image_index import ensure_sample_index
from glm_tune.image_rag import LANGUAGES, RagSettings, run, save, summary
from glm_tune.locking import hold_output_lock
from glm_tune.sd_checkpoint import add_pipeline_arguments
from glm_tune.sd_generate import GenerationSettings, add_generation_arguments, generate, generation_fields, save_run

DEFAULT_OUT_DIR = "output/retrieval_image_gen"
RUN_KEYS = ("request", "prompt_source", "llm_output", "fallback_reason", "reference", "index_dir", "clip_model",
            "chatglm")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--request", default=None, help="the picture you want, in words (required unless --settings)")
    p.add_argument("--index_dir", default=None,
                   help="an image index of clip_retrieval/build_index.py (default: the sample collection's, built "
                        "on first use)")
    p.add_argument("--prompt", default=None, help="use this image prompt instead of asking ChatGLM")
    p.add_argument("--prompt_language", choices=LANGUAGES, default="en",
                   help="en: ChatGLM's prompt must be English (SD 1.x/2.x's text encoder reads English), else the "
                        "request is used; any: a prompt in any language is used (default: en)")
    g = p.add_argument_group("ChatGLM (the prompt)")
    add_model_arguments(g)
    g = p.add_argument_group("CLIP (the reference)")
    add_clip_arguments(g)
    g = p.add_argument_group("Stable Diffusion (the picture)")
    add_pipeline_arguments(g, dtype_help="SD weights dtype (default: fp32; fp16 halves memory on a GPU)",
                           revision_flag="--sd_revision", dtype_flag="--sd_dtype")
    add_generation_arguments(g, image=False, num_images=False, strength=0.75)
    p.add_argument("--out_dir", default=DEFAULT_OUT_DIR,
                   help=f"where the image and its settings go (default: {DEFAULT_OUT_DIR})")
    p.add_argument("--settings", default=None,
                   help="a gen-NNNN.json of an earlier run: make its image again (other flags are ignored, except "
                        "--out_dir and --json)")
    p.add_argument("--json", action="store_true", help="print the run as JSON on the last line")
    return p


def settings_from_args(args):
    sd = dict(pretrained_model_name_or_path=args.pretrained_model_name_or_path, revision=args.sd_revision,
              variant=args.variant, dtype=args.sd_dtype, **generation_fields(args))
    GenerationSettings(prompt="-", **sd).check()  # bad numbers fail before any model loads
    return RagSettings(index_dir=args.index_dir or str(ensure_sample_index()), prompt=args.prompt,
                       prompt_language=args.prompt_language, model_name_or_path=args.model_name_or_path,
                       revision=args.revision, lora_path=args.lora_path, dtype=args.dtype,
                       clip_model=args.clip_model, clip_revision=args.clip_revision, sd=sd)


def again(settings_path, out_dir):
    """--settings: the run's image made again from its file (the request, prompt and reference kept as they were)."""
    settings = GenerationSettings.from_json(settings_path)  # a file that is not JSON is a one-line error here
    previous = json.loads(Path(settings_path).read_text(encoding="utf-8"))
    if "reference" not in previous:
        raise UserError(f"--settings {settings_path}: not a run of this script (no \"reference\"); lora_sd's "
                        "generate.py repeats its own runs")
    images, record = generate(settings)
    record = {**record, **{key: previous[key] for key in RUN_KEYS if key in previous}}
    paths, path = save_run(images, record, out_dir)
    return paths[0], path, record


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    with hold_output_lock(args.out_dir, "--out_dir"):
        if args.settings:
            image_path, settings_path, record = again(args.settings, args.out_dir)
            result = None
        else:
            if args.request is None:
                raise UserError("--request: required (or --settings FILE to repeat a run)")
            result = run(args.request, settings_from_args(args))
            image_path, settings_path = save(result, args.out_dir)
            record = result.record
    if result is not None:
        print(f"prompt ({result.choice.source}): {result.choice.prompt}")
        if result.choice.note:
            print(result.choice.note)
    reference = record["reference"]
    print(f"reference: {reference['path']} (score {reference['score']:.3f})")
    print(f"image: {image_path}")
    print(f"settings: {settings_path} ({record['seconds']:.1f} s; again: python {sys.argv[0]} --settings "
          f"{settings_path})")
    if args.json:
        out = {"image": str(image_path), "settings_file": str(settings_path)}
        if result is not None:
            out = {**summary(result), **out}
        print(json.dumps(out, ensure_ascii=False))
    return image_path, settings_path


if __name__ == "__main__":
    main()
