"""Real-time drawing: sketch on a canvas, and a latent-consistency (LCM) img2img pipeline repaints the sketch after
every stroke, in a few steps.

    streamlit run APP_example/real_time_draw/app.py        # the embedded small pipeline (random weights, 32x32)
    streamlit run APP_example/real_time_draw/app.py -- --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --lcm_lora lcm-lora-sdv1-5 --dtype fp16

The canvas starts on a background (an uploaded picture, the --sketch file, by default the sample sketch beside this
page, or a plain colour); what you draw goes on top, and the two together are the sketch. Each stroke, prompt or
slider change draws a new frame through glm_tune.sd_draw (the same function as draw.py); a rerun that changes
nothing does not (the page compares a digest of the sketch and settings with the last frame's). The page shows each
frame's latency, sketch in to image out.

The flags after `--` are the operator's (a bad one is shown as one line on the page); the pipeline is loaded once per
server and shared by every session, one frame at a time.
"""

import io
import sys
from pathlib import Path

import streamlit as st
from PIL import Image

from glm_tune.errors import UserError
from glm_tune.sd_checkpoint import FLAG, add_pipeline_arguments
from glm_tune.sd_draw import DrawSettings, Regenerator, compose_sketch, load_draw_pipeline, load_sketch
from glm_tune.sd_generate import lora_file
from webui.common import PageArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_sketch import SAMPLE_PROMPT, SAMPLE_SKETCH  # noqa: E402  (the page's own folder)

PAGE = "app.py"
DRAWING_MODES = ["freedraw", "line", "rect", "circle"]
RECENT = 10  # latencies the page summarises


def server_args(argv=None):
    """The operator's flags (`streamlit run app.py -- flags`); a bad one raises UserError."""
    parser = PageArgumentParser(prog=PAGE, description="real-time drawing page; flags go after `--`")
    add_pipeline_arguments(parser, dtype_help="weights dtype (default: fp32)")
    parser.add_argument("--lcm_lora", default=None,
                        help="an LCM-LoRA (pytorch_lora_weights.safetensors or its folder), fused into the model")
    parser.add_argument("--sketch", default=str(SAMPLE_SKETCH),
                        help="the picture the canvas starts on (default: the sample sketch beside this page)")
    parser.add_argument("--prompt", default=SAMPLE_PROMPT, help="the starting prompt")
    parser.add_argument("--canvas_size", type=int, default=384,
                        help="the canvas's longer side on screen, in pixels (default: 384; the sketch is scaled to "
                             "the image size)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.lcm_lora is not None:
        lora_file(args.lcm_lora, "--lcm_lora")
    load_sketch(args.sketch)
    if not 64 <= args.canvas_size <= 2048:
        raise UserError(f"--canvas_size {args.canvas_size}: must be between 64 and 2048")
    return args


@st.cache_resource(max_entries=1, show_spinner="Loading the pipeline (once per server)…")
def pipeline(model, revision, variant, dtype, lcm_lora):
    return load_draw_pipeline(model, lcm_lora, dtype, revision, variant)


def on_canvas(image_data, background, settings, pipe, state=None):
    """What the page does with the canvas's content: compose the strokes (`image_data`, RGBA; None before the first
    one) over `background`, and draw a frame when sketch or settings changed since the last frame of this session
    (`state`: st.session_state, or any dict). Returns (frame, whether it is new)."""
    state = st.session_state if state is None else state
    if "regenerator" not in state:
        state["regenerator"] = Regenerator()
        state["latencies"] = []
    sketch = compose_sketch(background, image_data)
    frame, fresh = state["regenerator"](sketch, settings, pipe)
    if fresh:
        state["latencies"] = [*state["latencies"], frame.seconds][-RECENT:]
    return frame, fresh


def hex_to_rgb(colour):
    colour = colour.lstrip("#")
    return tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4))


def background_picture(args):
    """The picture behind the canvas (PIL RGB), or None for a plain colour."""
    upload = st.sidebar.file_uploader("Background picture (optional)", type=["png", "jpg", "jpeg", "webp"],
                                      key="background_upload")
    if upload is not None:
        try:
            return load_sketch(upload.getvalue(), upload.name)
        except UserError as err:
            st.sidebar.error(f"error: {err}")
    if st.sidebar.checkbox(f"Start from {Path(args.sketch).name}", value=True, key="use_sketch"):
        return load_sketch(args.sketch)
    return None


def main():
    st.set_page_config(page_title="Real-time drawing", layout="wide")
    try:
        args = server_args()
    except UserError as err:
        st.error(f"error: {err}")
        st.stop()
    st.title("Real-time drawing with a latent-consistency model")
    if getattr(args, "pretrained_model_name_or_path") is None:
        st.caption("Model: the embedded small pipeline (random weights, 32x32; it shows the mechanics and the speed, "
                   f"not pictures). Start the server with `-- {FLAG} runwayml/stable-diffusion-v1-5 --lcm_lora "
                   "lcm-lora-sdv1-5` for real ones.")
    try:
        pipe = pipeline(getattr(args, "pretrained_model_name_or_path"), args.revision, args.variant, args.dtype,
                        args.lcm_lora)
    except UserError as err:
        st.error(f"error: {err}")
        st.stop()
    default_w, default_h = pipe.default_size

    side = st.sidebar
    side.header("Generation")
    steps = side.slider("Steps", 1, 8, 4, key="steps")
    guidance = side.slider("Guidance (1: off, as LCM wants)", 0.0, 3.0, 1.0, 0.1, key="guidance")
    strength = side.slider("Strength (how much of the sketch is repainted)", 0.05, 1.0, 0.6, 0.05, key="strength")
    seed = side.number_input("Seed", 0, 2**31 - 1, 0, key="seed")
    c1, c2 = side.columns(2)
    width = c1.number_input("Width", 8, 2048, default_w, step=8, key="width")
    height = c2.number_input("Height", 8, 2048, default_h, step=8, key="height")
    side.header("Canvas")
    mode = side.selectbox("Tool", DRAWING_MODES, key="drawing_mode")
    stroke_width = side.slider("Stroke width", 1, 50, 8, key="stroke_width")
    stroke_colour = side.color_picker("Stroke colour", "#1E1E1E", key="stroke_colour")
    background_colour = side.color_picker("Background colour (without a picture)", "#FFFFFF", key="background_colour")
    picture = background_picture(args)

    prompt = st.text_input("Prompt", args.prompt, key="prompt")
    scale = args.canvas_size / max(width, height)
    canvas_w, canvas_h = max(8, round(width * scale)), max(8, round(height * scale))
    # the canvas shows the background (scaled to its size); it sends back only the strokes, which on_canvas puts
    # over the same picture
    background = (picture if picture is not None
                  else Image.new("RGB", (canvas_w, canvas_h), hex_to_rgb(background_colour)))
    left, right = st.columns(2)
    with left:
        from streamlit_drawable_canvas import st_canvas  # registers the component: only inside a Streamlit run

        canvas = st_canvas(stroke_width=stroke_width, stroke_color=stroke_colour, background_image=background,
                           update_streamlit=True, width=canvas_w, height=canvas_h, drawing_mode=mode,
                           return_image_data=True, key="canvas")
    strokes = canvas.image_data
    settings = DrawSettings(prompt=prompt, steps=int(steps), guidance=float(guidance), strength=float(strength),
                            seed=int(seed), width=int(width), height=int(height),
                            pretrained_model_name_or_path=getattr(args, "pretrained_model_name_or_path"),
                            revision=args.revision, variant=args.variant, lcm_lora=args.lcm_lora, dtype=args.dtype)
    with right:
        try:
            frame, fresh = on_canvas(strokes, background, settings, pipe)
        except UserError as err:
            st.error(f"error: {err}")
            return
        st.image(frame.image, width=canvas_w, caption=f"{width}x{height}, {steps} steps, seed {seed}")
        recent = sorted(st.session_state["latencies"])
        median = recent[len(recent) // 2] * 1000 if recent else frame.seconds * 1000
        st.markdown(f"latency {frame.seconds * 1000:.0f} ms")
        st.caption(f"{'new frame' if fresh else 'unchanged, not redrawn'} · frames this session: "
                   f"{st.session_state['regenerator'].frames} · median of the last {len(recent)}: {median:.0f} ms · "
                   f"{frame.record['device']}")
        png = io.BytesIO()
        frame.image.save(png, format="PNG")
        st.download_button("Download the image", png.getvalue(), file_name="frame.png", mime="image/png",
                           key="download")


if __name__ == "__main__":
    main()
