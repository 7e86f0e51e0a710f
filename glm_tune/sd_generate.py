"""Stable Diffusion generation with several LoRA adapters mixed by weight (APP_example/lora_sd/generate.py and the
lora_sd page), the settings file that reproduces a run, and the colour statistic the embedded demo is judged by.

Adapters are diffusers-format LoRA files (`pytorch_lora_weights.safetensors`, what train_lora_sd.py and diffusers'
own train_dreambooth_lora.py write), loaded with `pipe.load_lora_weights` and mixed with `pipe.set_adapters`; with
fuse=True they are added into the base weights (`pipe.fuse_lora`), which gives the same images faster.

Image i of a run is drawn from its own CPU generator seeded with seed + i, so that every image can be made again
alone, on any device, from the settings file: the same model folder, adapters, prompt and numbers give the same
pixels (tests check this with fp32 on a CPU; on a GPU kernels may differ in the last bits).

With an `image`, generation is image-to-image (diffusers' img2img pipeline over the same components, nothing
loaded twice): the image is cropped to the output's aspect ratio and resized to it, noised to `strength` (0 keeps
it, 1 replaces it) and denoised; as in diffusers, int(steps x strength) of the `steps` denoising steps run. The
settings file records the image's path and sha256, and reading it back refuses an image that has changed since.
"""

import hashlib
import io
import json
import re
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from glm_tune.atomic import atomic_path, write_json
from glm_tune.errors import UserError, first_line
from glm_tune.sd_checkpoint import DTYPES, load_pipeline, resolve_sd_path

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name; a folder given as an adapter is read for it
LORA_KEY = re.compile(r"lora[._](A|B|down|up)\b|lora_(down|up)|\.alpha$")
SETTINGS_VERSION = 1


# -- adapters ---------------------------------------------------------------------------------------------------------

def parse_lora_spec(spec, flag="--lora"):
    """'PATH' or 'PATH:WEIGHT' -> (PATH, weight); the weight defaults to 1."""
    path, sep, weight = str(spec).rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass  # a ':' inside the path
    return str(spec), 1.0


def lora_file(path, flag="--lora"):
    """The adapter file that `path` names (the file itself, or a folder's pytorch_lora_weights.safetensors), checked
    to hold LoRA tensors; every way it cannot be used is a one-line UserError."""
    path = Path(path)
    where = f"{flag} {path}"
    if path.is_dir():
        candidates = [path / LORA_FILE, path / "pytorch_lora_weights.bin"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise UserError(f"{where}: no {LORA_FILE} in this folder (train_lora_sd.py writes one into its "
                            "--output_dir and each checkpoint-N)")
        path = found
    elif not path.is_file():
        raise UserError(f"{where}: no such file or folder")
    keys = _tensor_names(path, where)
    if not keys or not any(LORA_KEY.search(k) for k in keys):
        example = f" (e.g. {sorted(keys)[0]})" if keys else ""
        raise UserError(f"{where}: not LoRA weights: none of its {len(keys)} tensors is a LoRA matrix{example}")
    return path


def _tensor_names(path, where):
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors/pickle raise many kinds on a file of another format
        raise UserError(f"{where}: not a safetensors or PyTorch weights file ({first_line(err)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{where}: not a state dict of tensors")
    return [k for k, v in state.items() if isinstance(v, torch.Tensor)]


def _peft_is_too_old_for_transformers():
    """transformers 5 refuses its adapter methods (`load_adapter`, which diffusers calls to put a LoRA into the text
    encoder) with peft older than it wants (0.22); diffusers' other adapter operations work on PEFT directly."""
    from importlib.metadata import version

    from packaging.version import Version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:
        return False
    return Version(version("peft")) < Version(MIN_PEFT_VERSION)


def _load_adapter_with_peft(model):
    """transformers' PreTrainedModel.load_adapter for what diffusers asks of it, done with PEFT directly (used where
    the installed peft is older than transformers accepts): inject the layers, load the tensors, record the config."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    def load_adapter(adapter_name, adapter_state_dict, peft_config, **kwargs):
        with warnings.catch_warnings():  # "Already found a peft_config": a second adapter, as intended
            warnings.simplefilter("ignore", UserWarning)
            inject_adapter_in_model(peft_config, model, adapter_name)
        result = set_peft_model_state_dict(model, adapter_state_dict, adapter_name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise ValueError(f"text encoder LoRA tensors match no layer, e.g. {unexpected[0]}")
        if not getattr(model, "_hf_peft_config_loaded", False) or not hasattr(model, "peft_config"):
            model.peft_config = {}
        model.peft_config[adapter_name] = peft_config
        model._hf_peft_config_loaded = True

    return load_adapter


def clear_adapters(pipe):
    """Back to the base weights: unfuse what was fused, then drop every adapter."""
    if getattr(pipe, "num_fused_loras", 0):
        pipe.unfuse_lora()
    if pipe.get_list_adapters():
        pipe.unload_lora_weights()


def apply_adapters(pipe, loras, fuse=False, flag="--lora"):
    """Load `loras` ([(path, weight)]) into `pipe` as adapters lora0, lora1, ... mixed with their weights; with `fuse`
    add them into the base weights. Adapters already in `pipe` are removed first. Returns the adapter names."""
    clear_adapters(pipe)
    if not loras:
        return []
    if _peft_is_too_old_for_transformers() and pipe.text_encoder is not None:
        pipe.text_encoder.load_adapter = _load_adapter_with_peft(pipe.text_encoder)
    names = []
    for i, (path, weight) in enumerate(loras):
        file = lora_file(path, flag)
        name = f"lora{i}"
        try:
            with warnings.catch_warnings():  # peft: "Already found a peft_config": a second adapter, as intended
                warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
                pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            clear_adapters(pipe)
            raise UserError(f"{flag} {path}: cannot load it into this pipeline ({first_line(err)[:300]}); was it "
                            "trained on another base model?") from None
        loaded = {n for names_ in pipe.get_list_adapters().values() for n in names_}
        if name not in loaded:
            clear_adapters(pipe)
            raise UserError(f"{flag} {path}: none of its LoRA tensors matches a layer of this pipeline's UNet or text "
                            "encoder (an adapter for another model family?)")
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[float(w) for _, w in loras])
    if fuse:
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    return names


# -- generation -------------------------------------------------------------------------------------------------------

@dataclass
class GenerationSettings:
    """Everything that decides a run's pixels; written beside the images as JSON and read back by --settings."""

    prompt: str
    negative_prompt: str | None = None
    pretrained_model_name_or_path: str | None = None
    revision: str | None = None
    variant: str | None = None
    loras: list = field(default_factory=list)  # [[path, weight]]
    fuse: bool = False
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    dtype: str = "fp32"
    image: str | None = None  # image-to-image from this picture
    strength: float = 0.8

    def check(self):
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise UserError(f"--{name} {value}: must be a positive multiple of 8 (Stable Diffusion's VAE works on "
                                "8-pixel blocks)")
        if self.steps < 1:
            raise UserError(f"--steps {self.steps}: must be at least 1")
        if self.num_images < 1:
            raise UserError(f"--num_images {self.num_images}: must be at least 1")
        if self.guidance < 0:
            raise UserError(f"--guidance {self.guidance}: must be >= 0 (1 turns classifier-free guidance off)")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        if not self.prompt or not self.prompt.strip():
            raise UserError("--prompt: empty; say what to draw")
        if not 0 < self.strength <= 1:
            raise UserError(f"--strength {self.strength}: must be in (0, 1] (how much of the image is redrawn)")
        if self.image is not None and not Path(self.image).is_file():
            raise UserError(f"--image {self.image}: no such file")
        return self

    @classmethod
    def from_json(cls, path):
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise UserError(f"--settings {path}: cannot read it ({err.strerror})") from None
        except ValueError as err:
            raise UserError(f"--settings {path}: not valid JSON ({err})") from None
        if not isinstance(data, dict) or "settings" not in data:
            raise UserError(f"--settings {path}: not a settings file of generate.py (no \"settings\")")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data["settings"]) - known)
        if unknown:
            raise UserError(f"--settings {path}: unknown setting(s) {unknown}")
        try:
            settings = cls(**data["settings"]).check()
        except TypeError as err:
            raise UserError(f"--settings {path}: {err}") from None
        recorded = data.get("image_sha256")
        if settings.image is not None and recorded and file_sha256(settings.image) != recorded:
            raise UserError(f"--settings {path}: {settings.image} has changed since the run (its sha256 differs), so "
                            "the images cannot be made again")
        return settings


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fit_image(image, width, height):
    """`image` cropped (centred) to width:height and resized to width x height."""
    from PIL import Image, ImageOps

    return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)


def image_to_image(pipe):
    """The img2img pipeline on `pipe`'s components (made once per pipeline and kept on it)."""
    from diffusers import AutoPipelineForImage2Image, StableDiffusionImg2ImgPipeline

    if isinstance(pipe, StableDiffusionImg2ImgPipeline):
        return pipe
    if getattr(pipe, "_glm_tune_img2img", None) is None:
        img2img = AutoPipelineForImage2Image.from_pipe(pipe)
        img2img.set_progress_bar_config(disable=True)
        pipe._glm_tune_img2img = img2img
    return pipe._glm_tune_img2img


def add_generation_arguments(parser, image=True, num_images=True, steps=25, strength=0.8):
    """The image flags every generate.py shares (GenerationSettings' fields): --negative_prompt, --seed, --steps,
    --guidance, --width, --height, --num_images (when `num_images`), --image (when `image`; an app that chooses the
    image itself leaves it out) and --strength."""
    parser.add_argument("--negative_prompt", default=None, help="what not to draw (default: none)")
    parser.add_argument("--seed", type=int, default=0, help="image I is drawn from seed + I (default: 0)")
    parser.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default: {steps})")
    parser.add_argument("--guidance", type=float, default=7.5,
                        help="classifier-free guidance scale; 1 turns it off (default: 7.5)")
    parser.add_argument("--width", type=int, default=None,
                        help="image width, a multiple of 8 (default: the pipeline's, 512 for SD 1.x, 32 for the "
                             "embedded)")
    parser.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (default: as "
                                                                 "--width)")
    if num_images:
        parser.add_argument("--num_images", type=int, default=1, help="images to make (default: 1)")
    if image:
        parser.add_argument("--image", default=None,
                            help="start from this picture instead of noise (image-to-image; it is cropped and "
                                 "resized to the output size)")
    parser.add_argument("--strength", type=float, default=strength,
                        help=f"image-to-image: how much of the {'--image' if image else 'starting picture'} is "
                             f"redrawn, 0 < s <= 1; int(steps x strength) steps run (default: {strength})")


def generation_fields(args):
    """GenerationSettings' fields that add_generation_arguments' flags set, from parsed `args`."""
    names = ("negative_prompt", "seed", "steps", "guidance", "width", "height", "num_images", "image", "strength")
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def device_and_dtype(dtype_name):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, DTYPES[dtype_name]


def generate(settings, pipe=None, progress=None):
    """Images for `settings` (a GenerationSettings), with a pipeline loaded for them unless `pipe` is given (its model
    must be the settings' one; adapters are replaced). Returns (images, record) where record is what the settings
    file holds (the settings with width/height filled in, plus the seeds, scheduler, versions and seconds)."""
    import diffusers

    settings.check()
    if pipe is None:
        folder = resolve_sd_path(settings.pretrained_model_name_or_path, settings.revision, settings.variant)
        device, dtype = device_and_dtype(settings.dtype)
        pipe = load_pipeline(folder, dtype, device, settings.variant)
    apply_adapters(pipe, [tuple(x) for x in settings.loras], settings.fuse)
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = settings.width or default, settings.height or default
    seeds = [settings.seed + i for i in range(settings.num_images)]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    steps_run = settings.steps if settings.image is None else int(settings.steps * settings.strength)
    if settings.image is not None and steps_run < 1:
        raise UserError(f"--steps {settings.steps} --strength {settings.strength}: no denoising step would run "
                        "(int(steps x strength) = 0); raise either")

    def callback(pipeline, step, timestep, kwargs):
        progress(step + 1, steps_run)
        return kwargs
    common = dict(negative_prompt=settings.negative_prompt, num_inference_steps=settings.steps,
                  guidance_scale=settings.guidance, num_images_per_prompt=settings.num_images, generator=generators,
                  callback_on_step_end=callback if progress is not None else None)
    extra = {}
    start = time.perf_counter()
    with torch.inference_mode():
        if settings.image is None:
            images = pipe(settings.prompt, width=width, height=height, **common).images
        else:
            from glm_tune.sd_lora import open_image

            init = fit_image(open_image(settings.image), width, height)
            extra = {"image_sha256": file_sha256(settings.image), "steps_run": steps_run}
            images = image_to_image(pipe)(settings.prompt, image=init, strength=settings.strength, **common).images
    seconds = time.perf_counter() - start
    filled = asdict(settings) | {"width": width, "height": height}
    if settings.image is not None:
        filled["image"] = str(Path(settings.image).resolve())  # found again from any working directory
    record = {"version": SETTINGS_VERSION, "settings": filled, "seeds": seeds, **extra,
              "scheduler": type(pipe.scheduler).__name__, "device": str(pipe.device),
              "diffusers": diffusers.__version__, "torch": torch.__version__, "seconds": round(seconds, 3)}
    return images, record


def next_run_name(out_dir):
    """'0001', '0002', ...: the first number no settings file in `out_dir` has yet."""
    taken = [int(m.group(1)) for p in Path(out_dir).glob("gen-*.json") if (m := re.fullmatch(r"gen-(\d+)", p.stem))]
    return f"{max(taken, default=0) + 1:04d}"


def save_run(images, record, out_dir):
    """Write the images as out_dir/gen-NNNN-I.png and the record as out_dir/gen-NNNN.json (atomically, each);
    returns (image paths, settings path). Call it holding the output lock of out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = next_run_name(out_dir)
    paths = []
    for i, image in enumerate(images):
        path = out_dir / f"gen-{run}-{i}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        paths.append(path)
    record = {**record, "images": [p.name for p in paths]}
    settings_path = out_dir / f"gen-{run}.json"
    write_json(settings_path, record)
    return paths, settings_path


def zip_run(images, record):
    """The images and the settings file as one .zip (bytes), for a download button."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        names = []
        for i, image in enumerate(images):
            png = io.BytesIO()
            image.save(png, format="PNG")
            names.append(f"image-{i}.png")
            archive.writestr(names[-1], png.getvalue())
        archive.writestr("settings.json", json.dumps({**record, "images": names}, indent=2, ensure_ascii=False))
    return buffer.getvalue()


# -- the demo's measure -----------------------------------------------------------------------------------------------

def as_array(image):
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def palette(images, colours=2, levels=16):
    """The `colours` most frequent colours of `images` (RGB 0-255, each channel binned into `levels` bins, the mean
    colour of each bin): for the demo's flat-coloured instance images, the background and the subject."""
    pixels = np.concatenate([as_array(im).reshape(-1, 3) for im in images])
    bins = (pixels // (256 / levels)).astype(np.int64)
    keys = (bins[:, 0] * levels + bins[:, 1]) * levels + bins[:, 2]
    counts = np.bincount(keys, minlength=levels ** 3)
    top = np.argsort(-counts, kind="stable")[:colours]
    return np.stack([pixels[keys == k].mean(0) for k in top])


def colour_distance(images, reference_palette):
    """Mean over every pixel of `images` of its RGB distance (0-255 units, at most 441) to the nearest colour of
    `reference_palette`: near 0 when the images are made of the instance images' colours, large for noise."""
    pixels = np.concatenate([as_array(im).reshape(-1, 3) for im in images])
    distances = np.linalg.norm(pixels[:, None, :] - np.asarray(reference_palette)[None], axis=-1)
    return float(distances.min(1).mean())


def load_images(folder):
    from glm_tune.sd_lora import image_files, open_image

    return [open_image(p) for p in image_files(folder, "--instance_data_dir")]

