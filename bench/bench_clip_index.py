"""Indexing pictures with a CLIP model (APP_example/clip_retrieval/build_index.py's work): images per second for a
whole build (hashing, decoding in threads, embedding, writing the index), for the embedding alone, and for an
incremental re-run that has nothing to embed; text queries per second (CLIP text tower + search); peak memory.

    python bench/bench_clip_index.py                              # the embedded small CLIP, 2000 photo-sized JPEGs
    python bench/bench_clip_index.py --clip_model OFA-Sys/chinese-clip-vit-base-patch16 --n 500 --dtype bf16

The pictures are the sample collection's shapes drawn at --size pixels on noisy backgrounds and saved as JPEG, so
that decoding costs what a photo of that size costs. On the embedded model (32x32 input, 2 small layers) the
embedding is cheap and the build measures the pipeline around the model; a real ViT-B/16 makes the embedding the
cost. Peak memory (RSS on a CPU, allocated CUDA memory on a GPU) is taken in a fresh process that builds the index.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import cpu_name, peak_memory_bytes, report, report_memory, run_memory_child
from glm_tune.clip_model import COLOURS, DTYPES, SHAPES, caption, load_clip, render_shape
from glm_tune.image_index import ImageIndex, build_image_index, decode_image


def write_pictures(folder, n, size, seed=0):
    """n JPEGs of --size pixels: shapes over noise, in 10 sub-folders."""
    rng = np.random.default_rng(seed)
    classes = [(s, c) for s in SHAPES for c in COLOURS]
    for i in range(n):
        shape, colour = classes[i % len(classes)]
        noise = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        drawn = render_shape(shape, colour, 128, seed=i).resize((size, size), Image.Resampling.BILINEAR)
        picture = np.asarray(drawn, dtype=np.uint8) // 2 + noise * 2
        path = folder / f"part{i % 10}" / f"{shape}-{colour}-{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(path, quality=90)


def build_child(args):
    """The child of the memory measurement: one whole build, then report the peak."""
    embedder = load_clip(args.clip_model, dtype=args.dtype)
    build_image_index(args._build, Path(args._build).parent / "memory-index", embedder, batch_size=args.batch_size,
                      progress=False)
    report_memory({"peak_bytes": peak_memory_bytes(torch.device(embedder.device))})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip_model", default=None, help="a CLIP folder or hub id (default: the embedded small one)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="CLIP weights dtype (default: fp32)")
    p.add_argument("--n", type=int, default=2000, help="pictures to index (default: 2000)")
    p.add_argument("--size", type=int, default=512, help="picture side in pixels (default: 512)")
    p.add_argument("--batch_size", type=int, default=32, help="images per CLIP forward pass (default: 32)")
    p.add_argument("--queries", type=int, default=200, help="text queries timed (default: 200)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--_build", help=argparse.SUPPRESS)  # the memory child: build an index of this folder
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._build:
        return build_child(args)

    embedder = load_clip(args.clip_model, dtype=args.dtype)
    with tempfile.TemporaryDirectory(prefix="bench-clip-index-") as tmp:
        folder, index_dir = Path(tmp) / "pictures", Path(tmp) / "index"
        started = time.perf_counter()
        write_pictures(folder, args.n, args.size)
        print(f"wrote {args.n} pictures in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)

        build = build_image_index(folder, index_dir, embedder, batch_size=args.batch_size, progress=False)
        again = build_image_index(folder, index_dir, embedder, batch_size=args.batch_size, progress=False)
        assert again.embedded == 0

        files = sorted(folder.rglob("*.jpg"))[: 4 * args.batch_size]
        pictures = [decode_image(f).image for f in files]
        embedder.embed_images(pictures[: args.batch_size], args.batch_size)  # warm-up
        started = time.perf_counter()
        embedder.embed_images(pictures, args.batch_size)
        embed_rate = len(pictures) / (time.perf_counter() - started)

        index = ImageIndex.open(index_dir)
        texts = [caption(s, c, lang) for s in SHAPES for c in COLOURS for lang in ("zh", "en")]
        seconds = []
        for i in range(args.queries):
            started = time.perf_counter()
            index.search_text(embedder, texts[i % len(texts)], k=10)
            seconds.append(time.perf_counter() - started)
        memory = run_memory_child(__file__, ["--_build", str(folder), "--batch_size", str(args.batch_size),
                                             "--dtype", args.dtype, *(["--clip_model", args.clip_model]
                                                                      if args.clip_model else []),
                                             *(["--threads", str(args.threads)] if args.threads else [])])
    result = {"model": embedder.name, "dtype": args.dtype, "device": str(embedder.device), "n": args.n,
              "size": args.size, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "cpu": cpu_name(), "build_seconds": build.seconds, "build_images_per_s": args.n / build.seconds,
              "rerun_seconds": again.seconds, "embed_images_per_s": embed_rate,
              "text_query_ms_median": 1000 * statistics.median(seconds),
              "text_queries_per_s": len(seconds) / sum(seconds), "peak_build_bytes": memory["peak_bytes"]}
    rows = [(f"{args.n} JPEGs of {args.size}x{args.size}, {embedder.name}, {args.dtype} on {embedder.device}, "
             f"{torch.get_num_threads()} thread(s)", ""),
            ("whole build: images/s (seconds)", f"{result['build_images_per_s']:.0f} ({build.seconds:.1f} s)"),
            ("embedding alone (decoded pictures): images/s", f"{embed_rate:.0f}"),
            ("re-run with nothing new: seconds", f"{again.seconds:.2f}"),
            ("text query (embed + exact search, k=10): median ms | queries/s",
             f"{result['text_query_ms_median']:.2f} | {result['text_queries_per_s']:.0f}"),
            ("peak memory of a build, MB", f"{memory['peak_bytes'] / 2**20:.0f}")]
    report(rows, result, args.json)


if __name__ == "__main__":
    sys.exit(main())
