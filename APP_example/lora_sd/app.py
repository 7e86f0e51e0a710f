"""DreamBooth LoRA in the browser: train an adapter on a few uploaded pictures, then generate with adapters mixed by
weight.

    streamlit run APP_example/lora_sd/app.py                  # the embedded small pipeline (random, 32x32)
    streamlit run APP_example/lora_sd/app.py -- --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --jobs_dir output/lora_sd_jobs --lora output/watercolor

Train: upload images (or keep the sample images of an orange disc), set the prompt, start. The training runs as a
background job (train_lora_sd.py in its own process, its files in --jobs_dir/<job>/): it goes on when the page is
closed or reloaded, and the page shows its progress, loss and newest validation images whenever it is open; a stopped
job resumes from its last checkpoint. Generate: choose adapters (finished jobs, --lora, adapters under --lora_dir)
and their weights, a prompt and the numbers; the images come as a grid and as a .zip with their settings.

The flags after `--` are the operator's (a bad one is shown as one line on the page); the base pipeline is loaded
once per server and shared by every session.
"""

import sys
import threading
from pathlib import Path

import streamlit as st

from glm_tune.errors import UserError
from glm_tune.sd_checkpoint import FLAG, add_pipeline_arguments, load_pipeline, resolve_sd_path
from glm_tune.sd_generate import GenerationSettings, device_and_dtype, generate, lora_file, zip_run
from glm_tune.sd_jobs import job_status, list_jobs, resume_job, start_job, stop_job
from glm_tune.sd_lora import DEMO_INSTANCE_DIR, DEMO_PROMPT, LORA_FILE, REPO_ROOT, image_files
from webui.common import PageArgumentParser

PAGE = "app.py"
DEFAULT_JOBS_DIR = REPO_ROOT / "output" / "lora_sd_jobs"
DEFAULT_LORA_DIR = REPO_ROOT / "output"
# Starting values of the training form: the embedded demo's (a random UNet learns fast at a high rate), or values
# that suit a real SD 1.x/2.x model.
FORM_DEFAULTS = {
    "embedded": dict(steps=200, resolution=32, learning_rate=2e-3, rank=8, layers="all", batch=4),
    "real": dict(steps=400, resolution=512, learning_rate=1e-4, rank=4, layers="attention", batch=1),
}


def server_args(argv=None):
    """The operator's flags (`streamlit run app.py -- flags`); a bad one raises UserError."""
    parser = PageArgumentParser(prog=PAGE, description="DreamBooth LoRA page; flags go after `--`")
    add_pipeline_arguments(parser, dtype_help="generation dtype (default: fp32)")
    parser.add_argument("--jobs_dir", default=str(DEFAULT_JOBS_DIR),
                        help="where training jobs live (default: output/lora_sd_jobs)")
    parser.add_argument("--lora", action="append", default=[], help="an adapter the Generate tab offers; repeatable")
    parser.add_argument("--lora_dir", default=None,
                        help="a folder whose pytorch_lora_weights.safetensors files (up to 2 levels down) the "
                             "Generate tab offers (default: output/)")
    parser.add_argument("--max_train_steps", type=int, default=5000, help="the most steps a job may ask for")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for path in args.lora:
        lora_file(path, "--lora")
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise UserError(f"--lora_dir {args.lora_dir}: no such folder")
    return args


@st.cache_resource(max_entries=1, show_spinner="Loading the pipeline (once per server)…")
def pipeline(model, revision, variant, dtype):
    """The base pipeline and the lock that lets one session at a time set its adapters and generate."""
    folder = resolve_sd_path(model, revision, variant)
    device, torch_dtype = device_and_dtype(dtype)
    return load_pipeline(folder, torch_dtype, device, variant), threading.Lock()


def offered_adapters(args):
    """Adapters the Generate tab offers: finished jobs (newest first), --lora, then those under --lora_dir."""
    found = []
    for job_dir in list_jobs(args.jobs_dir):
        adapter = job_dir / "out" / LORA_FILE
        if adapter.is_file():
            found.append(str(adapter))
    found += [str(p) for p in args.lora]
    folder = Path(args.lora_dir) if args.lora_dir else DEFAULT_LORA_DIR
    if folder.is_dir():
        found += [str(p) for p in sorted([*folder.glob(LORA_FILE), *folder.glob(f"*/{LORA_FILE}"),
                                          *folder.glob(f"*/*/{LORA_FILE}")])]
    return list(dict.fromkeys(found))


def adapter_label(path):
    path = Path(path)
    return f"{path.parent.parent.name}/{path.parent.name}" if path.name == LORA_FILE else str(path)


# -- Train ------------------------------------------------------------------------------------------------------------

def train_tab(args):
    defaults = FORM_DEFAULTS["embedded" if getattr(args, "pretrained_model_name_or_path") is None else "real"]
    uploads = st.file_uploader("Pictures of the subject (3 to 20 work best)", type=["png", "jpg", "jpeg", "webp"],
                               accept_multiple_files=True, key="uploads")
    if not uploads:
        st.caption(f"Nothing uploaded: the sample pictures ({len(image_files(DEMO_INSTANCE_DIR, 'sample'))} of an "
                   "orange disc on dark blue) are used.")
    prompt = st.text_input("Instance prompt: the subject with a rare token", DEMO_PROMPT, key="instance_prompt")
    c1, c2, c3 = st.columns(3)
    steps = c1.number_input("Steps", 1, args.max_train_steps, defaults["steps"], key="steps")
    learning_rate = c2.number_input("Learning rate", 1e-6, 1e-1, defaults["learning_rate"], format="%.0e",
                                    key="learning_rate")
    rank = c3.number_input("LoRA rank", 1, 128, defaults["rank"], key="rank")
    c1, c2, c3 = st.columns(3)
    resolution = c1.number_input("Resolution", 8, 2048, defaults["resolution"], step=8, key="resolution")
    batch = c2.number_input("Batch size", 1, 64, defaults["batch"], key="batch")
    layers = c3.selectbox("UNet layers", ["attention", "all"], index=["attention", "all"].index(defaults["layers"]),
                          key="layers")
    c1, c2 = st.columns(2)
    validation_steps = c1.number_input("Validation images every N steps", 0, 10000, 50, key="validation_steps")
    text_encoder = c2.checkbox("Also train the text encoder", key="train_text_encoder")
    running = [j.name for j in list_jobs(args.jobs_dir) if job_status(j).state == "running"]
    if running:
        st.caption(f"Job {running[0]} is running; one job at a time (stop it to start another).")
    if st.button("Start training", type="primary", key="start", disabled=bool(running)):
        try:
            if resolution % 8:
                raise UserError(f"resolution {resolution}: must be a multiple of 8")
            if not prompt.strip():
                raise UserError("instance prompt: empty; name the subject with a rare token, e.g. 'a photo of sks "
                                "dog'")
            flags = ["--max_train_steps", steps, "--learning_rate", learning_rate, "--rank", rank,
                     "--resolution", resolution, "--train_batch_size", batch, "--lora_layers", layers,
                     "--validation_steps", validation_steps, "--checkpointing_steps", max(1, min(100, steps)),
                     "--lr_warmup_steps", 0]
            for name in ("pretrained_model_name_or_path", "revision", "variant"):
                if getattr(args, name):
                    flags += [f"--{name}", getattr(args, name)]
            if text_encoder:
                flags.append("--train_text_encoder")
            job_dir = start_job(args.jobs_dir, prompt, uploads=[(f.name, f.getvalue()) for f in uploads or []],
                                instance_dir=None if uploads else DEMO_INSTANCE_DIR, flags=flags)
        except UserError as err:
            st.error(f"error: {err}")
        else:
            st.session_state.job = job_dir.name
            st.success(f"started job {job_dir.name}")
    jobs_panel(args)


def jobs_panel(args):
    jobs = list_jobs(args.jobs_dir)
    if not jobs:
        st.info("No training jobs yet.")
        return
    names = [j.name for j in jobs]
    if st.session_state.get("job") not in names:
        st.session_state.pop("job", None)
    chosen = st.selectbox("Job", names, key="job")
    status = job_status(Path(args.jobs_dir) / chosen)
    if status.state == "running":
        st.fragment(run_every=2)(job_view)(status.job_dir, live=True)  # refreshes itself while the job runs
    else:
        job_view(status.job_dir)


def job_view(job_dir, live=False):
    status = job_status(job_dir)
    if live and status.state != "running":
        st.rerun()  # the whole page: the Start button, the adapters on offer
    total = max(status.total_steps, 1)
    rate = f", {status.seconds_per_step:.3f} s/step" if status.seconds_per_step else ""
    loss = f", loss {status.loss:.4f}" if status.loss is not None else ""
    st.progress(min(status.step / total, 1.0), text=f"{status.state}: step {status.step} of {status.total_steps}"
                                                    f"{loss}{rate}")
    st.caption(f"prompt: {status.job.get('instance_prompt', '?')} · folder: {job_dir}")
    if status.state == "failed":
        st.error(f"the job failed: {status.error}")
    images = status.validation_images()
    if images:
        step = int(images[0].name.split("-")[1])
        st.image([str(p) for p in images], caption=[f"step {step}"] * len(images), width=128)
    curve = status.out_dir / "loss_curve.png"
    if status.state == "done" and curve.is_file():
        st.image(str(curve), caption="loss", width=480)
    if status.state == "running":
        if st.button("Stop", key="stop"):
            stop_job(job_dir)
            st.rerun()
    elif status.state in ("stopped", "failed"):
        if st.button("Resume from the last checkpoint", key="resume"):
            resume_job(job_dir)
            st.rerun()


# -- Generate ---------------------------------------------------------------------------------------------------------

def generate_tab(args):
    adapters = offered_adapters(args)
    chosen = st.multiselect("Adapters", adapters, format_func=adapter_label, key="adapters")
    weights = [st.slider(f"Weight of {adapter_label(a)}", -1.0, 2.0, 1.0, 0.05, key=f"weight-{a}") for a in chosen]
    prompt = st.text_input("Prompt", DEMO_PROMPT, key="prompt")
    negative = st.text_input("Negative prompt (optional)", "", key="negative_prompt")
    c1, c2, c3, c4 = st.columns(4)
    seed = c1.number_input("Seed", 0, 2**31 - 1, 0, key="seed")
    steps = c2.number_input("Steps", 1, 200, 25, key="gen_steps")
    guidance = c3.number_input("Guidance", 0.0, 30.0, 7.5, step=0.5, key="guidance")
    count = c4.number_input("Images", 1, 16, 4, key="num_images")
    c1, c2, c3 = st.columns(3)
    width = c1.number_input("Width (0: the pipeline's)", 0, 2048, 0, step=8, key="width")
    height = c2.number_input("Height (0: the pipeline's)", 0, 2048, 0, step=8, key="height")
    fuse = c3.checkbox("Fuse the adapters into the weights", key="fuse")
    if st.button("Generate", type="primary", key="generate"):
        settings = GenerationSettings(
            prompt=prompt, negative_prompt=negative or None,
            pretrained_model_name_or_path=getattr(args, "pretrained_model_name_or_path"), revision=args.revision,
            variant=args.variant, loras=[[a, w] for a, w in zip(chosen, weights)], fuse=fuse, seed=int(seed),
            steps=int(steps), guidance=float(guidance), width=int(width) or None, height=int(height) or None,
            num_images=int(count), dtype=args.dtype)
        try:
            settings.check()
            pipe, lock = pipeline(settings.pretrained_model_name_or_path, args.revision, args.variant, args.dtype)
            bar = st.progress(0.0, text="generating")
            with lock:
                images, record = generate(settings, pipe, progress=lambda i, n: bar.progress(i / n,
                                                                                            text=f"step {i}/{n}"))
            bar.empty()
        except UserError as err:
            st.error(f"error: {err}")
        else:
            st.session_state.results = (images, record)
    results = st.session_state.get("results")
    if results:
        images, record = results
        columns = st.columns(min(4, len(images)))
        for i, image in enumerate(images):
            columns[i % len(columns)].image(image, caption=f"seed {record['seeds'][i]}", width="stretch")
        done = record["settings"]
        st.caption(f"{done['width']}x{done['height']}, {done['steps']} steps, {record['scheduler']}, "
                   f"{record['seconds']:.1f} s")
        st.download_button("Download images + settings (.zip)", zip_run(images, record), file_name="lora_sd.zip",
                           mime="application/zip", key="download")


def main():
    st.set_page_config(page_title="DreamBooth LoRA", layout="wide")
    try:
        args = server_args()
    except UserError as err:
        st.error(f"error: {err}")
        st.stop()
    st.title("DreamBooth LoRA for Stable Diffusion")
    if getattr(args, "pretrained_model_name_or_path") is None:
        st.caption("Base: the embedded small pipeline (random weights, 32x32; for demos and tests). Start the server "
                   f"with `-- {FLAG} runwayml/stable-diffusion-v1-5` for real pictures.")
    train, gen = st.tabs(["Train", "Generate"])
    with train:
        train_tab(args)
    with gen:
        generate_tab(args)


main()
