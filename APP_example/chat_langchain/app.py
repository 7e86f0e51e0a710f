"""Chat with a knowledge base in the browser: answers stream in with their sources under them, the sidebar chooses
the retriever and the number of passages, and documents uploaded there are added to the index.

    streamlit run APP_example/chat_langchain/app.py                       # the sample knowledge base
    streamlit run APP_example/chat_langchain/app.py -- --index_dir kb_index --model_name_or_path THUDM/chatglm-6b

The flags after `--` are kb_chat.py's (the operator's choice; a bad one is shown as one line on the page). The model
and the knowledge base are loaded once per server and shared by every session; uploads are saved in the index
folder's uploads/ and indexed at once (only what is new is embedded).
"""

import sys

import streamlit as st

from glm_tune.errors import UserError
from glm_tune.kb_chat import add_kb_chat_arguments, ask, build_chain, chat_model_settings, check_args, \
    open_knowledge_base
from glm_tune.knowledge_base import SUFFIXES, describe_stats
from glm_tune.retrieval import MODES
from webui.common import PageArgumentParser

PAGE = "app.py"


def server_args():
    """The operator's flags (`streamlit run app.py -- flags`); a bad one raises UserError."""
    parser = PageArgumentParser(prog=PAGE, description="knowledge-base chat page; flags go after `--`")
    add_kb_chat_arguments(parser)
    args = parser.parse_args(sys.argv[1:])
    check_args(args)
    return args


@st.cache_resource(show_spinner="Opening the knowledge base (once per server)…")
def knowledge_base(index_dir):
    return open_knowledge_base(index_dir, progress=False)


@st.cache_resource(show_spinner="Loading the model (once per server)…")
def chat_model(settings):
    """The ChatGLM for these settings (a tuple of items), its weights loaded."""
    from glm_tune.chat_model import ChatGLM

    llm = ChatGLM(**dict(settings))
    llm.load()
    return llm


def add_uploads(kb, uploaded):
    """Index the uploaded files not indexed yet in this session (the uploader keeps its files across reruns);
    -> a one-line report and the warnings, or None when there was nothing new."""
    done = st.session_state.setdefault("indexed_uploads", set())
    new = [f for f in uploaded or [] if f.file_id not in done]
    if not new:
        return None
    with st.spinner(f"Indexing {len(new)} file(s)…"):
        stats = kb.add_files([(f.name, f.getvalue()) for f in new])
    done.update(f.file_id for f in new)
    return describe_stats(stats), stats["warnings"]


def show_sources(sources):
    with st.expander(f"Sources ({len(sources)})"):
        if not sources:
            st.markdown("No passage of the knowledge base was used.")
        for i, source in enumerate(sources, start=1):
            st.markdown(f"**[{i}] {source['source']}** · chunk {source['chunk']} · score {source['score']:.4f}")
            st.text(source["text"])


def stream_answer(chain, question, history):
    """Stream the answer into the chat message being written; -> KBAnswer."""
    placeholder, shown = st.empty(), []

    def on_token(text):
        shown.append(text)
        placeholder.markdown("".join(shown) + " ▌")

    answer = ask(chain, question, history, on_token=on_token)
    placeholder.markdown(answer.answer or "_(empty answer)_")
    return answer


st.set_page_config(page_title="Knowledge-base chat", layout="wide")
st.title("Knowledge-base chat")
try:
    args = server_args()
    kb = knowledge_base(args.index_dir)
    llm = chat_model(tuple(sorted(chat_model_settings(args).items())))
except UserError as err:
    st.error(f"error: {err}")
    st.stop()
if args.model_name_or_path is None:
    st.info("This is the embedded small demo model (random weights): its answers mean nothing, but retrieval and "
            "sources are real. Start the server with `-- --model_name_or_path THUDM/chatglm-6b` for real answers.",
            icon="ℹ️")

mode = st.sidebar.selectbox("Retriever", MODES, index=MODES.index(args.retriever), key="retriever",
                            help="hybrid: BM25 over jieba words fused with dense embeddings")
k = st.sidebar.slider("Passages per question (k)", 1, max(10, args.k), args.k, key="k")
st.sidebar.caption(f"{len(kb.sources)} files, {len(kb)} chunks in {kb.index_dir}")
uploaded = st.sidebar.file_uploader("Add documents", type=[s.lstrip(".") for s in SUFFIXES],
                                    accept_multiple_files=True, key="uploads")
try:
    report = add_uploads(kb, uploaded)
except UserError as err:
    st.sidebar.error(f"error: {err}")
else:
    if report:
        st.session_state["upload_report"] = report
if "upload_report" in st.session_state:
    line, warnings = st.session_state["upload_report"]
    st.sidebar.success(line)
    for warning in warnings:
        st.sidebar.warning(warning)

history = st.session_state.setdefault("history", [])  # [KBAnswer]
if st.sidebar.button("Clear conversation", key="clear"):
    history.clear()

for turn in history:
    st.chat_message("user").markdown(turn.question)
    with st.chat_message("assistant"):
        st.markdown(turn.answer or "_(empty answer)_")
        show_sources(turn.sources)

if question := st.chat_input("Ask the knowledge base", key="question"):
    st.chat_message("user").markdown(question)
    with st.chat_message("assistant"):
        try:
            answer = stream_answer(build_chain(llm, kb.retriever(k, mode)), question,
                                   [(t.question, t.answer) for t in history])
        except UserError as err:
            st.error(f"error: {err}")
            st.stop()
        show_sources(answer.sources)
    history.append(answer)
