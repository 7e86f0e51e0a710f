"""Digital human in the browser: a topic (ChatGLM writes the script) or a script of your own, an optional portrait
and voice reference, and the page runs pipeline.py's stages with their progress, then shows each one's output: the
script, the portrait with its face box, the voice, the idle motion and the talking video.

    streamlit run APP_example/digital_human/app.py                       # the embedded small models
    streamlit run APP_example/digital_human/app.py -- --model_name_or_path THUDM/chatglm-6b \\
        --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --stage_config stages.toml

The flags after `--` are the operator's (the models, and --stage_config for external commands; a bad one is one
line on the page). Each session works in a run folder of its own (a temporary folder), so that its stages are reused
as in pipeline.py: a new script redoes the voice and what follows, a new portrait the motion and what follows.
"""

import json
import sys
import tempfile
from pathlib import Path

import streamlit as st

from glm_tune.arguments import add_model_arguments
from glm_tune.chat_model import greedy_chatglm
from glm_tune.digital_human import SCRIPT_TOKENS, STAGES, TalkSettings, make_talk
from glm_tune.errors import UserError
from glm_tune.sd_checkpoint import add_pipeline_arguments
from webui.common import PageArgumentParser

PAGE = "app.py"
HERE = Path(__file__).resolve().parent
SAMPLE_PORTRAIT = HERE / "sample_portrait.png"


def server_args(argv=None):
    """The operator's flags (`streamlit run app.py -- flags`); a bad one raises UserError."""
    parser = PageArgumentParser(prog=PAGE, description="digital human page; flags go after `--`")
    add_model_arguments(parser)
    add_pipeline_arguments(parser, dtype_help="SD weights dtype (default: fp32)", revision_flag="--sd_revision",
                           dtype_flag="--sd_dtype")
    parser.add_argument("--stage_config", default=None)
    return parser.parse_args(sys.argv[1:] if argv is None else argv)


@st.cache_resource(show_spinner="Loading ChatGLM (once per server)…")
def language_model(model, revision, lora_path, dtype):
    llm = greedy_chatglm(SCRIPT_TOKENS, model, revision, lora_path, dtype)
    llm.load()
    return llm


def session_dir():
    """This session's folder: its uploads, and its run folder `run/`."""
    if "session_dir" not in st.session_state:
        st.session_state["session_dir"] = tempfile.mkdtemp(prefix="digital_human-")
    return Path(st.session_state["session_dir"])


def saved(upload, name):
    """An uploaded file written into the session's folder (the stages read files); None without an upload."""
    if upload is None:
        return None
    path = session_dir() / f"{name}{Path(upload.name).suffix.lower()}"
    path.write_bytes(upload.getvalue())
    return str(path)


def inputs_form():
    with st.form("talk_form"):
        topic = st.text_input("Topic (ChatGLM writes the script)", "", key="topic")
        text = st.text_area("…or the script itself (used when given)", "", height=100, key="script_text")
        left, right = st.columns(2)
        portrait = left.file_uploader("Portrait (default: the sample face)", type=["png", "jpg", "jpeg", "webp"],
                                      key="portrait")
        voice_ref = right.file_uploader("Voice reference (a WAV; optional)", type=["wav"], key="voice_ref")
        words = st.slider("Word budget", 10, 200, 60, key="words")
        submitted = st.form_submit_button("Make the video", key="make")
    return submitted, topic, text, portrait, voice_ref, words


def settings_for(args, topic, text, portrait, voice_ref, words):
    script = None
    if text.strip() or not topic.strip():
        script = session_dir() / "given_script.txt"
        script.write_text(text, encoding="utf-8")
    return TalkSettings(topic=topic.strip() or None, script=str(script) if script else None,
                        portrait=saved(portrait, "portrait") or str(SAMPLE_PORTRAIT),
                        voice_ref=saved(voice_ref, "voice_ref"), words=words, stage_config=args.stage_config,
                        model_name_or_path=args.model_name_or_path, revision=args.revision,
                        lora_path=args.lora_path, dtype=args.dtype,
                        pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                        sd_revision=args.sd_revision, variant=args.variant, sd_dtype=args.sd_dtype)


def make(settings, llm):
    """Every stage, with a progress bar that moves as each one's line arrives; errors are one line on the page."""
    bar = st.progress(0.0, text="starting")
    lines = []

    def log(line):
        lines.append(line)
        stage = line.split(":")[0]
        if stage in STAGES:
            bar.progress((STAGES.index(stage) + 1) / len(STAGES), text=line)

    try:
        with st.status("script → portrait → voice → motion → lip-sync → video", expanded=False) as status:
            run = make_talk(settings, session_dir() / "run", llm=llm, log=log)
            for line in lines:
                status.write(line)
    except UserError as err:
        st.error(f"error: {err}")
        return None
    st.session_state["run"], st.session_state["log"] = run, lines
    return run


def show(run):
    out = Path(run.out_dir)
    for line in st.session_state.get("log", []):
        if line.startswith("note:"):
            st.info(line, icon="ℹ️")
    script, portrait = st.columns(2)
    with script:
        st.subheader("1 · Script")
        st.code((out / "script.txt").read_text(encoding="utf-8"), language=None, wrap_lines=True)
    with portrait:
        st.subheader("2 · Portrait")
        face = json.loads((out / "face.json").read_text())
        st.image(str(out / "portrait.png"), width=256)
        st.caption(f"face box {face['w']}x{face['h']} at ({face['x']}, {face['y']}), {face['source']}")
    voice, motion = st.columns(2)
    with voice:
        st.subheader("3 · Voice")
        st.audio((out / "voice.wav").read_bytes(), format="audio/wav")
    with motion:
        st.subheader("4 · Motion")
        st.video((out / "motion.mp4").read_bytes(), format="video/mp4")
    st.subheader("5 · Lip-sync and video")
    st.video((out / "talk.mp4").read_bytes(), format="video/mp4")
    st.download_button("Download talk.mp4", (out / "talk.mp4").read_bytes(), file_name="talk.mp4",
                       mime="video/mp4", key="download")
    st.caption("stages: " + ", ".join(f"{stage} {how}" for stage, how in run.status.items()))


def main():
    st.set_page_config(page_title="Digital human", layout="wide")
    st.title("Digital human")
    try:
        args = server_args()
    except UserError as err:
        st.error(f"error: {err}")
        st.stop()
    submitted, topic, text, portrait, voice_ref, words = inputs_form()
    if submitted:
        llm = language_model(args.model_name_or_path, args.revision, args.lora_path, args.dtype) \
            if topic.strip() and not text.strip() else None
        make(settings_for(args, topic, text, portrait, voice_ref, words), llm)
    run = st.session_state.get("run")
    if run is not None:
        show(run)


main()
