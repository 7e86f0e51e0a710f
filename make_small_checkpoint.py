"""Write a small ChatGLM-6B-shaped checkpoint folder in the official layout (random weights, trained tokenizer).

    python make_small_checkpoint.py --output_dir models/chatglm-small --revision v1.1 --formats sharded-bin safetensors

Tests, demos and benchmarks use it because no official weights can be downloaded here; with real weights, point
--model_name_or_path of the other scripts at the official folder instead.
"""

import argparse

from glm_tune.checkpoint import IMAGE_TOKENS, SMALL_SHAPE, WEIGHT_FORMATS, write_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to create (replaced if it exists)")
    parser.add_argument("--revision", choices=sorted(IMAGE_TOKENS), default="v1.1",
                        help="v1.1: 130528-style vocab without image tokens; original: 20000 image tokens first")
    parser.add_argument("--formats", nargs="+", choices=WEIGHT_FORMATS, default=["sharded-bin"],
                        help="weight files to write (several allowed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--vocab_pieces", type=int, default=4000, help="text vocabulary of the tokenizer (the v1.1 file's pieces; the first release's file holds 344 fewer, which the tokenizer appends)")
    for name, default in SMALL_SHAPE.items():
        parser.add_argument(f"--{name}", type=int, default=default, help=f"model {name} (default {default})")
    args = parser.parse_args()
    shape = {name: getattr(args, name) for name in SMALL_SHAPE}
    folder = write_checkpoint(args.output_dir, revision=args.revision, formats=args.formats, seed=args.seed,
                              vocab_pieces=args.vocab_pieces, **shape)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
