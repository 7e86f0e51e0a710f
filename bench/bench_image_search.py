"""Searching an image index (glm_tune.image_index) of 10,000 CLIP-sized vectors: queries per second with exact search
(flat) and with IVF at its default nprobe (and a few others), IVF's top-1 recall against exact search, build time and
peak memory.

    python bench/bench_image_search.py                                  # 10,000 random unit vectors of 512 dims
    python bench/bench_image_search.py --threads 1 --data clustered --n 50000 --json out.json

The index is built by the real build (build_image_index): every vector is a 1x1 PNG file whose colour spells its row
number, and a lookup "embedder" returns that row, so the build time is the index's own cost per image (hashing,
decoding, faiss, writing) without a model's. Searches go through ImageIndex.search_vector (one query at a time, as
the app asks) and search_vectors (all queries in one call).

Vectors (--data): `random`, unit vectors drawn uniformly (no structure at all: IVF's worst case), or `clustered`,
groups of vectors around 100 centres (cosine ~0.7 to their centre, ~0.5 between two of a group, ~0 between
groups), as the embeddings of a photo collection are. Queries: `near`, an indexed vector plus noise (cosine
--query_cosine to it: "a photo like one in the collection"), and `random`, independent unit vectors, which are near
nothing (a stand-in for queries unlike any image, which a text query tends to be); recall is given for both. Peak
memory (RSS) is taken in a fresh process that opens the index and runs the queries, next to that process's RSS
before opening it.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

from _common import cpu_name, report, report_memory, rss_bytes, run_memory_child
from glm_tune.image_index import (IVF_THRESHOLD, ImageIndex, build_image_index, default_nprobe, ivf_lists,
                                  make_faiss_index)

CLUSTERS = 100


class LookupEmbedder:
    """Image i (a 1x1 PNG whose colour spells i) -> vectors[i]."""

    name = "bench-lookup"

    def __init__(self, vectors):
        self.vectors, self.dim = vectors, vectors.shape[1]

    def embed_images(self, images, batch_size=32):
        return self.vectors[[r * 65536 + g * 256 + b for r, g, b in (im.getpixel((0, 0)) for im in images)]]

    def embed_texts(self, texts, batch_size=64):
        raise NotImplementedError("the bench searches by vector")


def unit(rows):
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def make_vectors(args):
    """(indexed vectors, {query kind: queries}), the same for every process (seeded)."""
    rng = np.random.default_rng(args.seed)
    n, dim = args.n, args.dim
    if args.data == "random":
        vectors = unit(rng.standard_normal((n, dim)))
    else:  # centre + noise of the same length: cosine ~0.7 to the centre, ~0.5 between two of one group
        centres = unit(rng.standard_normal((CLUSTERS, dim)))
        vectors = unit(centres[rng.integers(0, CLUSTERS, n)] + unit(rng.standard_normal((n, dim))))
    # noise orthogonal-ish to the source, scaled so that cos(query, source) ~ query_cosine
    sources = vectors[rng.integers(0, n, args.queries)]
    noise = unit(rng.standard_normal((args.queries, dim)))
    near = unit(args.query_cosine * sources + np.sqrt(1 - args.query_cosine**2) * noise)
    return vectors, {"near": near, "random": unit(rng.standard_normal((args.queries, dim)))}


def write_images(folder, n):
    for i in range(n):
        Image.new("RGB", (1, 1), (i // 65536, i // 256 % 256, i % 256)).save(folder / f"{i:07d}.png")


def time_one_at_a_time(index, queries, k, nprobe=None):
    """Queries per second, each query its own search_vector call (median of 3 passes over the queries)."""
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        for query in queries:
            index.search_vector(query, k, nprobe)
        rates.append(len(queries) / (time.perf_counter() - started))
    return statistics.median(rates)


def time_batch(index, queries, k, nprobe=None):
    started = time.perf_counter()
    index.search_vectors(queries, k, nprobe)
    return len(queries) / (time.perf_counter() - started)


def top1(index, queries, nprobe=None):
    return np.array([hits[0].id for hits in index.search_vectors(queries, 1, nprobe)])


def memory_child(args):
    """Open the index in args._memory_dir and run the `near` queries (saved beside it); report the peak RSS meanwhile
    and the RSS before. The interpreter, numpy, faiss and torch (which bench/_common imports) peak higher while
    importing than a 10,000-image index needs, so the peak is reset first (clear_refs 5: VmHWM back to VmRSS)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = rss_bytes("VmRSS")
    queries = np.load(Path(args._memory_dir).parent / "queries.npy")
    index = ImageIndex.open(args._memory_dir)
    for query in queries:
        index.search_vector(query, args.k)
    index.search_vectors(queries, args.k)
    report_memory({"peak_rss_bytes": rss_bytes("VmHWM"), "before_open_rss_bytes": before})


def bench_type(args, folder, vectors, queries, index_type, exact_top1):
    """Build `index_type` over the image files in `folder`, then time and check its searches."""
    index_dir = folder.parent / f"index-{index_type}"
    built = build_image_index(folder, index_dir, LookupEmbedder(vectors), index_type=index_type,
                              batch_size=256, progress=False)
    started = time.perf_counter()
    make_faiss_index(vectors, index_type)
    faiss_seconds = time.perf_counter() - started
    index = ImageIndex.open(index_dir)
    for query in queries["near"][:50]:  # warm-up
        index.search_vector(query, args.k)
    result = {"index_type": index_type, "nlist": index.nlist, "nprobe": index.nprobe,
              "build_seconds": built.seconds, "faiss_seconds": faiss_seconds,
              "qps_one_at_a_time": time_one_at_a_time(index, queries["near"], args.k),
              "qps_batch": time_batch(index, queries["near"], args.k)}
    if index_type == "ivf":
        nprobes = sorted({max(1, index.nprobe // 4), max(1, index.nprobe // 2), index.nprobe,
                          min(index.nlist, 2 * index.nprobe), min(index.nlist, 4 * index.nprobe)})
        result["sweep"] = [{"nprobe": p, "qps_one_at_a_time": time_one_at_a_time(index, queries["near"], args.k, p),
                            **{f"recall_{kind}": float(np.mean(top1(index, q, p) == exact_top1[kind]))
                               for kind, q in queries.items()}} for p in nprobes]
    result.update(run_memory_child(Path(__file__).resolve(), [*sys.argv[1:], "--_memory_dir", str(index_dir)]))
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="indexed vectors (default: 10000)")
    p.add_argument("--dim", type=int, default=512, help="vector size (default: 512, CLIP ViT-B)")
    p.add_argument("--data", choices=["random", "clustered"], default="random",
                   help="indexed vectors (default: random)")
    p.add_argument("--queries", type=int, default=1000, help="queries of each kind (default: 1000)")
    p.add_argument("--query_cosine", type=float, default=0.8,
                   help="cosine of a `near` query to the indexed vector it was made from (default: 0.8)")
    p.add_argument("--k", type=int, default=10, help="hits per query (default: 10)")
    p.add_argument("--threads", type=int, default=None, help="faiss (OpenMP) threads (default: faiss's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--_memory_dir", help=argparse.SUPPRESS)  # the child: open this index and search it
    args = p.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    if args._memory_dir:
        return memory_child(args)

    vectors, queries = make_vectors(args)
    exact_top1 = {kind: np.argmax(q @ vectors.T, axis=1) for kind, q in queries.items()}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-image-search-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        np.save(Path(tmp) / "queries.npy", queries["near"])  # for the memory child
        started = time.perf_counter()
        write_images(folder, args.n)
        print(f"wrote {args.n} image files in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        for index_type in ("flat", "ivf"):
            results[index_type] = bench_type(args, folder, vectors, queries, index_type, exact_top1)
    flat, ivf = results["flat"], results["ivf"]
    default = next(s for s in ivf["sweep"] if s["nprobe"] == ivf["nprobe"])
    mb = 1 / 2**20
    rows = [(f"{args.n} x {args.dim} {args.data} vectors, k={args.k}, {faiss.omp_get_max_threads()} thread(s)", ""),
            ("exact (flat): queries/s one at a time | in one batch",
             f"{flat['qps_one_at_a_time']:.0f} ({1000 / flat['qps_one_at_a_time']:.2f} ms each) | "
             f"{flat['qps_batch']:.0f}"),
            (f"IVF ({ivf['nlist']} lists, nprobe {ivf['nprobe']}): queries/s one at a time | in one batch",
             f"{ivf['qps_one_at_a_time']:.0f} ({1000 / ivf['qps_one_at_a_time']:.2f} ms each) | "
             f"{ivf['qps_batch']:.0f}"),
            (f"IVF nprobe {ivf['nprobe']}: top-1 recall vs exact, near | random queries",
             f"{default['recall_near']:.3f} | {default['recall_random']:.3f}")]
    rows += [(f"  IVF nprobe {s['nprobe']}: queries/s one at a time; recall near | random",
              f"{s['qps_one_at_a_time']:.0f}; {s['recall_near']:.3f} | {s['recall_random']:.3f}") for s in ivf["sweep"]]
    rows += [("build s, whole build without a model: flat | IVF",
              f"{flat['build_seconds']:.2f} | {ivf['build_seconds']:.2f}"),
             ("faiss index alone s (IVF: k-means + add): flat | IVF",
              f"{flat['faiss_seconds']:.3f} | {ivf['faiss_seconds']:.3f}"),
             ("peak RSS MB open + search, above the process before: flat | IVF",
              " | ".join(f"{(r['peak_rss_bytes'] - r['before_open_rss_bytes']) * mb:.1f}" for r in (flat, ivf))
              + f" (before: {flat['before_open_rss_bytes'] * mb:.0f})"),
             ("auto threshold (IVF from this many images)", f"{IVF_THRESHOLD}")]
    report(rows, {"n": args.n, "dim": args.dim, "data": args.data, "queries": args.queries,
                  "query_cosine": args.query_cosine, "k": args.k, "threads": faiss.omp_get_max_threads(),
                  "cpu": cpu_name(), "faiss": faiss.__version__, "ivf_threshold": IVF_THRESHOLD,
                  "nlist_rule": ivf_lists(args.n), "default_nprobe": default_nprobe(ivf_lists(args.n)),
                  "results": results}, args.json)


if __name__ == "__main__":
    sys.exit(main())
