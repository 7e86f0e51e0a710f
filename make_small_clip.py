"""Write a small CLIP model folder in the standard layout (config.json, model.safetensors, preprocessor_config.json,
tokenizer files), trained here in seconds on pictures of coloured shapes captioned in Chinese and English, for tests,
demos and benchmarks.

    python make_small_clip.py --output_dir models/clip-small
    python make_small_clip.py --output_dir models/clip-small-en --kind english --steps 1000

The retrieval apps (APP_example/clip_retrieval, APP_example/retrieval_image_gen) take the folder as --clip_model; they
build the default one the same way on first use and cache it in ~/.cache/glm-tune ($GLM_TUNE_CACHE). With real
weights, point them at a Chinese CLIP folder or hub id (OFA-Sys/chinese-clip-vit-base-patch16) or an English CLIPModel
one instead. glm_tune/clip_model.py describes what is in the folder and how it is trained.
"""

import argparse
import time

from glm_tune.clip_model import KINDS, SMALL_CLIP_SHAPE, write_small_clip


def main():
    shape = SMALL_CLIP_SHAPE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to create (replaced if it exists)")
    parser.add_argument("--kind", choices=KINDS, default="chinese",
                        help="chinese: ChineseCLIPModel with a BERT vocab.txt tokenizer, learns Chinese and English "
                             "captions (as OFA-Sys/chinese-clip-*); english: CLIPModel with CLIP's BPE tokenizer, "
                             "English captions only (as openai/clip-*) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial weights and of the training pictures (default: 0)")
    parser.add_argument("--image_size", type=int, default=shape["image_size"],
                        help="picture size the vision tower takes, a multiple of --patch_size (default: %(default)s)")
    parser.add_argument("--patch_size", type=int, default=shape["patch_size"],
                        help="ViT patch size (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=shape["hidden"],
                        help="width of both towers, a multiple of --heads (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=shape["layers"],
                        help="transformer layers of each tower (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=shape["heads"],
                        help="attention heads of each tower (default: %(default)s)")
    parser.add_argument("--projection_dim", type=int, default=shape["projection_dim"],
                        help="size of the shared embedding space (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=shape["steps"],
                        help="training steps, each a batch of all 30 (shape, colour) classes (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=shape["lr"], help="AdamW peak learning rate (default: %(default)s)")
    parser.add_argument("--variants", type=int, default=shape["variants"],
                        help="random pictures drawn per class to train on (default: %(default)s)")
    args = parser.parse_args()
    settings = {key: getattr(args, key) for key in shape}
    start = time.perf_counter()
    try:
        folder = write_small_clip(args.output_dir, kind=args.kind, seed=args.seed, **settings)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {folder} ({args.kind}, trained {args.steps} steps in {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
