"""Digital human: a topic (or a script) becomes a talking-head video, talk.mp4, in six stages (script, portrait,
voice, motion, lipsync, mux), each saved in --out so that a failed or changed run resumes where it must.

    python APP_example/digital_human/pipeline.py              # the embedded demo: the sample script and portrait
    python APP_example/digital_human/pipeline.py --topic "如何坚持跑步" --voice_ref me.wav --out output/run \\
        --model_name_or_path THUDM/chatglm-6b --lora_path output \\
        --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --sd_dtype fp16
    python APP_example/digital_human/pipeline.py --script talk.txt --portrait me.png --stage_config stages.toml

Without --topic or --script the shipped sample script is read; without --portrait, the shipped sample portrait when
there is no --topic, and a Stable Diffusion painting when there is. --stage_config routes stages to external
commands (CosyVoice, MuseV, MuseTalk; see the README). --redo STAGE makes that stage and those that read it again.
"""

import argparse
import json
from pathlib import Path

from glm_tune.arguments import add_model_arguments
from glm_tune.digital_human import (DEFAULT_FPS, DEFAULT_SIZE, DEFAULT_WORDS, STAGES, TalkSettings, make_talk,
                                    parse_size)
from glm_tune.errors import exit_on_user_error
from glm_tune.sd_checkpoint import add_pipeline_arguments

HERE = Path(__file__).resolve().parent
SAMPLE_SCRIPT = HERE / "sample_script.txt"
SAMPLE_PORTRAIT = HERE / "sample_portrait.png"
DEFAULT_OUT = "output/digital_human"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topic", default=None, help="what the talk is about (ChatGLM writes the script)")
    p.add_argument("--script", default=None, help="a UTF-8 text file to say, instead of ChatGLM's script")
    p.add_argument("--portrait", default=None, help="the face to animate (an image), instead of painting one")
    p.add_argument("--voice_ref", default=None, help="a WAV of a voice whose pitch and rate the voice matches")
    p.add_argument("--out", default=DEFAULT_OUT, help="the run folder (default: %(default)s)")
    p.add_argument("--words", type=int, default=DEFAULT_WORDS, help="the script's word budget (default: %(default)s)")
    p.add_argument("--size", default="x".join(map(str, DEFAULT_SIZE)),
                   help="the video's WIDTHxHEIGHT, multiples of 8 (default: %(default)s)")
    p.add_argument("--fps", type=int, default=DEFAULT_FPS, help="frames per second (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the painting's and the idle motion's seed")
    p.add_argument("--stage_config", default=None, help="a .toml or .json file routing stages to external commands")
    p.add_argument("--redo", choices=STAGES, default=None, help="make this stage and those that read it again")
    g = p.add_argument_group("ChatGLM (the script)")
    add_model_arguments(g)
    g = p.add_argument_group("Stable Diffusion (the portrait, without --portrait)")
    add_pipeline_arguments(g, dtype_help="SD weights dtype (default: fp32)", revision_flag="--sd_revision",
                           dtype_flag="--sd_dtype")
    g.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the run as JSON on the last line")
    return p


def settings_from_args(args):
    script = args.script if args.script or args.topic else str(SAMPLE_SCRIPT)
    portrait = args.portrait if args.portrait or args.topic else str(SAMPLE_PORTRAIT)
    return TalkSettings(topic=args.topic, script=script, portrait=portrait, voice_ref=args.voice_ref,
                        words=args.words, size=parse_size(args.size), fps=args.fps, seed=args.seed,
                        steps=args.steps, stage_config=args.stage_config,
                        model_name_or_path=args.model_name_or_path, revision=args.revision,
                        lora_path=args.lora_path, dtype=args.dtype,
                        pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                        sd_revision=args.sd_revision, variant=args.variant, sd_dtype=args.sd_dtype)


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    run = make_talk(settings_from_args(args), args.out, redo=args.redo, log=print)
    if args.json:
        print(json.dumps(run.summary(), ensure_ascii=False))
    return run


if __name__ == "__main__":
    main()
