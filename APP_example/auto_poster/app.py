"""Auto poster in the browser: type a theme, and the page shows the stages of poster.py side by side: the plan
(editable JSON: an edit lays out, renders and reviews again, and repaints only when the image prompt or mood changed),
the background, the layout (each line's box over the background) and the poster, with the review's checks beside it
and a download of the poster with its plan, layout and review.

    streamlit run APP_example/auto_poster/app.py                       # the embedded small models
    streamlit run APP_example/auto_poster/app.py -- --model_name_or_path THUDM/chatglm-6b \\
        --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --sd_dtype fp16

The flags after `--` are poster.py's model flags (the operator's; a bad one is shown as one line on the page). Both
models are loaded once per server and shared by every session, one poster at a time; each session works in a run
folder of its own (a temporary folder), so that its stages are reused as in poster.py.
"""

import sys
import tempfile
import threading

import streamlit as st

from glm_tune.arguments import add_model_arguments
from glm_tune.chat_model import greedy_chatglm
from glm_tune.errors import UserError
from glm_tune.poster import (PLAN_TOKENS, SAMPLE_THEME, PosterSettings, parse_size, preview_layout, run_poster,
                             sd_pipeline, zip_poster)
from glm_tune.poster_plan import FIELDS, edited_plan
from glm_tune.sd_checkpoint import add_pipeline_arguments
from webui.common import PageArgumentParser

PAGE = "app.py"
SIZES = ["768x1024", "1024x768", "512x768", "768x512", "512x512"]


def server_args(argv=None):
    """The operator's flags (`streamlit run app.py -- flags`); a bad one raises UserError."""
    parser = PageArgumentParser(prog=PAGE, description="auto poster page; flags go after `--`")
    add_model_arguments(parser)
    add_pipeline_arguments(parser, dtype_help="SD weights dtype (default: fp32)", revision_flag="--sd_revision",
                           dtype_flag="--sd_dtype")
    return parser.parse_args(sys.argv[1:] if argv is None else argv)


def model_settings(args, **page):
    return PosterSettings(model_name_or_path=args.model_name_or_path, revision=args.revision,
                          lora_path=args.lora_path, dtype=args.dtype,
                          pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                          sd_revision=args.sd_revision, variant=args.variant, sd_dtype=args.sd_dtype, **page)


@st.cache_resource(show_spinner="Loading ChatGLM (once per server)…")
def language_model(model, revision, lora_path, dtype):
    llm = greedy_chatglm(PLAN_TOKENS, model, revision, lora_path, dtype)
    llm.load()
    return llm


@st.cache_resource(show_spinner="Loading Stable Diffusion (once per server)…")
def painter(model, revision, variant, dtype):
    """The pipeline, and the lock that lets one session at a time use it (its scheduler keeps per-call state)."""
    settings = PosterSettings(pretrained_model_name_or_path=model, sd_revision=revision, variant=variant,
                              sd_dtype=dtype)
    return sd_pipeline(settings), threading.Lock()


def sidebar(args):
    side = st.sidebar
    side.header("Poster")
    size = side.selectbox("Size (width x height)", SIZES, key="size")
    retries = side.slider("Retries when the review fails", 0, 5, 2, key="retries")
    side.header("Background")
    return model_settings(args, size=parse_size(size), retries=retries,
                          seed=int(side.number_input("Seed", 0, 2 ** 31 - 1, 0, key="seed")),
                          steps=side.slider("Steps", 1, 100, 25, key="steps"),
                          guidance=side.slider("Guidance", 1.0, 15.0, 7.5, 0.5, key="guidance"))


def run_folder():
    """This session's run folder (made on its first poster)."""
    if "out_dir" not in st.session_state:
        st.session_state["out_dir"] = tempfile.mkdtemp(prefix="auto_poster-")
    return st.session_state["out_dir"]


def make(theme, settings, llm, pipe, lock, plan=None):
    """A run of every stage (those whose inputs did not change are reused); errors are one line on the page."""
    lines = []
    try:
        with st.spinner("ChatGLM → Stable Diffusion → layout → review…"), lock:
            run = run_poster(theme, settings, run_folder(), plan=plan, llm=llm, pipe=pipe, log=lines.append)
    except UserError as err:
        st.error(f"error: {err}")
        return
    st.session_state["run"], st.session_state["log"] = run, lines
    st.session_state["plan_version"] = st.session_state.get("plan_version", 0) + 1  # the editor shows the new plan
    return run


def plan_column(run, settings, llm, pipe, lock):
    st.subheader("1 · Plan")
    with st.form("plan_form"):
        text = st.text_area("The plan (edit and apply: the stages after it run again)", run.plan.editable_json(),
                            height=320, key=f"plan_text_{st.session_state['plan_version']}")
        applied = st.form_submit_button("Apply edits")
    if applied:
        try:
            plan = edited_plan(run.plan, text)
        except UserError as err:
            st.error(f"error: {err}")
            return run
        run = make(None, settings, llm, pipe, lock, plan=plan) or run
    st.caption("Where each field came from: " + ", ".join(f"{name} *{run.plan.provenance.get(name, 'user')}*"
                                                            for name in FIELDS))
    for line in st.session_state.get("log", []):
        if line.startswith("note:"):
            st.info(line, icon="ℹ️")
    if run.plan.llm_output is not None:
        with st.expander("ChatGLM's answer"):
            st.text(run.plan.llm_output)
    return run


def background_column(run):
    st.subheader("2 · Background")
    st.image(run.background, width="stretch")
    record = run.background_record
    if record.get("source") == "supplied":
        st.caption(f"supplied: {record['path']}")
    else:
        painted = record["settings"]
        st.caption(f"painted at {painted['width']}x{painted['height']}, seed {painted['seed']}, {painted['steps']} "
                   f"steps; resized to {run.background.size[0]}x{run.background.size[1]}")


def layout_column(run):
    st.subheader("3 · Layout")
    st.image(preview_layout(run.background, run.layout), width="stretch")
    st.caption(f"attempt {run.layout.attempt}: {run.layout.orientation} text in the {run.layout.region} region; "
               "boxes: title red, subtitle amber, body blue")


def poster_column(run):
    st.subheader("4 · Poster")
    st.image(run.poster, width="stretch")
    st.download_button("Download (poster + plan, layout, review)", zip_poster(run.out_dir),
                       file_name="auto_poster.zip", mime="application/zip", key="download")


def review_column(run):
    st.subheader("5 · Review")
    review = run.review
    (st.success if review["passed"] else st.warning)(
        "passed every check" if review["passed"] else "failed: the poster was written all the same")
    for name, check in review["checks"].items():
        st.markdown(f"{'✅' if check['passed'] else '❌'} **{name}**")
    attempts = review.get("attempts", [])
    if len(attempts) > 1:
        st.caption("attempts: " + "; ".join(f"{a['attempt']} in the {a['region']} region: "
                                            f"{'passed' if a['passed'] else 'failed ' + ', '.join(a['failed'])}"
                                            for a in attempts))
    with st.expander("review.json"):
        st.json(review)


def main():
    st.set_page_config(page_title="Auto poster", layout="wide")
    st.title("Auto poster")
    try:
        args = server_args()
        settings = sidebar(args)
        llm = language_model(args.model_name_or_path, args.revision, args.lora_path, args.dtype)
        pipe, lock = painter(args.pretrained_model_name_or_path, args.sd_revision, args.variant, args.sd_dtype)
    except UserError as err:
        st.error(f"error: {err}")
        st.stop()
    if args.model_name_or_path is None or args.pretrained_model_name_or_path is None:
        st.info("Embedded small models are in use (random ChatGLM / Stable Diffusion weights: the plan comes from "
                "its defaults and the background is colour noise). Start the server with `-- --model_name_or_path "
                "THUDM/chatglm-6b --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5` for real ones.",
                icon="ℹ️")
    with st.form("theme_form"):
        theme = st.text_input("What is the poster for?", SAMPLE_THEME, key="theme")
        submitted = st.form_submit_button("Make the poster")
    if submitted:
        make(theme, settings, llm, pipe, lock)
    run = st.session_state.get("run")
    if run is None:
        return
    plan, background, layout = st.columns(3)
    with plan:
        run = plan_column(run, settings, llm, pipe, lock)
    with background:
        background_column(run)
    with layout:
        layout_column(run)
    poster, review = st.columns(2)
    with poster:
        poster_column(run)
    with review:
        review_column(run)


main()
