"""Image search in the browser: by text, by an uploaded picture, or "more like this" from any result; results come as
a grid of images with their scores.

    streamlit run APP_example/clip_retrieval/app.py                     # the sample collection
    streamlit run APP_example/clip_retrieval/app.py -- --index_dir photos_index --index_dir shop_index

The flags after `--` are the operator's (a bad one is shown as one line on the page). The page offers only the
indexes named with --index_dir (by default the sample one), never a folder a visitor types; each index and its CLIP
model are loaded once per server and shared by every session. Like every page of the project it listens on
127.0.0.1 (.streamlit/config.toml beside it); `--server.address 0.0.0.0` before `--` serves a network.
"""

import sys

import streamlit as st

from glm_tune.clip_model import DTYPES as CLIP_DTYPES, add_clip_arguments, load_clip
from glm_tune.errors import UserError
from glm_tune.image_index import IMAGE_SUFFIXES, ImageIndex, ensure_sample_index
from webui.common import PageArgumentParser

PAGE = "app.py"
COLUMNS = 4
MAX_K = 50


def server_args(argv=None):
    """The operator's flags (`streamlit run app.py -- flags`); a bad one raises UserError."""
    parser = PageArgumentParser(prog=PAGE, description="image search page; flags go after `--`")
    parser.add_argument("--index_dir", action="append", default=[],
                        help="an index of build_index.py that the page offers; repeatable (default: the sample "
                             "collection's, built on first use)")
    add_clip_arguments(parser)
    parser.add_argument("--dtype", choices=CLIP_DTYPES, default="fp32", help="CLIP weights dtype (default: fp32)")
    parser.add_argument("--k", type=int, default=8, help=f"results shown at first, 1-{MAX_K} (default: 8)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not 1 <= args.k <= MAX_K:
        raise UserError(f"--k {args.k}: must be between 1 and {MAX_K}")
    return args


@st.cache_resource(show_spinner="Opening the index (once per server)…")
def open_index(index_dir):
    return ImageIndex.open(index_dir)


@st.cache_resource(show_spinner="Loading CLIP (once per server)…")
def clip(name, revision, dtype):
    return load_clip(name, revision, dtype)


def run_query(index, embedder, query, k):
    """The hits for the session's query: ("text", str), ("image", bytes, name) or ("like", path)."""
    kind = query[0]
    if kind == "text":
        return index.search_text(embedder, query[1], k)
    if kind == "image":
        return index.search_image(embedder, query[1], k, name=query[2])
    return index.more_like(query[1], k)


def show_results(hits):
    for row in range(0, len(hits), COLUMNS):
        for column, hit in zip(st.columns(COLUMNS), hits[row:row + COLUMNS]):
            with column:
                st.image(str(hit.path), width="stretch")
                st.caption(f"**{hit.score:.3f}** · {hit.relative_path}")
                if st.button("More like this", key=f"like-{hit.id}"):
                    st.session_state["query"] = ("like", hit.relative_path)
                    st.rerun()


def main():
    st.set_page_config(page_title="Image search", layout="wide")
    st.title("Image search with CLIP")
    try:
        args = server_args()
        folders = args.index_dir or [str(ensure_sample_index())]
        choice = st.sidebar.selectbox("Index", folders, key="index_dir")
        index = open_index(choice)
        embedder = clip(args.clip_model or index.model, args.clip_revision, args.dtype)
    except UserError as err:
        st.error(f"error: {err}")
        st.stop()
    if not args.index_dir:
        st.info("This is the sample collection (generated shapes) searched with the embedded small Chinese CLIP. "
                "Index your own pictures with build_index.py and start the server with `-- --index_dir DIR`.",
                icon="ℹ️")
    st.sidebar.caption(f"{index.size} images ({index.index_type}) from {index.img_dir}; model {index.model}")
    k = st.sidebar.slider("Results (k)", 1, min(MAX_K, index.size), min(args.k, index.size), key="k")

    text_tab, image_tab = st.tabs(["By text", "By image"])
    with text_tab:
        with st.form("text_search"):
            text = st.text_input("Describe the picture (Chinese or English)", key="text")
            if st.form_submit_button("Search") and text.strip():
                st.session_state["query"] = ("text", text.strip())
    with image_tab:
        upload = st.file_uploader("A picture", type=[s.lstrip(".") for s in IMAGE_SUFFIXES], key="upload")
        if upload is not None and st.button("Search with this picture", key="image_search"):
            st.session_state["query"] = ("image", upload.getvalue(), upload.name)

    query = st.session_state.get("query")
    if query is None:
        return
    label = {"text": lambda q: f"text “{q[1]}”", "image": lambda q: f"picture {q[2]}",
             "like": lambda q: f"more like {q[1]}"}[query[0]](query)
    try:
        hits = run_query(index, embedder, query, k)
    except UserError as err:
        st.error(f"error: {err}")
        return
    st.subheader(f"{len(hits)} results for {label}")
    show_results(hits)


main()
