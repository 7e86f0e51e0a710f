"""Auto poster: a theme in words becomes a poster in five stages (plan, paint, layout, render, review), each saved in
--out so that a run can be looked at, edited and resumed at any stage.

    python APP_example/auto_poster/poster.py                  # the embedded demo: the sample theme, small models
    python APP_example/auto_poster/poster.py --theme "五一劳动节促销" --size 768x1024 --out output/auto_poster \\
        --model_name_or_path THUDM/chatglm-6b --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --sd_dtype fp16 --steps 30 --seed 7 --retries 3
    python APP_example/auto_poster/poster.py --plan APP_example/auto_poster/sample_plan.json --background photo.jpg

The run folder holds plan.json (ChatGLM's plan, each field's provenance: model, repaired, clipped or default),
background.png and background.json (its generation settings), layout.json, poster.png and review.json; run.json
records what each stage was made from. Run again and every stage whose inputs are unchanged is reused; a changed
theme, size, seed or model makes that stage and what depends on it again; --redo STAGE makes that stage and all
after it again. A file edited by hand (plan.json, layout.json) is what the later stages read. --plan FILE skips
ChatGLM (a plan written by hand); --background IMG skips painting.

A failed review (text outside the margins, too little contrast, a line missing) is laid out again up to --retries
times (smaller type, another region, a stronger outline); the exit status is 1 when the last review still fails
(the poster is written all the same). With --json the last line is the run as JSON.

Without model flags the embedded small models run: the random ChatGLM's plan is noise, so the plan's defaults carry
the poster (the output names the fields that came from them), and the random Stable Diffusion paints colour noise
at 32x32 that is resized to the poster: the mechanics, not pictures.
"""

import argparse
import json
import sys

from glm_tune.arguments import add_model_arguments
from glm_tune.errors import exit_on_user_error
from glm_tune.poster import (DEFAULT_SIZE, NEGATIVE_PROMPT, SAMPLE_THEME, STAGES, PosterSettings, parse_size,
                             run_poster)
from glm_tune.poster_plan import read_plan
from glm_tune.sd_checkpoint import add_pipeline_arguments

DEFAULT_OUT = "output/auto_poster"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--theme", default=None, help=f"what the poster is for (default: the sample theme "
                                                 f"\"{SAMPLE_THEME}\")")
    p.add_argument("--plan", default=None,
                   help="a plan.json to use instead of asking ChatGLM (written by hand, or an earlier run's)")
    p.add_argument("--size", default="x".join(map(str, DEFAULT_SIZE)),
                   help="the poster's WIDTHxHEIGHT in pixels, each a multiple of 8 from 64 to 4096 (default: "
                        "%(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT, help="the run folder (default: %(default)s)")
    p.add_argument("--background", default=None, help="use this picture as the background instead of painting one")
    p.add_argument("--retries", type=int, default=0,
                   help="lay out again up to N times while the review fails (default: %(default)s)")
    p.add_argument("--redo", choices=STAGES, default=None, help="make this stage and every one after it again")
    g = p.add_argument_group("ChatGLM (the plan)")
    add_model_arguments(g)
    g = p.add_argument_group("Stable Diffusion (the background)")
    add_pipeline_arguments(g, dtype_help="SD weights dtype (default: fp32; fp16 halves memory on a GPU)",
                           revision_flag="--sd_revision", dtype_flag="--sd_dtype")
    g.add_argument("--seed", type=int, default=0, help="the background's seed (default: %(default)s)")
    g.add_argument("--steps", type=int, default=25, help="denoising steps (default: %(default)s)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (default: %(default)s)")
    g.add_argument("--negative_prompt", default=NEGATIVE_PROMPT, help="what not to paint (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the run as JSON on the last line")
    return p


def settings_from_args(args):
    return PosterSettings(size=parse_size(args.size), background=args.background, seed=args.seed, steps=args.steps,
                          guidance=args.guidance, negative_prompt=args.negative_prompt, retries=args.retries,
                          model_name_or_path=args.model_name_or_path, revision=args.revision,
                          lora_path=args.lora_path, dtype=args.dtype,
                          pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                          sd_revision=args.sd_revision, variant=args.variant, sd_dtype=args.sd_dtype).check()


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    plan = read_plan(args.plan, "--plan", theme=args.theme) if args.plan else None
    theme = SAMPLE_THEME if args.theme is None else args.theme
    run = run_poster(theme, settings, args.out, plan=plan, redo=args.redo, log=print)
    if args.json:
        print(json.dumps(run.summary(), ensure_ascii=False))
    if not run.passed:
        sys.exit(1)
    return run


if __name__ == "__main__":
    main()
