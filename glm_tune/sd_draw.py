"""Real-time drawing with Stable Diffusion (APP_example/real_time_draw/): a sketch and a prompt become an image in a
few denoising steps, fast enough to redo after every stroke.

The pipeline is diffusers' image-to-image pipeline (AutoPipelineForImage2Image on an SD 1.x/2.x folder) with its
scheduler replaced by the latent-consistency one (`LCMScheduler.from_config(pipe.scheduler.config)`: the same noise
schedule and prediction type as the folder's own scheduler, LCM's timestep selection and boundary-condition update).
An LCM-LoRA (e.g. latent-consistency/lcm-lora-sdv1-5, downloaded by you into a folder) makes a base model denoise in
1-8 steps; it is loaded with the same adapter code as the lora_sd app (glm_tune.sd_generate.apply_adapters) and fused
into the weights and its adapter layers removed, because a real-time loop would pay for them on every step.

What "steps" and "strength" mean here: as in latent-consistency's own img2img pipeline, `steps` denoising steps run
(UNet calls, hence the latency), at timesteps spread over the part of LCM's schedule below strength x 1000.
diffusers' SD img2img pipeline, left to itself, would run int(steps x strength) steps of a full schedule (4 steps at
strength 0.6 silently becoming 2, and 1 step at any strength from 0.5 to 1 the same frame); draw() gives it LCM's
timesteps and strength 1 instead, which adds the noise at the first of those timesteps: the same img2img.

Determinism: every frame starts from a CPU generator seeded with `seed` (the VAE's latent sample and the added noise
both come from it), so a fixed seed and sketch give the same pixels (fp32 on a CPU; tests check it), and consecutive
frames of a drawing share their noise: a new stroke changes the picture where the stroke is, instead of reshuffling
all of it.

A pipeline is loaded once per (model folder, LCM-LoRA, dtype, device) and kept (load_draw_pipeline), with a lock that
lets one caller at a time use it: the scheduler keeps per-call state, and Streamlit sessions share one pipeline.
"""

import contextlib
import hashlib
import io
import json
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from glm_tune.errors import UserError, first_line
from glm_tune.sd_checkpoint import load_pipeline, resolve_sd_path
from glm_tune.sd_generate import DTYPES, apply_adapters, device_and_dtype, lora_file

SETTINGS_VERSION = 1
MAX_STEPS = 50  # LCMScheduler's original_inference_steps: every schedule is a subset of its 50 timesteps
PIPELINE_CACHE_SIZE = 2  # pipelines kept loaded (an SD 1.5 pipeline is ~2-4 GB)
WHITE = (255, 255, 255)


# -- settings ---------------------------------------------------------------------------------------------------------

@dataclass
class DrawSettings:
    """Everything that decides a frame's pixels besides the sketch; written beside a frame as JSON."""

    prompt: str
    steps: int = 4
    guidance: float = 1.0
    strength: float = 0.6
    seed: int = 0
    width: int | None = None  # None: the pipeline's own size (512 for SD 1.x, 32 for the embedded pipeline)
    height: int | None = None
    pretrained_model_name_or_path: str | None = None
    revision: str | None = None
    variant: str | None = None
    lcm_lora: str | None = None
    dtype: str = "fp32"

    def check(self):
        """The settings themselves (sizes, ranges, prompt); a bad one is a one-line UserError naming its flag."""
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise UserError(f"--{name} {value}: must be a positive multiple of 8 (Stable Diffusion's VAE works "
                                "on 8-pixel blocks)")
        if not 1 <= self.steps <= MAX_STEPS:
            raise UserError(f"--steps {self.steps}: must be between 1 and {MAX_STEPS} (LCM: 1-8 is the usual range)")
        if not 0 < self.strength <= 1:
            raise UserError(f"--strength {self.strength}: must be in (0, 1] (how much of the sketch is repainted)")
        if self.guidance < 0:
            raise UserError(f"--guidance {self.guidance}: must be >= 0 (1 or less turns classifier-free guidance "
                            "off, as LCM wants)")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        if not self.prompt or not self.prompt.strip():
            raise UserError("--prompt: empty; say what the sketch should become")
        if self.steps > int(MAX_STEPS * self.strength):
            raise UserError(f"--steps {self.steps} at --strength {self.strength}: LCM's schedule has "
                            f"{int(MAX_STEPS * self.strength)} timesteps below that strength; lower --steps or raise "
                            f"--strength to at least {self.steps / MAX_STEPS:.2f}")
        return self


def lcm_timesteps(scheduler, steps, strength):
    """The `steps` timesteps of an LCM img2img frame at `strength`, as latent-consistency's own img2img pipeline picks
    them: evenly spaced over the part of LCM's 50-step distillation schedule below strength x 1000 (strength 0.6,
    4 steps: 599, 459, 299, 139). Fewer than `steps` timesteps there is a one-line UserError."""
    original = scheduler.config.original_inference_steps
    if steps > int(original * strength):
        raise UserError(f"--steps {steps} at --strength {strength}: LCM's schedule has {int(original * strength)} "
                        f"timesteps below that strength; lower --steps or raise --strength to at least "
                        f"{steps / original:.2f}")
    scheduler.set_timesteps(steps, strength=strength)
    return [int(t) for t in scheduler.timesteps]


# -- sketches ---------------------------------------------------------------------------------------------------------

def flatten(image, background=WHITE):
    """RGB, with transparent parts shown over `background` (a drawing's empty canvas is transparent; read as plain
    RGB its transparent pixels would turn black)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert("RGB")


def array_to_image(array, flag="sketch"):
    """A numpy image (H x W, H x W x 1/3/4; uint8 0-255 or float 0-1, what a canvas or np.asarray(PIL) gives) as PIL,
    alpha kept."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape[:2]:
        raise UserError(f"{flag}: an image array must be H x W, H x W x 3 (RGB) or H x W x 4 (RGBA), got shape "
                        f"{array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number):
            raise UserError(f"{flag}: an image array of {array.dtype}; needs numbers")
        scale = 255.0 if np.issubdtype(array.dtype, np.floating) and array.max(initial=0) <= 1.0 else 1.0
        array = np.clip(np.asarray(array, dtype=np.float64) * scale, 0, 255).round().astype(np.uint8)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[2] if array.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(array), mode)


def load_sketch(source, flag="--sketch"):
    """The sketch as PIL RGB (transparency over white): `source` is a path, PNG/JPEG bytes, a PIL image or a numpy
    array. An unreadable one is a one-line UserError that starts with `flag` and the path."""
    if isinstance(source, Image.Image):
        return flatten(source)
    if isinstance(source, np.ndarray):
        return flatten(array_to_image(source, flag))
    if isinstance(source, (bytes, bytearray)):
        where, opener = flag, lambda: io.BytesIO(bytes(source))
    else:
        path = Path(source)
        where, opener = f"{flag} {path}", lambda: path
        if not path.is_file():
            raise UserError(f"{where}: no such file" if not path.exists() else f"{where}: not a file")
    try:
        with Image.open(opener()) as image:
            image.load()
            return flatten(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UserError(f"{where}: not an image that can be read ({first_line(err)})") from None


def prepare_sketch(sketch, width, height):
    """The sketch stretched to width x height (the pipeline's input; every stroke is kept, where a crop could cut
    some off). A size that is not a positive multiple of 8 is a one-line UserError."""
    for name, value in (("width", width), ("height", height)):
        if value < 8 or value % 8:
            raise UserError(f"--{name} {value}: must be a positive multiple of 8 (Stable Diffusion's VAE works on "
                            "8-pixel blocks)")
    image = load_sketch(sketch)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def compose_sketch(background, strokes=None):
    """What the page's canvas shows, as one RGB image: the canvas's strokes (RGBA, transparent where nothing is drawn;
    None before the canvas sends anything) over `background` (what load_sketch takes), at the strokes' size. The
    canvas component returns its strokes only; the browser draws the background behind them."""
    base = load_sketch(background, "background")
    if strokes is None:
        return base
    layer = array_to_image(strokes, "canvas").convert("RGBA")
    if base.size != layer.size:
        base = base.resize(layer.size, Image.Resampling.LANCZOS)
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


def fingerprint(sketch, settings):
    """A digest of a sketch (its RGB pixels) and settings: equal exactly when a frame would be the same."""
    pixels = np.asarray(load_sketch(sketch))
    digest = hashlib.sha256(repr(pixels.shape).encode())
    digest.update(pixels.tobytes())
    digest.update(json.dumps(asdict(settings), sort_keys=True).encode())
    return digest.hexdigest()


# -- pipelines --------------------------------------------------------------------------------------------------------

@dataclass
class DrawPipeline:
    """A loaded img2img pipeline with the LCM scheduler (and LCM-LoRA fused, if any), and the lock its users take."""

    pipe: object
    folder: Path
    lcm_lora: str | None
    dtype: str
    lock: threading.Lock

    @property
    def default_size(self):
        """(width, height) the model was trained at: the UNet's sample size times the VAE's downscaling."""
        side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return side, side


def lcm_scheduler(config):
    """An LCMScheduler with a folder scheduler's noise schedule and prediction type (keys LCM has no use for, such as
    PNDM's skip_prk_steps, are left out rather than warned about)."""
    import inspect

    from diffusers import LCMScheduler

    accepted = set(inspect.signature(LCMScheduler.__init__).parameters) - {"self"}
    return LCMScheduler.from_config({k: v for k, v in dict(config).items() if k in accepted or k.startswith("_")})


_pipelines = OrderedDict()
_pipelines_lock = threading.Lock()


def load_draw_pipeline(pretrained_model_name_or_path=None, lcm_lora=None, dtype="fp32", revision=None, variant=None,
                       device=None):
    """The img2img pipeline for these arguments, loaded on first use and kept (the PIPELINE_CACHE_SIZE most recent).
    `lcm_lora` is a LoRA weights file or a folder holding pytorch_lora_weights.safetensors; anything else is a
    one-line UserError (checked before the model loads)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    lora_path = str(lora_file(lcm_lora, "--lcm_lora").resolve()) if lcm_lora is not None else None
    folder = resolve_sd_path(pretrained_model_name_or_path, revision, variant)
    default_device, torch_dtype = device_and_dtype(dtype)
    device = str(device or default_device)
    key = (str(Path(folder).resolve()), lora_path, dtype, device, variant)
    with _pipelines_lock:
        if key in _pipelines:
            _pipelines.move_to_end(key)
            return _pipelines[key]
        pipe = load_pipeline(folder, torch_dtype, device, variant, kind="image2image")
        pipe.scheduler = lcm_scheduler(pipe.scheduler.config)
        if lcm_lora is not None:
            with _quiet("diffusers.loaders.lora_base"):  # "no LoRA keys for the text encoder": LCM-LoRAs have none
                apply_adapters(pipe, [(lcm_lora, 1.0)], fuse=True, flag="--lcm_lora")
            # the fused weights stay, PEFT's wrapper layers go: they cost ~10% of a frame even when merged (measured
            # on the embedded pipeline, 48 vs 43 ms at 4 steps)
            pipe.unload_lora_weights()
        loaded = DrawPipeline(pipe, Path(folder), lora_path, dtype, threading.Lock())
        _pipelines[key] = loaded
        while len(_pipelines) > PIPELINE_CACHE_SIZE:
            _pipelines.popitem(last=False)
        return loaded


def clear_pipeline_cache():
    with _pipelines_lock:
        _pipelines.clear()


# -- drawing ----------------------------------------------------------------------------------------------------------

@dataclass
class Frame:
    """One generated image, how long it took (sketch in to image out), and what its settings file holds."""

    image: Image.Image
    seconds: float
    record: dict


def _sync(pipe):
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)


@contextlib.contextmanager
def _quiet(logger_name):
    """diffusers' `logger_name` silenced but for errors, for warnings that are expected here."""
    from diffusers.utils import logging

    logger = logging.get_logger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def draw(sketch, settings, pipeline=None):
    """One frame: `sketch` (path, bytes, PIL image or array) turned into an image for `settings` (DrawSettings) with
    `steps` LCM steps. `pipeline` (a DrawPipeline) defaults to the one load_draw_pipeline keeps for the settings."""
    import diffusers

    settings.check()
    if pipeline is None:
        pipeline = load_draw_pipeline(settings.pretrained_model_name_or_path, settings.lcm_lora, settings.dtype,
                                      settings.revision, settings.variant)
    default_w, default_h = pipeline.default_size
    width, height = settings.width or default_w, settings.height or default_h
    pipe = pipeline.pipe
    with pipeline.lock:
        _sync(pipe)
        started = time.perf_counter()
        image = prepare_sketch(sketch, width, height)
        timesteps = lcm_timesteps(pipe.scheduler, settings.steps, settings.strength)
        generator = torch.Generator("cpu").manual_seed(settings.seed)
        try:
            # LCMScheduler warns on every custom schedule that does not start at 999: every img2img frame, by design
            with torch.inference_mode(), _quiet("diffusers.schedulers.scheduling_lcm"):
                result = pipe(settings.prompt, image=image, strength=1.0, timesteps=timesteps,
                              guidance_scale=settings.guidance, generator=generator)
        except ValueError as err:  # what diffusers checks itself (e.g. a prompt it cannot take)
            raise UserError(f"cannot draw: {first_line(err)[:300]}") from None
        _sync(pipe)
        seconds = time.perf_counter() - started
    out = result.images[0]
    sketch_digest = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
    record = {"version": SETTINGS_VERSION, "settings": asdict(settings) | {"width": width, "height": height},
              "timesteps": timesteps, "scheduler": type(pipe.scheduler).__name__, "sketch_sha256": sketch_digest,
              "device": str(pipe.device), "diffusers": diffusers.__version__, "torch": torch.__version__,
              "seconds": round(seconds, 4)}
    return Frame(out, seconds, record)


class Regenerator:
    """Draws a new frame only when the sketch or settings differ from the last frame's: Streamlit reruns the page on
    every widget event (and on reruns with nothing new), and only a new stroke or setting is worth the latency."""

    def __init__(self):
        self.key = None
        self.frame = None
        self.frames = 0  # frames drawn so far

    def __call__(self, sketch, settings, pipeline=None):
        """(frame, True) for a newly drawn frame, (the last frame, False) when nothing changed."""
        key = fingerprint(sketch, settings)
        if key == self.key and self.frame is not None:
            return self.frame, False
        frame = draw(sketch, settings, pipeline)
        self.key, self.frame = key, frame
        self.frames += 1
        return frame, True
