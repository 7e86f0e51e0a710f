"""Small Stable Diffusion pipelines in the standard diffusers folder layout, for tests, demos and benchmarks; and
finding the pipeline folder that a `--pretrained_model_name_or_path` names (local folder, hub id, or the embedded one).

Real users point `--pretrained_model_name_or_path` at a diffusers SD 1.x/2.x folder or a hub id such as
runwayml/stable-diffusion-v1-5. Nothing can be downloaded here, so the project writes its own folder with the files a
real one has, read by the same loading code:

    model_index.json            StableDiffusionPipeline; safety_checker and feature_extractor null
    scheduler/                  DDIMScheduler with SD 1.x's betas (scaled_linear 0.00085..0.012, 1000 steps),
                                prediction_type "sample" (see below); PNDMScheduler with "epsilon" on request
    text_encoder/               CLIPTextModel, random (hidden 32, 2 layers), model.safetensors
    tokenizer/                  CLIPTokenizer: vocab.json + merges.txt of a byte-level BPE learned here from a few
                                hundred prompt words (the real one has 49408 entries; this one ~800)
    unet/                       UNet2DConditionModel, random, block_out_channels (32, 64), cross-attention in every
                                block, sample_size 16
    vae/                        AutoencoderKL (block_out_channels (16, 16): one 2x down/up-sampling), set by hand

The VAE is not random. A real SD VAE is an autoencoder: decode(encode(image)) is the image again, which is what makes
the latents a UNet learns mean something as pictures. A random VAE is no autoencoder, so a LoRA trained on its latents
could not make generated images look like the instance images. This one is built as one, exactly: its residual and
attention branches end in zeroed projections (they add nothing), its (down/up)sampling convolutions average 2x2 /
copy, and each image channel travels as the pair (x, -x) beside a constant pair (K, -K), so that every GroupNorm sees a
group of mean 0 and almost constant spread and silu(x) - silu(-x) = x undoes every SiLU. The latent is the image at
half resolution (R, G, B and their mean, in [-1, 1]); the decoded image is that latent upsampled. Every layer of the
real architecture still runs.

The UNet predicts the clean latent ("sample", one of diffusers' three prediction types) rather than SD 1.x's noise
("epsilon"). DreamBooth LoRA on a real SD model adjusts a UNet that already denoises; on a random UNet the adapter has
to learn denoising itself, and an x0-predicting one does that within a few hundred steps on a CPU (300 steps: the
instance subject, sharp) where a noise-predicting one still generates noise. The training code reads the prediction
type from the scheduler config and trains each of the three with its own target (tests cover all three).

A generated folder loads with StableDiffusionPipeline.from_pretrained, AutoPipelineForText2Image /
AutoPipelineForImage2Image and DiffusionPipeline.from_pretrained; a denoising step takes a few milliseconds on a CPU.
"""

import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch

from glm_tune.atomic import atomic_dir, write_json
from glm_tune.errors import UserError, first_line

REPO_ROOT = Path(__file__).resolve().parent.parent


def _without_torchvision_notes():
    """diffusers' pipelines name transformers' image processors (CLIPImageProcessor, Siglip...), and transformers 5
    says on each first use that torchvision is missing and it falls back to the PIL backend. That is this project's
    choice (PyPI's torchvision is a CUDA build, and it would replace a CPU torch), so the notes are dropped."""
    import logging

    class DropTorchvisionFallback(logging.Filter):
        def filter(self, record):
            return "requires torchvision (not installed)" not in record.getMessage()

    logging.getLogger("transformers.utils.import_utils").addFilter(DropTorchvisionFallback())


_without_torchvision_notes()
# Shapes of the embedded pipeline: 32x32 images, 16x16x4 latents.
SMALL_SD_SHAPE = dict(resolution=32, text_hidden=32, text_layers=2, unet_channels=(32, 64), vae_channels=16,
                      prediction_type="sample")
MAX_TOKENS = 77  # CLIP's context, as every SD 1.x / 2.x tokenizer
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
K = 100.0  # the constant channel pair of the VAE (see the module docstring); K**2 stays far below fp16's max
# The words the tokenizer learns its merges from: DreamBooth's prompts and the apps' defaults, colours, shapes and a
# few hundred common picture words. Any other text still tokenizes (byte-level), in more, shorter pieces.
BPE_WORDS = """
a an the of in on at with and or by to for from photo picture image drawing painting sketch render portrait style
sks dog cat toy shape object person man woman child face car house tree flower sky sea mountain city street room
table chair cup bottle book ball box bird fish horse cow sheep bear lion tiger elephant monkey rabbit duck
red orange yellow green teal cyan blue purple violet magenta pink brown black white grey gray gold silver dark light
bright pale deep vivid colored coloured background foreground small large big tiny huge round square circle disc
disk triangle rectangle star heart ring dot line stripe pattern plain simple flat solid soft sharp blurry detailed
high quality best masterpiece realistic photorealistic cartoon anime digital art oil watercolor pencil ink
centered center left right top bottom middle corner close up view front back side standing sitting lying running
on a table in the snow in the grass on the beach under the sun at night sunset sunrise morning evening
one two three four five many some several new old young beautiful cute happy sad angry
""".split()
BPE_MERGES = 600


# -- the tokenizer ----------------------------------------------------------------------------------------------------

def bytes_to_unicode():
    """GPT-2 / CLIP's table from bytes to printable characters (what byte-level BPE vocabularies are written in)."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = visible[:], 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(visible, map(chr, chars)))


def learn_bpe(words, n_merges):
    """Byte-level BPE merges (CLIP style: the last symbol of a word carries '</w>') learned from `words`, the most
    frequent pair first (ties: the smallest pair), so the result never varies."""
    table = bytes_to_unicode()
    counts = Counter(words)
    vocab = {}
    for word, count in counts.items():
        symbols = [table[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        vocab[tuple(symbols)] = count
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for symbols, count in vocab.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, count in vocab.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        vocab = merged
    return merges


def write_clip_tokenizer(folder, words=BPE_WORDS, n_merges=BPE_MERGES):
    """tokenizer/ as in SD 1.x folders: vocab.json (bytes, bytes + '</w>', merges, then the two specials, in CLIP's
    order), merges.txt, tokenizer_config.json, special_tokens_map.json. Returns the vocabulary size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_bpe([w.lower() for w in words], n_merges)
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    write_json(folder / "special_tokens_map.json", special)
    write_json(folder / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS,
                                                  "do_lower_case": True, "add_prefix_space": False, **special})
    return len(vocab)


# -- the models -------------------------------------------------------------------------------------------------------

def text_encoder_config(vocab_size, hidden=32, layers=2):
    from transformers import CLIPTextConfig

    # bos/eos ids are CLIP's places in the vocabulary: the last two entries
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                          projection_dim=hidden, hidden_act="quick_gelu", bos_token_id=vocab_size - 2,
                          eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def make_unet(resolution=32, channels=(32, 64), cross_attention_dim=32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(channels), norm_num_groups=8, cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels),
    )


def make_vae(resolution=32, channels=16):
    """The hand-set AutoencoderKL described in the module docstring (`channels` >= 8, a multiple of 8)."""
    from diffusers import AutoencoderKL

    if channels < 8 or channels % 8:
        raise ValueError(f"vae channels must be a multiple of 8, got {channels}")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        block_out_channels=(channels, channels), norm_num_groups=channels // 8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=resolution, scaling_factor=1.0)
    with torch.no_grad():
        for name, module in vae.named_modules():
            if name.endswith(("conv2", "to_out.0")):  # the end of every residual / attention branch: adds nothing
                module.weight.zero_()
                module.bias.zero_()
        for coder in (vae.encoder, vae.decoder):
            for block in [*getattr(coder, "down_blocks", []), *getattr(coder, "up_blocks", [])]:
                for sampler in [*(getattr(block, "downsamplers", None) or []),
                                *(getattr(block, "upsamplers", None) or [])]:
                    conv = sampler.conv
                    conv.weight.zero_()
                    conv.bias.zero_()
                    eye = torch.eye(channels)
                    if "Downsample" in type(sampler).__name__:  # stride 2, padded right/bottom: a 2x2 mean
                        conv.weight[:, :, :2, :2] = 0.25 * eye[:, :, None, None]
                    else:  # nearest upsampling, then a copy
                        conv.weight[:, :, 1, 1] = eye
        # in: image (R, G, B) or latent (R, G, B, mean) -> channels (R, G, B, -R, -G, -B, K, -K, 0...)
        for conv, n_in in ((vae.encoder.conv_in, 3), (vae.decoder.conv_in, 4)):
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(3):
                conv.weight[c, c, 1, 1], conv.weight[3 + c, c, 1, 1] = 1.0, -1.0
            conv.bias[6], conv.bias[7] = K, -K
        # out: after GroupNorm (group 0 divided by its spread, ~K/2) and SiLU, silu(x) - silu(-x) = x, times K/2
        spread = K / 2
        enc_out = vae.encoder.conv_out  # -> mean (R, G, B, mean of the three), log-variance
        enc_out.weight.zero_()
        enc_out.bias.zero_()
        for c in range(3):
            enc_out.weight[c, c, 1, 1], enc_out.weight[c, 3 + c, 1, 1] = spread, -spread
            enc_out.weight[3, c, 1, 1], enc_out.weight[3, 3 + c, 1, 1] = spread / 3, -spread / 3
        enc_out.bias[4:] = -30.0  # log-variance: the latent is the mean (std e-15)
        dec_out = vae.decoder.conv_out
        dec_out.weight.zero_()
        dec_out.bias.zero_()
        for c in range(3):
            dec_out.weight[c, c, 1, 1], dec_out.weight[c, 3 + c, 1, 1] = spread, -spread
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight.copy_(torch.eye(conv.weight.shape[0])[:, :, None, None])
            conv.bias.zero_()
    return vae


# SD 1.5's noise schedule (scheduler/scheduler_config.json), for every prediction type
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                clip_sample=False, set_alpha_to_one=False, steps_offset=1)
PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")


def make_scheduler(prediction_type="sample"):
    """SD 1.x's PNDMScheduler for "epsilon"; DDIMScheduler (as SD 2.x folders) for "v_prediction" and "sample"."""
    from diffusers import DDIMScheduler, PNDMScheduler

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if prediction_type == "epsilon":
        pndm = {k: v for k, v in SCHEDULE.items() if k != "clip_sample"}  # PNDM never clips
        return PNDMScheduler(**pndm, skip_prk_steps=True, prediction_type="epsilon")
    return DDIMScheduler(**SCHEDULE, prediction_type=prediction_type)


def write_sd_pipeline(out_dir, seed=0, resolution=32, text_hidden=32, text_layers=2, unet_channels=(32, 64),
                      vae_channels=16, prediction_type="sample"):
    """Write a complete diffusers StableDiffusionPipeline folder (see the module docstring); returns its path. Written
    beside `out_dir`, then renamed into place."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
    scheduler = make_scheduler(prediction_type)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        vocab_size = write_clip_tokenizer(tmp / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        with torch.random.fork_rng():  # leave the caller's random state alone
            torch.manual_seed(seed)
            text_encoder = CLIPTextModel(text_encoder_config(vocab_size, text_hidden, text_layers))
            unet = make_unet(resolution, unet_channels, cross_attention_dim=text_hidden)
            vae = make_vae(resolution, vae_channels)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_clip_tokenizer(tmp / "tokenizer")  # the hand-written files, as SD folders ship them
        for extra in ("tokenizer.json",):
            (tmp / "tokenizer" / extra).unlink(missing_ok=True)
    return out_dir


def cache_root():
    from glm_tune.checkpoint import cache_root as glm_cache_root

    return glm_cache_root()


def small_sd_pipeline(**shape):
    """The embedded default pipeline: built once into the glm-tune cache ($GLM_TUNE_CACHE), rebuilt when this file or
    the shape changes."""
    shape = {**SMALL_SD_SHAPE, **shape}
    digest = hashlib.sha256(json.dumps(sorted((k, list(v) if isinstance(v, tuple) else v)
                                              for k, v in shape.items())).encode())
    digest.update(Path(__file__).read_bytes())
    import diffusers

    digest.update(diffusers.__version__.encode())
    folder = cache_root() / f"sd-small-{digest.hexdigest()[:12]}"
    if not (folder / "model_index.json").exists():
        write_sd_pipeline(folder, **shape)
    return folder


# -- finding and loading a pipeline -----------------------------------------------------------------------------------

FLAG = "--pretrained_model_name_or_path"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PIPELINE_HELP = ("base pipeline: a diffusers Stable Diffusion 1.x/2.x folder or a Hugging Face repo id such as "
                 "runwayml/stable-diffusion-v1-5 (read from the Hugging Face cache; HF_HUB_OFFLINE=1 never "
                 "downloads). Default: the embedded small pipeline (random UNet, 32x32 images, built on first use)")


def add_pipeline_arguments(parser, dtype_help=None, revision_flag="--revision", dtype_flag="--dtype"):
    """The flags naming the base pipeline, the same in every Stable Diffusion script and page: {FLAG}, --revision,
    --variant, and --dtype (default fp32) when `dtype_help` says what it does there. A script that also loads a
    ChatGLM (whose flags are --revision and --dtype) renames the two, e.g. --sd_revision and --sd_dtype."""
    parser.add_argument(FLAG, default=None, help=PIPELINE_HELP)
    parser.add_argument(revision_flag, default=None, help=f"branch, tag or commit id of a hub {FLAG} (default: main)")
    parser.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16 (files "
                                                        "*.fp16.safetensors)")
    if dtype_help:
        parser.add_argument(dtype_flag, choices=list(DTYPES), default="fp32", help=dtype_help)


COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
EMBEDDED_SD_NOTICE = (f"note: no {FLAG} given, so this runs the embedded small Stable Diffusion pipeline (random UNet "
                      "and text encoder, 32x32 images, for demos and tests); for real pictures pass "
                      f"{FLAG} runwayml/stable-diffusion-v1-5 or a local diffusers SD 1.x/2.x folder")
_embedded_sd_notice_shown = False


def hub_patterns(variant=None, ext="safetensors", components=tuple(WEIGHT_NAMES)):
    """What a Stable Diffusion 1.x/2.x repo needs from the Hub: the configs, the tokenizer, and one weight file per
    model (the `variant`'s, e.g. fp16, when given). Not the safety checker, the EMA copies or other formats."""
    suffix = f".{variant}.{ext}" if variant else f".{ext}"
    configs = ["model_index.json", "scheduler/*.json", "tokenizer/*", *(f"{c}/config.json" for c in WEIGHT_NAMES)]
    return configs + [f"{c}/{WEIGHT_NAMES[c]}{suffix}" for c in components]


def _missing_weights(folder, variant=None):
    return [c for c in WEIGHT_NAMES if (folder / c).is_dir() and not any(
        (folder / c / f"{WEIGHT_NAMES[c]}{f'.{variant}' if variant else ''}.{ext}").exists()
        for ext in ("safetensors", "bin"))]


def resolve_sd_path(name_or_path=None, revision=None, variant=None):
    """The local folder of a Stable Diffusion pipeline.

    None is the embedded small pipeline (built on first use; said once per process on stderr). An existing folder is
    used as it is. Otherwise `owner/name` is a Hugging Face repo id: its snapshot at `revision` in the Hugging Face
    cache, downloaded on first use (safetensors weights, or .bin where a repo has no safetensors), as for ChatGLM
    (glm_tune.loading): HF_HOME / HF_HUB_CACHE choose the cache, HF_HUB_OFFLINE=1 never downloads. The folder must
    be a diffusers SD 1.x/2.x layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from glm_tune.loading import REPO_ID, download_from_hub

    global _embedded_sd_notice_shown
    if name_or_path is None:
        if not _embedded_sd_notice_shown and int(os.environ.get("RANK", "0")) == 0:  # once per job
            _embedded_sd_notice_shown = True
            print(EMBEDDED_SD_NOTICE, file=sys.stderr, flush=True)
        return small_sd_pipeline()
    folder = Path(name_or_path)
    where = f"{FLAG} {name_or_path}"
    if not folder.is_dir():
        if not REPO_ID.fullmatch(str(name_or_path)):
            raise UserError(f"{where}: no such folder, and not a Hugging Face repo id (owner/name, e.g. "
                            "runwayml/stable-diffusion-v1-5)")
        hub = dict(revision=revision, flag=FLAG, example="runwayml/stable-diffusion-v1-5",
                   local_folder="a local diffusers Stable Diffusion folder")
        folder = download_from_hub(str(name_or_path), allow_patterns=hub_patterns(variant), **hub)
        missing = _missing_weights(folder, variant)
        if missing:  # an older repo with .bin weights only
            folder = download_from_hub(str(name_or_path), allow_patterns=hub_patterns(variant, "bin", missing), **hub)
        where = f"{where} (revision {revision or 'main'}, {folder})"
    check_sd_folder(folder, where, variant)
    return folder


def check_sd_folder(folder, where, variant=None):
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"{where}: not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{index_path}: not valid JSON ({err})") from None
    if not isinstance(index, dict):
        raise UserError(f"{index_path}: not a diffusers model index (a JSON object)")
    if "text_encoder_2" in index or "transformer" in index:
        raise UserError(f"{where}: a {index.get('_class_name', 'non-SD 1.x/2.x')} pipeline; these apps take "
                        "Stable Diffusion 1.x/2.x (one CLIP text encoder and a UNet)")
    missing = [c for c in COMPONENTS if not (folder / c).is_dir() or not index.get(c)]
    if missing:
        raise UserError(f"{where}: not a Stable Diffusion 1.x/2.x folder: no {', '.join(missing)} (needs "
                        f"model_index.json and {', '.join(c + '/' for c in COMPONENTS)})")
    no_weights = _missing_weights(folder, variant)
    if no_weights:
        names = ", ".join(f"{c}/{WEIGHT_NAMES[c]}{f'.{variant}' if variant else ''}.safetensors" for c in no_weights)
        raise UserError(f"{where}: no weights for {names} (or .bin)")


def scheduler_class(folder):
    """The scheduler class the folder's model_index.json names (what generation uses)."""
    import diffusers

    library, name = json.loads((Path(folder) / "model_index.json").read_text())["scheduler"]
    return getattr(diffusers, name)


def load_pipeline(folder, dtype=torch.float32, device="cpu", variant=None, kind="text2image"):
    """StableDiffusionPipeline (kind "text2image") or StableDiffusionImg2ImgPipeline ("image2image") from a folder
    that resolve_sd_path returned, without safety checker; loading errors are one line."""
    from diffusers import AutoPipelineForImage2Image, StableDiffusionPipeline

    cls = {"text2image": StableDiffusionPipeline, "image2image": AutoPipelineForImage2Image}[kind]
    try:
        pipe = cls.from_pretrained(str(folder), dtype=dtype, variant=variant, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{folder}: cannot load the pipeline ({first_line(err)})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
