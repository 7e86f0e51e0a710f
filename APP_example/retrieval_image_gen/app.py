"""Retrieval-augmented image generation in the browser: type a request, and the page shows the three stages side by
side: the image prompt ChatGLM wrote (or the request, when its answer was unusable), the reference picture CLIP
found in the index with its score, and the picture Stable Diffusion redrew from it.

    streamlit run APP_example/retrieval_image_gen/app.py              # sample collection, embedded small models
    streamlit run APP_example/retrieval_image_gen/app.py -- --index_dir photos_index \\
        --model_name_or_path THUDM/chatglm-6b --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5

The flags after `--` are generate.py's model flags (the operator's; a bad one is shown as one line on the page). The
page offers only the indexes named with --index_dir; the three models are loaded once per server and shared by every
session, one generation at a time. Each result can be downloaded with the settings file that makes it again
(`generate.py --settings`).
"""

import sys
import threading

import streamlit as st

from glm_tune.arguments import add_model_arguments
from glm_tune.clip_model import add_clip_arguments, load_clip
from glm_tune.errors import UserError
from glm_tune.image_index import ImageIndex, ensure_sample_index
from glm_tune.chat_model import greedy_chatglm
from glm_tune.image_rag import LANGUAGES, PROMPT_TOKENS, RagSettings, run
from glm_tune.sd_checkpoint import add_pipeline_arguments, load_pipeline, resolve_sd_path
from glm_tune.sd_generate import device_and_dtype, zip_run
from webui.common import PageArgumentParser

PAGE = "app.py"
SAMPLE_REQUEST = "红色圆形"


def server_args(argv=None):
    """The operator's flags (`streamlit run app.py -- flags`); a bad one raises UserError."""
    parser = PageArgumentParser(prog=PAGE, description="retrieval-augmented image generation page; flags go after "
                                                       "`--`")
    parser.add_argument("--index_dir", action="append", default=[],
                        help="an image index of clip_retrieval/build_index.py that the page offers; repeatable "
                             "(default: the sample collection's, built on first use)")
    add_model_arguments(parser)
    add_clip_arguments(parser)
    add_pipeline_arguments(parser, dtype_help="SD weights dtype (default: fp32)", revision_flag="--sd_revision",
                           dtype_flag="--sd_dtype")
    return parser.parse_args(sys.argv[1:] if argv is None else argv)


@st.cache_resource(show_spinner="Opening the index (once per server)…")
def open_index(index_dir):
    return ImageIndex.open(index_dir)


@st.cache_resource(show_spinner="Loading CLIP (once per server)…")
def clip(name, revision):
    return load_clip(name, revision)


@st.cache_resource(show_spinner="Loading ChatGLM (once per server)…")
def language_model(model, revision, lora_path, dtype):
    llm = greedy_chatglm(PROMPT_TOKENS, model, revision, lora_path, dtype)
    llm.load()
    return llm


@st.cache_resource(show_spinner="Loading Stable Diffusion (once per server)…")
def sd_pipeline(model, revision, variant, dtype):
    """The pipeline, and the lock that lets one session at a time use it (its scheduler keeps per-call state)."""
    device, torch_dtype = device_and_dtype(dtype)
    return load_pipeline(resolve_sd_path(model, revision, variant), torch_dtype, device, variant), threading.Lock()


def sidebar(args):
    side = st.sidebar
    folders = args.index_dir or [str(ensure_sample_index())]
    index_dir = side.selectbox("Index", folders, key="index_dir")
    side.header("Generation")
    sd = dict(pretrained_model_name_or_path=args.pretrained_model_name_or_path, revision=args.sd_revision,
              variant=args.variant, dtype=args.sd_dtype,
              steps=side.slider("Steps", 1, 100, 25, key="steps"),
              strength=side.slider("Strength (how much of the reference is redrawn)", 0.05, 1.0, 0.75, 0.05,
                                   key="strength"),
              guidance=side.slider("Guidance", 1.0, 15.0, 7.5, 0.5, key="guidance"),
              seed=int(side.number_input("Seed", 0, 2 ** 31 - 1, 0, key="seed")))
    language = side.selectbox("Prompt language", LANGUAGES, key="prompt_language",
                              help="en: ChatGLM's prompt must be English, or the request is used instead")
    return RagSettings(index_dir=index_dir, prompt_language=language, model_name_or_path=args.model_name_or_path,
                       revision=args.revision, lora_path=args.lora_path, dtype=args.dtype,
                       clip_model=args.clip_model, clip_revision=args.clip_revision, sd=sd)


def show(result):
    prompt, reference, picture = st.columns(3)
    with prompt:
        st.subheader("1 · Prompt")
        st.markdown(f"**{result.choice.prompt}**")
        st.caption({"chatglm": "written by ChatGLM", "request": "the request itself", "given": "given"}[
            result.choice.source])
        if result.choice.note:
            st.warning(result.choice.note)
        if result.choice.llm_output is not None:
            with st.expander("ChatGLM's answer"):
                st.text(result.choice.llm_output)
    with reference:
        st.subheader("2 · Reference")
        st.image(str(result.reference.path), width="stretch")
        st.caption(f"**{result.reference.score:.3f}** · {result.reference.relative_path}")
    with picture:
        st.subheader("3 · Picture")
        st.image(result.images[0], width="stretch")
        settings = result.record["settings"]
        st.caption(f"{settings['width']}x{settings['height']}, seed {settings['seed']}, {settings['steps']} steps "
                   f"at strength {settings['strength']}, {result.record['seconds']:.1f} s")
        st.download_button("Download (PNG + settings)", zip_run(result.images, result.record),
                           file_name="retrieval_image_gen.zip", mime="application/zip", key="download")


def main():
    st.set_page_config(page_title="Retrieval-augmented image generation", layout="wide")
    st.title("Retrieval-augmented image generation")
    try:
        args = server_args()
        settings = sidebar(args)
        index = open_index(settings.index_dir)
        embedder = clip(args.clip_model or index.model, args.clip_revision)
        llm = language_model(args.model_name_or_path, args.revision, args.lora_path, args.dtype)
        pipe, lock = sd_pipeline(args.pretrained_model_name_or_path, args.sd_revision, args.variant, args.sd_dtype)
    except UserError as err:
        st.error(f"error: {err}")
        st.stop()
    if args.model_name_or_path is None or args.pretrained_model_name_or_path is None:
        st.info("Embedded small models are in use (random ChatGLM / Stable Diffusion weights: the mechanics, not "
                "pictures). Start the server with `-- --model_name_or_path THUDM/chatglm-6b "
                "--pretrained_model_name_or_path runwayml/stable-diffusion-v1-5` for real ones.", icon="ℹ️")
    with st.form("request_form"):
        request = st.text_area("What picture do you want?", SAMPLE_REQUEST, key="request")
        submitted = st.form_submit_button("Generate")
    if submitted:
        try:
            with st.spinner("ChatGLM → CLIP → Stable Diffusion…"), lock:
                st.session_state["result"] = run(request, settings, llm=llm, index=index, embedder=embedder,
                                                 pipe=pipe)
        except UserError as err:
            st.error(f"error: {err}")
            return
    if "result" in st.session_state:
        show(st.session_state["result"])


main()
