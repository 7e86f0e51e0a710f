"""Auto poster (APP_example/auto_poster/): a theme becomes a poster in five stages. Each stage is a function here, and
run_poster writes each one's result into the run folder, so that a run can be looked at, edited and resumed at any
stage:

    stage    made by                                                 file(s) in the run folder
    plan     ChatGLM, read by poster_plan's tolerant parser          plan.json
    paint    Stable Diffusion text-to-image (sd_generate.generate)   background.png, background.json (its settings)
    layout   poster_layout.make_layout                               layout.json
    render   poster_layout.render_poster                             poster.png
    review   poster_review.review_poster                             review.json

Resuming. run.json records what each stage was made from: the values it read (the plan prompt and ChatGLM for the
plan; the paint prompt, size, seed, steps, guidance and pipeline for the background; the lines, orientation, region
and the background's sha256 for the layout; the sha256 of the files before it for render and review). A stage whose
files are there and whose inputs are the recorded ones is reused; otherwise it is made again, and so, in turn, is
every later stage whose inputs that changes. So a new theme or seed never gets a stale picture, an edited title is laid out again
without repainting, and a file edited by hand (a plan.json with another title, a layout.json moved about) is what the
stages after it read. `redo` makes one stage and all after it again; a plan given by the caller (--plan, the page's
editor) takes the place of ChatGLM's.

Retries. A review that fails (a line outside the margins, too little contrast, text missing) is answered by laying
out again with make_layout(attempt=1, 2, 3, ...: smaller type, another region, then outlines and a shadow) and
rendering and reviewing again, until one passes or `retries` attempts are spent; review.json lists every attempt.

The same plan, background settings and seed give the same poster.png, byte for byte (fp32 on a CPU; see
sd_generate for GPUs).
"""

import io
import math
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from glm_tune.atomic import atomic_path, write_json
from glm_tune.errors import UserError
from glm_tune.locking import hold_output_lock
from glm_tune.poster_layout import Layout, make_layout, render_poster
from glm_tune.poster_plan import FIELDS, PosterPlan, check_theme, parse_plan, plan_prompt, read_plan, write_plan
from glm_tune.poster_review import review_poster, write_review
from glm_tune.run_folder import ModelIdentities, RunFolder, prepare_out_dir, read_json
from glm_tune.sd_generate import GenerationSettings, file_sha256, fit_image

STAGES = ("plan", "paint", "layout", "render", "review")
FILES = {"plan": ("plan.json",), "paint": ("background.png", "background.json"), "layout": ("layout.json",),
         "render": ("poster.png",), "review": ("review.json",)}
SAMPLE_THEME = "五一劳动节促销"  # the embedded default's theme
DEFAULT_SIZE = (768, 1024)
MIN_SIDE, MAX_SIDE = 64, 4096
NEGATIVE_PROMPT = "text, letters, words, watermark, logo, signature"  # the text is drawn later, sharp
PLAN_TOKENS = 384  # a plan of Chinese lines is ~150-250 ChatGLM tokens


# -- what a run is made with ------------------------------------------------------------------------------------------

def parse_size(text, flag="--size"):
    """'768x1024' -> (768, 1024); anything else a one-line UserError."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", str(text))
    if not match:
        raise UserError(f"{flag} {text}: not WIDTHxHEIGHT (e.g. 768x1024)")
    return check_size((int(match.group(1)), int(match.group(2))), flag)


def check_size(size, flag="--size"):
    width, height = size
    if any(side % 8 or not MIN_SIDE <= side <= MAX_SIDE for side in size):
        raise UserError(f"{flag} {width}x{height}: each side must be a multiple of 8 between {MIN_SIDE} and "
                        f"{MAX_SIDE}")
    return width, height


@dataclass
class PosterSettings(ModelIdentities):
    """What a run is made with besides the theme or plan; each is a flag of poster.py."""

    size: tuple = DEFAULT_SIZE
    background: str | None = None  # a picture to use instead of painting one
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    negative_prompt: str | None = NEGATIVE_PROMPT
    retries: int = 0
    model_name_or_path: str | None = None  # ChatGLM, for the plan
    revision: str | None = None
    lora_path: str | None = None
    dtype: str = "auto"
    pretrained_model_name_or_path: str | None = None  # Stable Diffusion, for the background
    sd_revision: str | None = None
    variant: str | None = None
    sd_dtype: str = "fp32"

    def check(self):
        """Bad numbers and files fail here, one line each, before any model loads."""
        self.size = check_size(tuple(self.size))
        if self.retries < 0:
            raise UserError(f"--retries {self.retries}: must be 0 or more")
        self.generation("-", (8, 8)).check()
        if self.background is not None:
            open_background(self.background)
        return self

    def generation(self, prompt, paint_size):
        return GenerationSettings(prompt=prompt, negative_prompt=self.negative_prompt,
                                  pretrained_model_name_or_path=self.pretrained_model_name_or_path,
                                  revision=self.sd_revision, variant=self.variant, dtype=self.sd_dtype,
                                  seed=self.seed, steps=self.steps, guidance=self.guidance,
                                  width=paint_size[0], height=paint_size[1])


def open_background(path, flag="--background"):
    from glm_tune.sd_lora import open_image

    if not Path(path).is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        return open_image(path)
    except UserError as err:
        raise UserError(f"{flag} {err}") from None


# -- the stages -------------------------------------------------------------------------------------------------------

def chatglm(settings):
    """The greedy ChatGLM of `settings`' ChatGLM flags."""
    from glm_tune.chat_model import greedy_chatglm

    return greedy_chatglm(PLAN_TOKENS, settings.model_name_or_path, settings.revision, settings.lora_path, settings.dtype)


def make_plan(theme, llm):
    """Stage 1, plan: ChatGLM's plan of a poster for `theme`, every gap in it filled (poster_plan.parse_plan)."""
    return parse_plan(llm.invoke(plan_prompt(theme)).content, theme)


def sd_pipeline(settings):
    """The text-to-image pipeline that settings name (the embedded small one by default)."""
    from glm_tune.sd_checkpoint import load_pipeline, resolve_sd_path
    from glm_tune.sd_generate import device_and_dtype

    device, dtype = device_and_dtype(settings.sd_dtype)
    folder = resolve_sd_path(settings.pretrained_model_name_or_path, settings.sd_revision, settings.variant)
    return load_pipeline(folder, dtype, device, settings.variant)


def paint_size(pipe, size):
    """The size a background for a `size` poster is painted at: the pipeline's native area (its UNet's sample size
    times the VAE's scale: 512x512 for SD 1.5, 32x32 for the embedded pipeline) in the poster's aspect ratio, each
    side a multiple of 8 (the VAE works on 8-pixel blocks).

    Not the poster's own size: SD draws well only near the resolution it was trained at, and far above it repeats
    its subject (two heads, a tiled crowd); the embedded random UNet has attention at every level, whose cost grows
    with the square of the pixels (a 768x1024 canvas would not fit in memory). The painting is resized to the poster
    afterwards; a background loses little by the upscale, and the text is drawn at full resolution on top."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = size
    scale = native / math.sqrt(width * height)
    return max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8)


def paint(plan, settings, pipe):
    """Stage 2, paint: the background for `plan`, painted at paint_size and resized to the poster (cropped to its
    aspect ratio first: the painting's is rounded). Returns (image, record); the record is sd_generate's settings
    file, so `lora_sd/generate.py --settings background.json` paints the same picture again (at paint size)."""
    from glm_tune.sd_generate import generate

    images, record = generate(settings.generation(plan.paint_prompt(), paint_size(pipe, settings.size)), pipe)
    return fit_image(images[0], *settings.size), {**record, "source": "painted", "size": list(settings.size)}


def supplied_background(path, size):
    """Stage 2 without painting: the picture at `path`, cropped to the poster's aspect ratio and resized to it."""
    image = open_background(path)
    record = {"source": "supplied", "path": str(Path(path).resolve()), "sha256": file_sha256(path),
              "original_size": list(image.size), "size": list(size)}
    return fit_image(image, *size), record


def lay_out(plan, background, attempt=0):
    """Stage 3, layout: where each line of `plan` goes on `background`, in what type and colours (the mood's colours
    first, where they are legible)."""
    return make_layout(background, plan.blocks(), plan.orientation, plan.region, attempt=attempt,
                       palette=plan.palette())


# Stage 4, render, is poster_layout.render_poster(background, layout).


def review(poster, layout, plan):
    """Stage 5, review: does `poster` show every line of `plan`, inside the margins, readable?"""
    return review_poster(poster, layout, [text for _, text in plan.blocks()])


# -- the run folder ---------------------------------------------------------------------------------------------------

def save_png(image, path):
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_review(result, attempts, path):
    """review.json: the review (write_review), with the attempts that led to it; returns what the file holds."""
    write_review(result, path)
    data = {**read_json(path), "attempts": attempts}
    write_json(path, data)
    return data


def attempt_summary(layout, review_data):
    return {"attempt": layout.attempt, "region": layout.region, "passed": review_data["passed"],
            "failed": [name for name, check in review_data["checks"].items() if not check["passed"]]}


# -- the pipeline -----------------------------------------------------------------------------------------------------

@dataclass
class PosterRun:
    """What run_poster made or reused, stage by stage."""

    out_dir: Path
    plan: PosterPlan
    background: object  # PIL image at the poster's size
    background_record: dict  # background.json
    layout: Layout
    poster: object  # PIL image
    review: dict  # review.json, attempts included
    status: dict = field(default_factory=dict)  # stage -> "made", "reused" or "given"

    @property
    def passed(self):
        return bool(self.review["passed"])

    def files(self):
        names = {"plan": "plan.json", "background": "background.png", "background_settings": "background.json",
                 "layout": "layout.json", "poster": "poster.png", "review": "review.json"}
        return {key: str(self.out_dir / name) for key, name in names.items()}

    def summary(self):
        return {"files": self.files(), "stages": self.status, "review_passed": self.passed,
                "attempts": len(self.review.get("attempts", [])), "size": list(self.poster.size),
                "provenance": dict(Counter(self.plan.provenance.get(name, "user") for name in FIELDS))}


def plan_notes(plan, given=False):
    """One line each for what in the plan did not come from its author as it was (defaults, mending, clipping)."""
    notes = []
    author = "the plan given" if given else "ChatGLM's answer"
    defaulted = plan.fields_from("default")
    if len(defaulted) == len(FIELDS):
        notes.append(f"note: every plan field came from defaults, since {author} held no usable plan: "
                     f"{', '.join(defaulted)}")
    elif defaulted:
        notes.append(f"note: {len(defaulted)} of {len(FIELDS)} plan fields came from defaults, not from {author}: "
                     f"{', '.join(defaulted)}")
    mended = [f"{name} {plan.provenance[name]}" for name in plan.fields_from("repaired", "clipped")]
    if plan.repairs or mended:
        notes.append("note: ChatGLM's plan was mended: " + "; ".join(
            ([f"its JSON had {', '.join(plan.repairs)}"] if plan.repairs else []) + mended))
    return notes


def run_poster(theme, settings, out_dir, plan=None, redo=None, llm=None, pipe=None, log=None):
    """Every stage into `out_dir`, each reused when it can be (see the module docstring); returns a PosterRun.

    theme: what the poster is for (ignored when `plan`, a PosterPlan, is given instead of asking ChatGLM).
    redo: a stage name; that stage and every one after it are made again.
    llm, pipe: the ChatGLM and SD pipeline to use (a server passes those it keeps loaded); by default loaded from
    `settings`, and only when a stage needs them.
    log: called with one line per stage (its file, made or reused), and with the notes on the plan."""
    settings.check()
    theme = plan.theme if plan is not None else check_theme(theme)
    if redo is not None and redo not in STAGES:
        raise UserError(f"--redo {redo}: choose one of {', '.join(STAGES)}")
    out_dir = prepare_out_dir(out_dir)
    with hold_output_lock(out_dir, "--out"):
        steps = _Steps(RunFolder(out_dir, FILES), settings, STAGES[STAGES.index(redo):] if redo else (), log)
        plan = steps.plan(theme, plan, llm)
        background, background_record = steps.paint(plan, pipe)
        layout = steps.layout(plan, background)
        poster = steps.render(background, layout)
        result = steps.review(plan, layout, poster)
        for attempt in range(1, settings.retries + 1):
            if result["passed"]:
                break
            attempts = result.get("attempts") or [attempt_summary(layout, result)]
            steps.log(f"retry {attempt} of {settings.retries}: the review {verdict(result)}; laying out again")
            layout = steps.layout(plan, background, attempt)
            poster = steps.render(background, layout, again=True)
            result = steps.review(plan, layout, poster, attempts)
    return PosterRun(out_dir, plan, background, background_record, layout, poster, result, steps.status)


class _Steps:
    """run_poster's stages on one run folder: each reuses its files or makes them, records its inputs in run.json,
    and logs one line naming its file."""

    def __init__(self, folder, settings, forced, log):
        self.folder, self.settings, self.forced = folder, settings, set(forced)
        self.log = log or (lambda line: None)
        self.status = {}  # stage -> made, reused or given

    def step(self, name, inputs, make, load, label, detail=None, again=False):
        if not again and name not in self.forced and self.folder.reusable(name, inputs):
            how = "reused, edited by hand" if self.folder.edited(name) else "reused"
            result = load()
        else:
            how = "made"
            result = make()
            self.folder.made(name, inputs)
        self.status[name] = how.split(",")[0]
        self.log(f"{label}: {self.folder.path(FILES[name][0])} ({how}{detail(result) if detail else ''})")
        return result

    def plan(self, theme, given, llm):
        path = self.folder.path("plan.json")
        if given is not None:
            write_plan(given, path)
            self.folder.made("plan", {"given": given.to_json()})
            self.status["plan"] = "given"
            self.log(f"plan: {path} (given)")
            plan = given
        else:
            def make():
                made = make_plan(theme, llm or chatglm(self.settings))
                write_plan(made, path)
                return made

            inputs = {"prompt": plan_prompt(theme), "chatglm": self.settings.chatglm_identity()}
            plan = self.step("plan", inputs, make, lambda: read_plan(path), "plan")
        for note in plan_notes(plan, given=given is not None):
            self.log(note)
        return plan

    def paint(self, plan, pipe):
        settings, size = self.settings, self.settings.size
        image_path, record_path = self.folder.path("background.png"), self.folder.path("background.json")
        if settings.background is not None:
            inputs = {"background": file_sha256(settings.background), "size": size}
        else:
            inputs = {"prompt": plan.paint_prompt(), "negative_prompt": settings.negative_prompt, "size": size,
                      "seed": settings.seed, "steps": settings.steps, "guidance": settings.guidance,
                      "pipeline": settings.pipeline_identity()}

        def make():
            if settings.background is not None:
                image, record = supplied_background(settings.background, size)
            else:
                image, record = paint(plan, settings, pipe or sd_pipeline(settings))
            save_png(image, image_path)
            write_json(record_path, record)
            return image, record

        def load():
            image = open_background(image_path, flag="background")
            return (image if image.size == size else fit_image(image, *size)), read_json(record_path)

        def detail(result):
            record = result[1]
            if record.get("source") == "supplied":
                return f": {record['path']}; its record: {record_path}"
            width, height = record["settings"]["width"], record["settings"]["height"]
            return f": painted at {width}x{height}, resized to {size[0]}x{size[1]}; its settings: {record_path}"

        return self.step("paint", inputs, make, load, "background", detail)

    def layout(self, plan, background, attempt=0):
        path = self.folder.path("layout.json")
        inputs = {"blocks": plan.blocks(), "orientation": plan.orientation, "region": plan.region,
                  "palette": plan.palette(), "background": file_sha256(self.folder.path("background.png"))}

        def make():
            made = lay_out(plan, background, attempt)
            write_json(path, made.to_json())
            return made

        def detail(made):
            return f": attempt {made.attempt}, {made.orientation} text in the {made.region} region"

        return self.step("layout", inputs, make, lambda: Layout.from_json(read_json(path), where=str(path)),
                         "layout", detail, again=attempt > 0)

    def render(self, background, layout, again=False):
        path = self.folder.path("poster.png")
        inputs = {"layout": file_sha256(self.folder.path("layout.json")),
                  "background": file_sha256(self.folder.path("background.png"))}

        def make():
            made = render_poster(background, layout)
            save_png(made, path)
            return made

        return self.step("render", inputs, make, lambda: open_background(path, flag="poster"), "poster",
                         again=again)

    def review(self, plan, layout, poster, attempts=None):
        path = self.folder.path("review.json")
        inputs = {"poster": file_sha256(self.folder.path("poster.png")),
                  "layout": file_sha256(self.folder.path("layout.json")),
                  "expected": [text for _, text in plan.blocks()]}

        def make():
            made = review(poster, layout, plan)
            return save_review(made, [*(attempts or []), attempt_summary(layout, made.to_json())], path)

        return self.step("review", inputs, make, lambda: read_json(path), "review",
                         lambda data: f": {verdict(data)}", again=attempts is not None)


def verdict(review_data):
    failed = [name for name, check in review_data["checks"].items() if not check["passed"]]
    return f"passed all {len(review_data['checks'])} checks" if not failed else f"failed: {', '.join(failed)}"


# -- for the page -----------------------------------------------------------------------------------------------------

ROLE_COLOURS = {"title": (255, 48, 48), "subtitle": (255, 190, 0), "body": (0, 170, 255)}


def preview_layout(background, layout):
    """The background with each line's box drawn over it, coloured by role (the page's layout view)."""
    from PIL import ImageDraw

    image = background.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    width = max(2, min(image.size) // 200)
    for line in layout.lines:
        draw.rectangle(tuple(line.box), outline=ROLE_COLOURS.get(line.role, (255, 255, 255)), width=width)
    return image


def zip_poster(out_dir):
    """poster.png, plan.json, layout.json and review.json of a run folder as one .zip (bytes), for a download."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in ("poster.png", "plan.json", "layout.json", "review.json"):
            archive.write(Path(out_dir) / name, name)
    return buffer.getvalue()
