"""An image index on disk: the images of a folder embedded by an image-text model (CLIP) and kept in a FAISS index,
searched by text, by an image, or by an indexed image; later builds update it in place of rebuilding.

    image folder --------> files ---------------> pictures ------------> vectors ----------> index folder
    .jpg .jpeg .png .webp  sha256 of each file    decoded in threads,    embedder, in       index.faiss,
    (nested; hidden ones   decides what is new    turned as EXIF says,   batches, unit      vectors.npy,
     skipped)                                     alpha over white       length             images.jsonl, manifest.json

The embedder is any object with `name`, `dim`, `embed_images(images, batch_size)` and `embed_texts(texts,
batch_size)` returning float32 rows of unit length (glm_tune.clip_model's ClipEmbedder is one), so that an inner
product is a cosine and a text and an image can be compared.

The folder holds nothing that runs code when read:

    index.faiss     the search structure (faiss.write_index): exact (IndexFlatIP) or IVF (IndexIVFFlat, inner product)
    vectors.npy     float32 (n, dim), row i = the embedding of image i (np.save, read with allow_pickle=False)
    images.jsonl    row i = image i: {"id": i, "path": relative to the image folder (posix), "sha256", "size" (bytes),
                    "width", "height" (as shown, EXIF orientation applied)}
    manifest.json   kind, format version, model name and dim, image folder (absolute), index type, nlist and nprobe
                    (IVF), the image count and what the last build did

Ids are positions: images are kept sorted by path, and image i is row i of images.jsonl, row i of vectors.npy and
vector i of the faiss index (which numbers vectors in the order they are added, so no IndexIDMap is needed). A build
that removes an image renumbers the ones after it; the stable name of an image is its path.

Building again syncs rather than re-embeds: an image whose content (sha256) is already in the index keeps its vector
(read back from vectors.npy, never embedded again), whatever its path, so a moved or renamed image costs nothing; new
and changed images are embedded; deleted images' vectors go. The faiss index is then made afresh from all the vectors
(seconds, even for 10^5 images: nothing next to embedding them), so an updated index and one built from scratch are the
same. An index stays with the model it was built with (vectors of two models are not comparable): building into it
with another model is an error unless rebuild=True, which embeds everything again. Every build writes a whole new
folder beside the old one and swaps it in (glm_tune.atomic.atomic_dir), holding a lock on the index meanwhile
(glm_tune.locking): a failed or interrupted build leaves the old index exactly as it was.

Exact search costs one dot product per image per query: ~0.5 ms at 10,000 images of 512 dimensions on one CPU core,
4 ms at 50,000 (bench/bench_image_search.py), so below IVF_THRESHOLD images the index is exact. From there on it is
an inverted file (IVF): the vectors are clustered into nlist lists (k-means) and a query scans only the nprobe lists
nearest to it, which is faster by about nlist / nprobe but may miss a match that sits in another list (recall below
1); nprobe can be raised per search.

A file that cannot be decoded is one line on stderr, `warning: PATH: not a readable image (why), skipped`, and the
rest is indexed.
"""

import hashlib
import io
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from glm_tune.atomic import atomic_dir
from glm_tune.errors import UserError, first_line, warn
from glm_tune.locking import hold_output_lock

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
INDEX_FILE, VECTORS_FILE, ENTRIES_FILE, MANIFEST_FILE = "index.faiss", "vectors.npy", "images.jsonl", "manifest.json"
KIND, FORMAT = "image index", 1
INDEX_TYPES = ("auto", "flat", "ivf")
BUILD_HINT = "build one with build_index.py"
REBUILD_HINT = "rebuild it with build_index.py --rebuild"

# Exact search below this many images, IVF from it on. bench/bench_image_search.py, 512 dims, one CPU core: an exact
# query takes 0.5 ms at 10,000 images, 4 ms at 50,000, 8 ms at 100,000 (memory-bound from there on: linear in the
# count). Below 50,000, IVF would save at most a few milliseconds a query and lose exactness; above, it keeps search
# interactive (IVF at 50,000: 0.7 ms, 6x faster, at 100,000: 1.4 ms).
IVF_THRESHOLD = 50_000
# faiss's k-means wants at least 39 training points per list (it warns below that); nlist ~ 4 sqrt(n) otherwise.
MIN_POINTS_PER_LIST = 39
# The share of lists a query scans by default. In the bench, 1/8 finds the exact top-1 for >99.9% of queries near an
# indexed vector and for ~97% of queries near none (as text queries are: CLIP's text and image vectors lie apart) in
# clustered data; 1/16 is twice as fast but finds only ~90% of the latter.
NPROBE_SHARE = 1 / 8
IVF_SEED = 1234  # k-means initialisation: the same vectors always give the same lists

DECODE_THREADS = 4
# Pictures are decoded (JPEG: at a reduced scale) and shrunk until their shorter side is at most this: twice the
# input of most CLIP models (224-336 px) and above SigLIP's 512, while a batch of 32 photos stays under ~100 MB.
DECODE_SHORT_SIDE = 768
WHITE = (255, 255, 255)


# ----------------------------------------------------------------------------------------------------------------------
# Finding and decoding images


class NotAnImage(Exception):
    """A file Pillow cannot decode; the message says why in a few words ("unknown format", "image file is
    truncated")."""


def find_images(img_dir, exclude=None):
    """{relative posix path: path} of the images under `img_dir`, sorted; hidden files and folders are skipped, and
    so is `exclude` (an index kept inside the folder it indexes)."""
    img_dir = Path(img_dir)
    exclude = Path(exclude).resolve() if exclude else None
    found = {}
    for folder, subfolders, names in os.walk(img_dir):
        folder = Path(folder)
        subfolders[:] = [s for s in subfolders if not s.startswith(".") and (folder / s).resolve() != exclude]
        for name in names:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found[(folder / name).relative_to(img_dir).as_posix()] = folder / name
    return dict(sorted(found.items()))


@dataclass
class Picture:
    """A decoded image as the embedder sees it, and the file's own size (as shown, EXIF orientation applied)."""

    image: Image.Image
    width: int
    height: int


def decode_image(file):
    """The Picture in `file` (a path or a binary file object); NotAnImage when Pillow cannot decode it."""
    try:
        with Image.open(file) as image:
            original = image.size
            image.draft("RGB", (DECODE_SHORT_SIDE, DECODE_SHORT_SIDE))  # a JPEG decodes at 1/2-1/8 scale if large
            image.load()
            turned = ImageOps.exif_transpose(image)
            swapped = turned.size != image.size
            picture = prepare_image(turned, turn=False)
    except UnidentifiedImageError:
        raise NotAnImage("unknown format") from None
    except Exception as err:  # Pillow raises many kinds on a damaged file (OSError, SyntaxError, ValueError, ...)
        raise NotAnImage(first_line(err)) from None
    width, height = original[::-1] if swapped else original
    return Picture(picture, width, height)


def prepare_image(image, turn=True):
    """`image` as the index embeds it: turned as its EXIF says, transparency shown over white (read as plain RGB,
    transparent pixels turn black), RGB, its shorter side at most DECODE_SHORT_SIDE."""
    if turn:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale: Pillow's own conversion clips at 255
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) >> 8, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba)
    image = image.convert("RGB")
    scale = DECODE_SHORT_SIDE / min(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def load_query_image(source, name="upload"):
    """An image to search with, prepared as the index's images are: `source` is a path, the bytes of an image file
    (named `name` in messages) or a PIL image. A file that is not an image is a one-line UserError."""
    if isinstance(source, Image.Image):
        return prepare_image(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        where, file = name, io.BytesIO(bytes(source))
    else:
        where = file = Path(source)
        if not file.is_file():
            raise UserError(f"{where}: no such file" if not file.exists() else f"{where}: not a file")
    try:
        return decode_image(file).image
    except NotAnImage as why:
        raise UserError(f"{where}: not an image ({why})") from None


def file_digest(path):
    """(sha256 hex, size in bytes) of a file's content, read in 1 MiB pieces."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while piece := handle.read(1 << 20):
            digest.update(piece)
            size += len(piece)
    return digest.hexdigest(), size


def _digest_or_why(path):
    """((sha256, size), None), or (None, why the file cannot be read)."""
    try:
        return file_digest(path), None
    except OSError as err:
        return None, f"cannot read the file: {err.strerror or first_line(err)}"


# ----------------------------------------------------------------------------------------------------------------------
# The faiss index


def choose_index_type(n, index_type="auto"):
    """"flat" or "ivf" for `n` vectors: `auto` is exact below IVF_THRESHOLD, IVF from it on."""
    check_index_type(index_type)
    if index_type == "auto":
        return "ivf" if n >= IVF_THRESHOLD else "flat"
    return index_type


def check_index_type(index_type):
    if index_type not in INDEX_TYPES:
        raise UserError(f"--index_type {index_type}: choose one of {', '.join(INDEX_TYPES)}")
    return index_type


def ivf_lists(n):
    """nlist for `n` vectors: about 4 sqrt(n) (faiss's rule of thumb), but with at least MIN_POINTS_PER_LIST vectors
    to train each list on, and at least one list."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def default_nprobe(nlist):
    return max(1, min(nlist, math.ceil(nlist * NPROBE_SHARE)))


@dataclass
class FaissIndex:
    """A faiss index of vectors 0..n-1 and what a search of it needs to know."""

    index: object  # faiss.IndexFlatIP or faiss.IndexIVFFlat (inner product)
    index_type: str  # "flat" or "ivf"
    nlist: int | None = None
    nprobe: int | None = None


def make_faiss_index(vectors, index_type="auto"):
    """A FaissIndex of `vectors` (float32, n x dim, unit rows); vector i gets id i. IVF training is deterministic
    (fixed k-means seed), so the same vectors always give the same index."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    kind = choose_index_type(n, index_type)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return FaissIndex(index, "flat")
    nlist = ivf_lists(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = IVF_SEED
    index.cp.spherical = True  # unit-length centroids, so that the nearest list by inner product is the right one
    index.cp.min_points_per_centroid = 1  # ivf_lists already keeps to faiss's minimum where n allows; no warning
    index.train(vectors)
    index.add(vectors)
    return FaissIndex(index, "ivf", nlist, default_nprobe(nlist))


def search_faiss(faiss_index, queries, k, nprobe=None):
    """(scores, ids), each (len(queries), k), best first, ties by id. IVF scans `nprobe` lists (default: the index's);
    where those hold fewer than k vectors, the query is asked again scanning twice as many, so k ids always come
    back (k <= the vector count)."""
    import faiss

    index = faiss_index.index
    if faiss_index.index_type == "flat":
        scores, ids = index.search(queries, k)
    else:
        # Per-call parameters, not index.nprobe: searches from several threads share one index.
        nprobe = min(faiss_index.nlist, nprobe or faiss_index.nprobe)
        scores, ids = index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        short = np.flatnonzero((ids < 0).any(axis=1))
        while len(short) and nprobe < faiss_index.nlist:
            nprobe = min(faiss_index.nlist, 2 * nprobe)
            scores[short], ids[short] = index.search(queries[short], k, params=faiss.SearchParametersIVF(nprobe=nprobe))
            short = short[(ids[short] < 0).any(axis=1)]
    order = np.lexsort((ids, -scores), axis=1)  # best first; equal scores by id, so every run lists them alike
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


# ----------------------------------------------------------------------------------------------------------------------
# The index folder


@dataclass(frozen=True)
class ImageEntry:
    """One indexed image: a row of images.jsonl."""

    id: int
    path: str  # relative to the image folder, posix
    sha256: str
    size: int  # bytes
    width: int
    height: int


def is_image_index(folder):
    """True when `folder` holds an image index's manifest (damaged or not: one that does not parse counts, so that
    --rebuild can replace it); False for an empty folder or one of something else (a knowledge base, photos)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except OSError:
        return False
    except ValueError:
        return True
    return not isinstance(manifest, dict) or manifest.get("kind") == KIND


@dataclass
class StoredImages:
    """An index folder's images and vectors, in memory (the vectors memory-mapped from vectors.npy)."""

    manifest: dict
    entries: list  # ImageEntry, in id order
    vectors: np.ndarray  # float32 (n, dim), row i = image i


def read_index(index_dir, with_faiss=True):
    """(StoredImages, FaissIndex) of an index folder (FaissIndex None unless `with_faiss`: a build makes its own). A
    missing index is a one-line UserError saying how to build one, a damaged one a one-line UserError naming the
    file."""
    import faiss

    index_dir = Path(index_dir)
    if not is_image_index(index_dir):
        raise UserError(f"--index_dir {index_dir}: no image index ({BUILD_HINT})")
    where, faiss_index = MANIFEST_FILE, None
    try:
        manifest = json.loads((index_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"image index format {manifest.get('format')!r}, this version reads {FORMAT}")
        missing = [key for key in ("model", "dim", "images", "index_type") if key not in manifest]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        n, dim, index_type = manifest["images"], manifest["dim"], manifest["index_type"]
        if index_type not in ("flat", "ivf"):
            raise ValueError(f"index type {index_type!r}")
        where = ENTRIES_FILE
        entries = [ImageEntry(**json.loads(line))
                   for line in (index_dir / ENTRIES_FILE).read_text(encoding="utf-8").splitlines()]
        if len(entries) != n or [e.id for e in entries] != list(range(n)):
            raise ValueError(f"{len(entries)} rows for {n} images, or ids not 0, 1, 2... in order")
        where = VECTORS_FILE
        vectors = np.load(index_dir / VECTORS_FILE, mmap_mode="r", allow_pickle=False)
        if vectors.dtype != np.float32 or vectors.shape != (n, dim):
            raise ValueError(f"{vectors.dtype} {vectors.shape}, not float32 ({n}, {dim})")
        if with_faiss:
            where = INDEX_FILE
            index = faiss.read_index(str(index_dir / INDEX_FILE))
            if index.ntotal != n or index.d != dim:
                raise ValueError(f"{index.ntotal} vectors of {index.d} dimensions, not {n} of {dim}")
            faiss_index = FaissIndex(index, index_type, manifest.get("nlist"), manifest.get("nprobe"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:  # faiss: RuntimeError
        raise UserError(f"--index_dir {index_dir}: damaged image index ({where}: {first_line(err)}); "
                        f"{REBUILD_HINT}") from None
    return StoredImages(manifest, entries, vectors), faiss_index


def _write_folder(folder, manifest, entries, vectors, faiss_index):
    import faiss

    faiss.write_index(faiss_index.index, str(folder / INDEX_FILE))
    np.save(folder / VECTORS_FILE, vectors, allow_pickle=False)
    with open(folder / ENTRIES_FILE, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(asdict(entry), ensure_ascii=False) + "\n" for entry in entries)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------------
# Building and syncing


@dataclass
class BuildReport:
    """What a build did. Files: added, changed, unchanged, removed (gone from the folder), skipped ([(path, why)]);
    embedded: images that went through the embedder (new contents only); total: images in the index now. A skipped
    file's reason is what its warning line shows in brackets: `PATH: not a readable image (reason), skipped`."""

    index_dir: str
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    embedded: int = 0
    skipped: list = field(default_factory=list)
    total: int = 0
    index_type: str = "flat"
    nlist: int | None = None
    nprobe: int | None = None
    seconds: float = 0.0

    def describe(self):
        """One line saying what the build did."""
        files = ", ".join(f"{getattr(self, k)} {k}" for k in ("added", "changed", "unchanged", "removed"))
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        kind = f"IVF index ({self.nlist} lists, nprobe {self.nprobe})" if self.index_type == "ivf" else "exact index"
        return (f"{self.index_dir}: {self.total} images ({files}{skipped}); {self.embedded} embedded; {kind}; "
                f"{self.seconds:.1f} s")


def build_image_index(img_dir, index_dir, embedder, index_type="auto", batch_size=32, rebuild=False, progress=True):
    """Index (or sync the index of) every image under `img_dir` into `index_dir` with `embedder`; -> BuildReport.

    index_type: "auto" (exact below IVF_THRESHOLD images, IVF from there), "flat" or "ivf". rebuild=True ignores the
    existing index and embeds everything (the way to change the model). progress: tqdm bars on stderr."""
    started = time.perf_counter()
    img_dir, index_dir = Path(img_dir), Path(index_dir)
    check_index_type(index_type)
    if batch_size < 1:
        raise UserError(f"--batch_size {batch_size}: must be at least 1")
    _check_folders(img_dir, index_dir)
    with hold_output_lock(index_dir, "--index_dir"):
        old = None if rebuild or not is_image_index(index_dir) else read_index(index_dir, with_faiss=False)[0]
        built = (old.manifest["model"], old.manifest["dim"]) if old else None
        if built and built != (embedder.name, embedder.dim):
            raise UserError(f"--index_dir {index_dir}: built with model {built[0]} ({built[1]} dimensions), not "
                            f"{embedder.name} ({embedder.dim}); add --rebuild to embed every image again with "
                            f"{embedder.name}, or choose another --index_dir")
        files = find_images(img_dir, exclude=index_dir)
        if not files:
            raise UserError(f"--img_dir {img_dir}: no images ({' '.join(IMAGE_SUFFIXES)}) found")
        report = BuildReport(str(index_dir))
        with atomic_dir(index_dir) as tmp:
            entries, vectors = _sync(old, files, embedder, batch_size, progress, report)
            if not entries:
                raise UserError(f"--img_dir {img_dir}: none of its {len(files)} images could be read (see the "
                                "warnings above)")
            faiss_index = make_faiss_index(vectors, index_type)
            report.total, report.index_type = len(entries), faiss_index.index_type
            report.nlist, report.nprobe = faiss_index.nlist, faiss_index.nprobe
            report.seconds = time.perf_counter() - started
            _write_folder(tmp, _manifest(embedder, img_dir, report), entries, vectors, faiss_index)
    report.seconds = time.perf_counter() - started
    return report


def _check_folders(img_dir, index_dir):
    if not img_dir.is_dir():
        raise UserError(f"--img_dir {img_dir}: " + ("no such folder" if not img_dir.exists() else "not a folder"))
    if index_dir.resolve() == img_dir.resolve() or index_dir.resolve() in img_dir.resolve().parents:
        raise UserError(f"--index_dir {index_dir}: holds the --img_dir folder {img_dir}; choose another folder (a "
                        "build replaces the whole index folder)")
    if index_dir.exists() and not index_dir.is_dir():
        raise UserError(f"--index_dir {index_dir}: not a folder")
    if index_dir.exists() and any(index_dir.iterdir()) and not is_image_index(index_dir):
        raise UserError(f"--index_dir {index_dir}: exists and is not an image index (no image-index {MANIFEST_FILE}); "
                        "choose a new or empty folder (a build replaces the whole folder)")


def _manifest(embedder, img_dir, report):
    return {"kind": KIND, "format": FORMAT, "model": embedder.name, "dim": int(embedder.dim),
            "img_dir": str(img_dir.absolute()), "index_type": report.index_type, "nlist": report.nlist,
            "nprobe": report.nprobe, "images": report.total,
            "built": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "build_seconds": round(report.seconds, 3),
            "last_build": {k: getattr(report, k) for k in ("added", "changed", "unchanged", "removed", "embedded")}
                          | {"skipped": len(report.skipped)}}


def _sync(old, files, embedder, batch_size, progress, report):
    """(entries, vectors) of the new index, sorted by path: a content the old index holds keeps its vector, the
    others are embedded (each distinct content once). Counts go into `report`."""
    from tqdm.auto import tqdm

    old_by_path = {e.path: e for e in old.entries} if old else {}
    old_by_digest = {e.sha256: e for e in old.entries} if old else {}
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="image-index") as pool:
        digests = list(tqdm(pool.map(_digest_or_why, files.values()), total=len(files), desc="hashing",
                            unit="image", disable=not progress))
        found = {}  # relative path -> (sha256, size)
        for (relative, path), (digest, why) in zip(files.items(), digests):
            if why:
                _skip(report, path, why)
            else:
                found[relative] = digest
        to_embed = {}  # sha256 -> the first path with that content
        for relative, (sha256, _) in found.items():
            if sha256 not in old_by_digest:
                to_embed.setdefault(sha256, files[relative])
        pictures, new_vectors, failed = _embed(pool, embedder, to_embed, batch_size, progress, report)
    entries, rows = [], []
    for relative, (sha256, size) in found.items():
        if sha256 in old_by_digest:
            source = old_by_digest[sha256]
            width, height, row = source.width, source.height, old.vectors[source.id]
        elif sha256 in new_vectors:
            (width, height), row = pictures[sha256], new_vectors[sha256]
        else:
            _skip(report, files[relative], failed[sha256])  # every file of that content
            continue
        before = old_by_path.get(relative)
        status = "added" if before is None else "unchanged" if before.sha256 == sha256 else "changed"
        setattr(report, status, getattr(report, status) + 1)
        entries.append(ImageEntry(len(entries), relative, sha256, size, width, height))
        rows.append(row)
    report.removed = sum(1 for path in old_by_path if path not in files)
    vectors = np.array(rows, dtype=np.float32).reshape(len(rows), embedder.dim)
    return entries, vectors


def _skip(report, path, reason):
    report.skipped.append((str(path), reason))
    warn(f"{path}: not a readable image ({reason}), skipped")


def _embed(pool, embedder, to_embed, batch_size, progress, report):
    """Embed the images of `to_embed` ({sha256: path}) in batches, decoding the next batch in `pool` while the
    embedder works on this one. -> ({sha256: (width, height)}, {sha256: vector}, {sha256: why not})."""
    from tqdm.auto import tqdm

    sizes, vectors, failed = {}, {}, {}
    jobs = list(to_embed.items())
    with tqdm(total=len(jobs), desc="embedding", unit="image", disable=not progress or not jobs) as bar:
        for batch in _decoded_batches(pool, jobs, batch_size):
            good = [(sha256, picture) for (sha256, _), picture in batch if isinstance(picture, Picture)]
            failed.update((sha256, str(why)) for (sha256, _), why in batch if isinstance(why, NotAnImage))
            if good:
                rows = np.asarray(embedder.embed_images([p.image for _, p in good], batch_size=batch_size))
                if rows.shape != (len(good), embedder.dim):
                    raise ValueError(f"embedder {embedder.name} returned vectors of shape {rows.shape} for "
                                     f"{len(good)} images, not ({len(good)}, {embedder.dim})")
                for (sha256, picture), row in zip(good, rows):
                    sizes[sha256], vectors[sha256] = (picture.width, picture.height), row
                report.embedded += len(good)
            bar.update(len(batch))
    return sizes, vectors, failed


def _decoded_batches(pool, jobs, batch_size):
    """[((sha256, path), Picture or NotAnImage)] for each batch of `jobs`, in order; the next batch decodes in `pool`
    while the caller embeds this one (so at most two batches of pictures are in memory)."""
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]

    def submit(batch):
        return [pool.submit(decode_image, path) for _, path in batch]

    ahead = submit(batches[0]) if batches else []
    for number, batch in enumerate(batches):
        current, ahead = ahead, submit(batches[number + 1]) if number + 1 < len(batches) else []
        yield [(job, _picture_or_why(future)) for job, future in zip(batch, current)]


def _picture_or_why(future):
    try:
        return future.result()
    except NotAnImage as why:
        return why


# ----------------------------------------------------------------------------------------------------------------------
# Searching


@dataclass(frozen=True)
class Hit:
    """One image found: its id, its path (absolute: the image folder / relative_path) and its score (the inner
    product of unit vectors: the cosine, 1 for the same image)."""

    id: int
    path: str
    relative_path: str
    score: float


class ImageIndex:
    """An index folder opened for searching. Nothing changes after opening, and faiss searches are read-only (the IVF
    nprobe is passed per call), so threads (a web server's sessions) can share one.

        index = ImageIndex.open("image_index")
        for hit in index.search_text(embedder, "a red bicycle", k=8):
            print(hit.path, hit.score)
    """

    def __init__(self, index_dir, stored, faiss_index):
        self.index_dir = Path(index_dir)
        self.manifest = stored.manifest
        self._entries = tuple(stored.entries)
        self._by_path = {e.path: e for e in self._entries}
        self.vectors = stored.vectors  # row i = image i (read-only, memory-mapped from vectors.npy)
        self.faiss_index = faiss_index

    @classmethod
    def open(cls, index_dir):
        """The index in `index_dir`; none there is a one-line UserError, a damaged one a one-line UserError naming the
        file."""
        return cls(index_dir, *read_index(index_dir))

    @property
    def model(self):
        """The name of the embedder the index was built with; searching needs the same one."""
        return self.manifest["model"]

    @property
    def dim(self):
        return self.manifest["dim"]

    @property
    def size(self):
        return len(self._entries)

    def __len__(self):
        return self.size

    @property
    def img_dir(self):
        return Path(self.manifest["img_dir"])

    @property
    def index_type(self):
        return self.faiss_index.index_type

    @property
    def nlist(self):
        return self.faiss_index.nlist

    @property
    def nprobe(self):
        """IVF lists a search scans unless told otherwise (None for an exact index)."""
        return self.faiss_index.nprobe

    @property
    def entries(self):
        """ImageEntry per image, in id order."""
        return self._entries

    def entry(self, path_or_id):
        """The ImageEntry of an id, or of a path (relative to the image folder, or absolute inside it); one that is
        not in the index is a one-line UserError."""
        if isinstance(path_or_id, (int, np.integer)) and not isinstance(path_or_id, bool):
            if not 0 <= path_or_id < self.size:
                raise UserError(f"--id {path_or_id}: not in the index (ids 0-{self.size - 1})")
            return self._entries[path_or_id]
        path = Path(path_or_id)
        if path.is_absolute() and path.resolve().is_relative_to(self.img_dir.resolve()):
            path = path.resolve().relative_to(self.img_dir.resolve())
        entry = self._by_path.get(path.as_posix())
        if entry is None:
            raise UserError(f"{path_or_id}: not in the image index {self.index_dir}")
        return entry

    def search_vectors(self, vectors, k, nprobe=None):
        """The `k` best images for each query vector (rows of unit length, the index's dim), best first."""
        self._check_k(k)
        if nprobe is not None and nprobe < 1:
            raise UserError(f"--nprobe {nprobe}: must be at least 1")
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        queries = queries.reshape(1, -1) if queries.ndim == 1 else queries
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query vectors of shape {queries.shape}; the index holds {self.dim}-dimensional ones")
        scores, ids = search_faiss(self.faiss_index, queries, k, nprobe)
        return [[self._hit(int(i), float(s)) for i, s in zip(row_ids, row_scores)]
                for row_ids, row_scores in zip(ids, scores)]

    def search_vector(self, vector, k, nprobe=None):
        """The `k` best images for one query vector, best first."""
        return self.search_vectors(np.asarray(vector).reshape(1, -1), k, nprobe)[0]

    def search_text(self, embedder, text, k, nprobe=None):
        """The `k` images that best match `text` (an empty text finds nothing)."""
        self._check_embedder(embedder)
        self._check_k(k)
        if not text.strip():
            return []
        return self.search_vector(embedder.embed_texts([text])[0], k, nprobe)

    def search_image(self, embedder, image, k, nprobe=None, name="upload"):
        """The `k` images most like `image` (a path, an image file's bytes, named `name` in messages, or a PIL
        image), prepared as indexed images are."""
        self._check_embedder(embedder)
        self._check_k(k)
        return self.search_vector(embedder.embed_images([load_query_image(image, name)])[0], k, nprobe)

    def more_like(self, path_or_id, k, nprobe=None):
        """The `k` images most like an indexed one (searched with its stored vector; no embedder needed), itself
        first."""
        entry = self.entry(path_or_id)
        hits = self.search_vector(self.vectors[entry.id], k, nprobe)
        itself = [h for h in hits if h.id == entry.id] or [self._hit(entry.id, float(self.vectors[entry.id] @
                                                                                   self.vectors[entry.id]))]
        return (itself + [h for h in hits if h.id != entry.id])[:k]  # an identical copy would tie with it

    def _hit(self, image_id, score):
        relative = self._entries[image_id].path
        return Hit(image_id, str(self.img_dir / relative), relative, score)

    def _check_k(self, k):
        if k < 1:
            raise UserError(f"--k {k}: must be at least 1")
        if k > self.size:
            raise UserError(f"--k {k}: the index holds only {self.size} image{'s' if self.size != 1 else ''}")

    def _check_embedder(self, embedder):
        if embedder.name != self.model:
            raise UserError(f"--index_dir {self.index_dir}: built with model {self.model}, not {embedder.name}; "
                            "search it with the model it was built with")


# ----------------------------------------------------------------------------------------------------------------------
# The sample collection: what the apps search when no --index_dir is given

def sample_images():
    """The folder of captioned shapes (glm_tune.clip_model.write_caption_images) that the embedded small CLIP was
    trained on: written once into the glm-tune cache."""
    from glm_tune.clip_model import small_clip, write_caption_images

    model = small_clip()
    folder = model.parent / f"clip-sample-images-{model.name}"
    if not (folder / "captions.jsonl").exists():
        write_caption_images(folder)
    return folder


def default_index_dir():
    """Where the sample collection is indexed (with the embedded small CLIP) when no --index_dir is given."""
    from glm_tune.clip_model import small_clip

    model = small_clip()
    return model.parent / f"clip-sample-index-{model.name}"


def ensure_sample_index():
    """The sample collection's index folder, built on first use."""
    from glm_tune.clip_model import load_clip

    index_dir = default_index_dir()
    if not is_image_index(index_dir):
        build_image_index(sample_images(), index_dir, load_clip(), progress=False)
    return index_dir
