"""Index a folder of images for search by text or by image: every picture embedded with a (Chinese) CLIP model, the
vectors kept in a FAISS index beside each file's path, sha256 and size.

    python APP_example/clip_retrieval/build_index.py                  # the sample collection, embedded small CLIP
    python APP_example/clip_retrieval/build_index.py --img_dir photos --index_dir photos_index \\
        --clip_model OFA-Sys/chinese-clip-vit-base-patch16
    python APP_example/clip_retrieval/search.py --index_dir photos_index --text "海边的日落"

Images are .jpg .jpeg .png .webp files anywhere under --img_dir (hidden folders skipped). Running it again updates
the index: only new and changed files (by content hash) are embedded, deleted ones leave it, and the rest keep their
vectors. A file that cannot be read is skipped with one line naming it. The index is exact inner-product search
below a few thousand images and IVF above (--index_type); a failed or interrupted run leaves the old index as it was.
"""

import argparse

from glm_tune.clip_model import DTYPES as CLIP_DTYPES, add_clip_arguments, load_clip
from glm_tune.errors import UserError, exit_on_user_error
from glm_tune.image_index import INDEX_TYPES, build_image_index, sample_images

DEFAULT_BATCH = 32


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img_dir", default=None,
                   help="folder of images, read recursively (default: the sample collection of captioned shapes, "
                        "generated on first use)")
    p.add_argument("--index_dir", default=None,
                   help="the index folder, created or updated (needed with --img_dir; default for the sample: the "
                        "folder search.py and the page use without --index_dir)")
    add_clip_arguments(p)
    p.add_argument("--dtype", choices=CLIP_DTYPES, default="fp32",
                   help="CLIP weights dtype (default: fp32; an index's vectors should come from one dtype)")
    p.add_argument("--index_type", choices=INDEX_TYPES, default="auto",
                   help="flat: exact inner product; ivf: inverted lists (approximate, for large collections); "
                        "auto: flat for small collections, ivf for large ones (default: auto)")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH,
                   help=f"images per CLIP forward pass (default: {DEFAULT_BATCH})")
    p.add_argument("--rebuild", action="store_true",
                   help="embed every image again (needed to switch an existing index to another --clip_model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@exit_on_user_error
def main(argv=None):
    from glm_tune.image_index import default_index_dir

    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.img_dir is None and args.index_dir is not None:
        raise UserError("--index_dir without --img_dir: say which folder of images to index")
    img_dir = args.img_dir or sample_images()
    index_dir = args.index_dir or default_index_dir()
    embedder = load_clip(args.clip_model, args.clip_revision, args.dtype)
    report = build_image_index(img_dir, index_dir, embedder, index_type=args.index_type,
                               batch_size=args.batch_size, rebuild=args.rebuild, progress=not args.quiet)
    print(f"{index_dir}: {report.total} images ({report.index_type}); added {report.added}, changed "
          f"{report.changed}, removed {report.removed}, unchanged {report.unchanged}, skipped {len(report.skipped)}; "
          f"embedded {report.embedded} in {report.seconds:.1f} s")
    return report


if __name__ == "__main__":
    main()
