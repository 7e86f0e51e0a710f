"""Search an image index (build_index.py's) by text or by an image; prints the closest images, best first, with
their scores (cosine similarity of the CLIP embeddings, 1 = the same direction).

    python APP_example/clip_retrieval/search.py --text "红色圆形"              # the sample collection
    python APP_example/clip_retrieval/search.py --index_dir photos_index --text "sunset over the sea" --k 10
    python APP_example/clip_retrieval/search.py --index_dir photos_index --image query.jpg --json

With --json the last line is [{"path": ..., "score": ...}, ...], best first. The CLIP model is the one the index was
built with, unless --clip_model names it otherwise (it must be the same model).
"""

import argparse
import json

from glm_tune.clip_model import DTYPES as CLIP_DTYPES, add_clip_arguments, load_clip
from glm_tune.errors import exit_on_user_error
from glm_tune.image_index import ImageIndex, ensure_sample_index

DEFAULT_K = 5


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index_dir", default=None,
                   help="an index of build_index.py (default: the sample collection's, built on first use)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="find images that match this text (Chinese or English)")
    query.add_argument("--image", help="find images like this one (a .jpg .png .webp file)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"how many results (default: {DEFAULT_K})")
    p.add_argument("--nprobe", type=int, default=None,
                   help="IVF indexes: inverted lists searched (more = closer to exact, slower; default: the index's)")
    add_clip_arguments(p)
    p.add_argument("--dtype", choices=CLIP_DTYPES, default="fp32", help="CLIP weights dtype (default: fp32)")
    p.add_argument("--json", action="store_true", help='print [{"path": ..., "score": ...}, ...] on the last line')
    return p


def search(args):
    index = ImageIndex.open(args.index_dir or ensure_sample_index())
    embedder = load_clip(args.clip_model or index.model, args.clip_revision, args.dtype)
    if args.text is not None:
        return index.search_text(embedder, args.text, args.k, nprobe=args.nprobe)
    return index.search_image(embedder, args.image, args.k, nprobe=args.nprobe)


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    hits = search(args)
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>3}. {hit.score:.4f}  {hit.path}")
    if args.json:
        print(json.dumps([{"path": str(hit.path), "score": round(float(hit.score), 6)} for hit in hits],
                         ensure_ascii=False))
    return hits


if __name__ == "__main__":
    main()
