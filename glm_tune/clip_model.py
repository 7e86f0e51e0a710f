"""CLIP models for the retrieval apps: a small Chinese CLIP that this project trains itself (for tests and demos), finding
the model folder that `--clip_model` names (local folder, hub id, or the embedded one), and embedding images and texts.

Real users point `--clip_model` at a Chinese CLIP folder or hub id (OFA-Sys/chinese-clip-vit-base-patch16, the
architecture of cn_clip, read by transformers' ChineseCLIPModel) or at an English CLIPModel folder
(openai/clip-vit-base-patch32). Nothing can be downloaded here, so the project writes its own folder with the files a
real one has, read by the same loading code:

    config.json                 ChineseCLIPModel (or CLIPModel): ViT 32x32 images, patch 8, width 64, 2 layers;
                                text BERT (or CLIP text) width 64, 2 layers; projection 32
    model.safetensors           trained weights (below)
    preprocessor_config.json    resize to 32x32 with CLIP's mean/std (English: shortest edge + centre crop, as CLIP)
    tokenizer files             Chinese: a BERT vocab.txt (CJK characters one by one, English words whole, as
                                cn_clip's chinese-roberta tokenizer splits them); English: CLIP's byte-level BPE

Unlike the random demo ChatGLM, a random CLIP would make retrieval meaningless, so this one is trained: contrastively
(CLIP's own loss, `return_loss=True`) on pictures of coloured shapes drawn here, 5 shapes x 6 colours, with captions in
Chinese and English ("红色圆形", "a red circle"). Each batch holds every (shape, colour) class once, so the loss never
pushes apart a picture and a caption that in fact match. 700 steps take about 10 s on one CPU thread, and every
caption then finds its own picture first among the 30 canonical ones (by a cosine margin of 0.09 or more, seeds 0-5).

An index built with a model records its name (ClipEmbedder.name): the --clip_model as given, an absolute folder, or
"embedded:<folder name>" for the embedded one, which --clip_model also accepts, to search an index with its own model.
"""

import dataclasses
import hashlib
import json
import os
import random
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from glm_tune.atomic import atomic_dir, atomic_path, write_json
from glm_tune.errors import UserError, first_line
from glm_tune.sd_checkpoint import text_encoder_config, write_clip_tokenizer

# -- the pictures and their captions ----------------------------------------------------------------------------------

SHAPES = {  # key -> (Chinese, English)
    "circle": ("圆形", "circle"),
    "square": ("正方形", "square"),
    "triangle": ("三角形", "triangle"),
    "star": ("五角星", "star"),
    "cross": ("十字形", "cross"),
}
COLOURS = {  # key -> (Chinese, English, RGB)
    "red": ("红色", "red", (220, 40, 40)),
    "green": ("绿色", "green", (40, 170, 60)),
    "blue": ("蓝色", "blue", (40, 80, 220)),
    "yellow": ("黄色", "yellow", (240, 200, 30)),
    "purple": ("紫色", "purple", (140, 60, 180)),
    "black": ("黑色", "black", (30, 30, 30)),
}
# The ways the small model learns to say a caption; the first of each language is caption()'s.
CAPTION_TEMPLATES = {
    "zh": ("{colour}{shape}", "{colour}的{shape}", "一个{colour}的{shape}"),
    "en": ("a {colour} {shape}", "{colour} {shape}", "a picture of a {colour} {shape}"),
}


def caption(shape, colour, lang="zh", template=0):
    """The caption of a (shape, colour) picture: caption("circle", "red") == "红色圆形", in "en" "a red circle"."""
    index = {"zh": 0, "en": 1}[lang]
    return CAPTION_TEMPLATES[lang][template].format(colour=COLOURS[colour][index], shape=SHAPES[shape][index])


def shape_outline(shape, cx, cy, radius, angle):
    """The polygon of `shape` centred at (cx, cy), about `radius` from the centre to its edge, turned by `angle`."""
    if shape == "circle":
        unit = [(np.cos(a), np.sin(a)) for a in np.linspace(0, 2 * np.pi, 64, endpoint=False)]
    elif shape == "square":  # corners well outside the circle, or at 32 pixels a tiny ViT confuses the two
        unit = [(-0.92, -0.92), (0.92, -0.92), (0.92, 0.92), (-0.92, 0.92)]
    elif shape == "triangle":  # pointing up, its centre of mass at the centre
        unit = [(np.cos(a), np.sin(a) + 0.2) for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6)]
    elif shape == "star":  # five points, the inner corners at 0.45 of the radius
        unit = [((1.0 if i % 2 == 0 else 0.45) * np.cos(a), (1.0 if i % 2 == 0 else 0.45) * np.sin(a))
                for i, a in enumerate(-np.pi / 2 + np.pi / 5 * np.arange(10))]
    elif shape == "cross":  # a plus sign with arms 0.6 wide
        w = 0.3
        unit = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
                (-w, -1)]
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    cos, sin = np.cos(angle), np.sin(angle)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in unit]


def render_shape(shape, colour, size=64, seed=None):
    """An RGB picture of a `colour` `shape`. seed=None: the canonical one (centred, upright, on white); a seed: a
    random variant (scaled, turned up to 20 degrees, moved a little, on a light tinted background, colour jittered),
    what the small model trains on. Drawn at 4x and downsampled, for smooth edges."""
    rgb = COLOURS[colour][2]
    background, scale, dx, dy, angle = (255, 255, 255), 0.36, 0.0, 0.0, 0.0
    if seed is not None:
        rng = random.Random(seed)
        background = tuple(rng.randint(205, 255) for _ in range(3))
        rgb = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in rgb)
        scale = rng.uniform(0.3, 0.4)
        # Moved by at most 5% of the size: a ViT learns where a shape is through its position embeddings, and with
        # wider moves the small one needs far more steps to tell the shapes apart (10% halves its accuracy at 300).
        dx, dy = rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)
        angle = np.radians(rng.uniform(-20, 20))
    big = 4 * size
    picture = Image.new("RGB", (big, big), background)
    outline = shape_outline(shape, big * (0.5 + dx), big * (0.5 + dy), big * scale, angle)
    ImageDraw.Draw(picture).polygon(outline, fill=rgb)
    return picture.resize((size, size), Image.Resampling.LANCZOS)


def write_caption_images(folder, size=64, variants=0):
    """One PNG per (shape, colour), <shape>/<colour>.png, plus `variants` random variants of each
    (<shape>/<colour>-<i>.png), and captions.jsonl with a row {"path" (relative), "zh", "en", "shape", "colour"} per
    picture. Every file is written atomically. Returns the rows."""
    folder = Path(folder)
    rows = []
    for shape in SHAPES:
        for colour in COLOURS:
            for variant in [None, *range(variants)]:
                name = f"{shape}/{colour}.png" if variant is None else f"{shape}/{colour}-{variant}.png"
                seed = None if variant is None else variant_seed(shape, colour, variant)
                with atomic_path(folder / name) as tmp:
                    render_shape(shape, colour, size, seed).save(tmp, format="PNG")
                rows.append(dict(path=name, zh=caption(shape, colour, "zh"), en=caption(shape, colour, "en"),
                                 shape=shape, colour=colour))
    with atomic_path(folder / "captions.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return rows


def variant_seed(shape, colour, variant):
    """A seed per picture that does not depend on the order of SHAPES and COLOURS."""
    return int.from_bytes(hashlib.sha256(f"{shape}/{colour}/{variant}".encode()).digest()[:4], "little")


def classes():
    return [(shape, colour) for shape in SHAPES for colour in COLOURS]


# -- the small model --------------------------------------------------------------------------------------------------

# Shape and training of the embedded model: 32x32 images in 4x4 patches of 8; `steps` batches of all 30 classes, each
# picture one of `variants` random variants of its class; AdamW at `lr`, warmed up and decayed.
SMALL_CLIP_SHAPE = dict(image_size=32, patch_size=8, hidden=64, layers=2, heads=4, projection_dim=32, steps=700,
                        lr=3e-3, variants=16)
KINDS = ("chinese", "english")
LANGUAGES = {"chinese": ("zh", "en"), "english": ("en",)}  # an English CLIP learns no Chinese, as the real one
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # at BERT's ids 0..4
TEXT_TOKENS = 32  # positions of the small Chinese text tower (cn_clip's take 52 of 512); captions need 10


def class_captions(shape, colour, kind):
    """Every way the small model of `kind` learns to caption one class."""
    return [caption(shape, colour, lang, t) for lang in LANGUAGES[kind] for t in range(len(CAPTION_TEMPLATES[lang]))]


def write_tokenizer(folder, kind):
    """The tokenizer files of `kind` into `folder`, with every caption's pieces in the vocabulary; returns the
    tokenizer. Chinese: a BERT vocab.txt as cn_clip's chinese-roberta folders ship (BERT splits CJK text into
    characters and English into words, so the vocabulary is the captions' characters and words); English: CLIP's
    byte-level BPE learned from the caption words (glm_tune.sd_checkpoint)."""
    from transformers import BertTokenizer, CLIPTokenizer

    texts = [text for s, c in classes() for text in class_captions(s, c, kind)]
    words = sorted({w for text in texts for w in text.lower().split() if w.isascii()})
    if kind == "english":
        write_clip_tokenizer(folder, words=words)
        return CLIPTokenizer.from_pretrained(folder)
    chars = sorted({ch for text in texts for ch in text if "\u4e00" <= ch <= "\u9fff"})
    (Path(folder) / "vocab.txt").write_text("".join(t + "\n" for t in BERT_SPECIALS + chars + words), encoding="utf-8")
    write_json(Path(folder) / "tokenizer_config.json", {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                                                        "tokenize_chinese_chars": True, "model_max_length": TEXT_TOKENS})
    return BertTokenizer.from_pretrained(folder)


def model_config(kind, vocab_size, image_size, patch_size, hidden, layers, heads, projection_dim):
    """ChineseCLIPConfig (a BERT text tower) or CLIPConfig (CLIP's text tower, as in the small SD folders)."""
    from transformers import ChineseCLIPConfig, CLIPConfig

    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, projection_dim=projection_dim)
    if kind == "english":
        text = text_encoder_config(vocab_size, hidden, layers).to_dict()
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=TEXT_TOKENS, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    return ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def make_image_processor(kind, image_size):
    """As the real folders do it: Chinese CLIP resizes to a square, CLIP resizes the short side and crops the centre;
    both then normalise with CLIP's mean and std."""
    from transformers import ChineseCLIPImageProcessorPil, CLIPImageProcessorPil

    square = {"height": image_size, "width": image_size}
    if kind == "english":
        return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=square)
    return ChineseCLIPImageProcessorPil(size=square, do_center_crop=False, crop_size=square)


def train_contrastively(model, pictures, captions, steps, lr, rng):
    """CLIP's own loss (return_loss=True) over `steps` batches that hold every class once: class i's row is a random
    one of pictures[i] (pixel values, (variants, 3, H, W)) beside a random one of captions[i] (token tensors, one row
    per caption). One class per batch means no picture is ever pushed away from a caption that describes it.
    Returns the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 0
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / steps)))
    model.train()
    losses = []
    for _ in range(steps):
        pixel_values = torch.stack([p[rng.randrange(len(p))] for p in pictures])
        rows = [rng.randrange(len(c["input_ids"])) for c in captions]
        text = {key: torch.stack([c[key][row] for c, row in zip(captions, rows)]) for key in captions[0]}
        loss = model(pixel_values=pixel_values, **text, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def write_small_clip(out_dir, kind="chinese", seed=0, **shape):
    """Train a small CLIP of `kind` ("chinese": ChineseCLIPModel, "english": CLIPModel) on the coloured shapes (see
    the module docstring) and write it to `out_dir` in the standard folder layout; returns the path. `shape` overrides
    SMALL_CLIP_SHAPE. The same seed gives the same weights. Written beside `out_dir`, then renamed into place."""
    from transformers import ChineseCLIPModel, CLIPModel

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    unknown = set(shape) - set(SMALL_CLIP_SHAPE)
    if unknown:
        raise ValueError(f"unknown shape settings {', '.join(sorted(unknown))}; known: {', '.join(SMALL_CLIP_SHAPE)}")
    shape = {**SMALL_CLIP_SHAPE, **shape}
    steps, lr, variants = shape.pop("steps"), shape.pop("lr"), shape.pop("variants")
    if shape["image_size"] % shape["patch_size"]:
        raise ValueError(f"image_size {shape['image_size']} must be a multiple of patch_size {shape['patch_size']}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tokenizer = write_tokenizer(tmp, kind)
        image_processor = make_image_processor(kind, shape["image_size"])
        rng = random.Random(seed)
        pictures, captions = [], []
        for s, c in classes():  # drawn at twice the model's size, then resized by the processor, as users' pictures
            drawn = [render_shape(s, c, 2 * shape["image_size"], rng.getrandbits(32)) for _ in range(variants)]
            pictures.append(image_processor(drawn, return_tensors="pt")["pixel_values"])
            captions.append(class_captions(s, c, kind))
        longest = max(len(ids) for texts in captions for ids in tokenizer(texts)["input_ids"])
        captions = [tokenizer(texts, padding="max_length", max_length=longest, return_tensors="pt").data
                    for texts in captions]
        with torch.random.fork_rng():  # leave the caller's random state alone
            torch.manual_seed(seed)
            model_class = CLIPModel if kind == "english" else ChineseCLIPModel
            model = model_class(model_config(kind, len(tokenizer), **shape))
            train_contrastively(model, pictures, captions, steps, lr, rng)
        # the layout of the hub folders: config.json + weights, preprocessor_config.json, the tokenizer's files
        model.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def cache_root():
    from glm_tune.checkpoint import cache_root as glm_cache_root

    return glm_cache_root()


def small_clip(kind="chinese"):
    """The embedded default model: trained once into the glm-tune cache ($GLM_TUNE_CACHE), again when the code it is
    made by (this file, the CLIP tokenizer in sd_checkpoint.py), the shape or the transformers version changes."""
    import transformers

    from glm_tune import sd_checkpoint

    digest = hashlib.sha256(json.dumps([kind, sorted(SMALL_CLIP_SHAPE.items())]).encode())
    for code in (__file__, sd_checkpoint.__file__):
        digest.update(Path(code).read_bytes())
    digest.update(transformers.__version__.encode())
    folder = cache_root() / f"clip-small-{digest.hexdigest()[:12]}"
    if not (folder / "config.json").exists():
        write_small_clip(folder, kind)
    return folder


# -- finding a model --------------------------------------------------------------------------------------------------

CLIP_FLAG = "--clip_model"
CLIP_EXAMPLE = "OFA-Sys/chinese-clip-vit-base-patch16"
CLIP_HELP = (f"CLIP model: a Chinese CLIP folder or Hugging Face repo id such as {CLIP_EXAMPLE} (read from the Hugging "
             "Face cache; HF_HUB_OFFLINE=1 never downloads), or an English CLIPModel folder or id such as "
             "openai/clip-vit-base-patch32. Default: the embedded small Chinese CLIP (trained here on coloured "
             "shapes; built on first use)")
EMBEDDED_CLIP_NOTICE = (f"note: no {CLIP_FLAG} given, so this runs the embedded small demo CLIP (trained on 30 "
                        "coloured shapes, for demos and tests); for real pictures pass "
                        f"{CLIP_FLAG} {CLIP_EXAMPLE} or a local Chinese CLIP / CLIP folder")
EMBEDDED_PREFIX = "embedded:"  # ClipEmbedder.name of the embedded model: "embedded:<its folder name>"
MODEL_TYPES = {"chinese_clip": "chinese", "clip": "english"}
# What a CLIP repo needs from the Hub: configs, tokenizer (BERT's vocab.txt or CLIP's BPE), safetensors weights; .bin
# weights only where a repo has no safetensors (the original OFA-Sys repos).
CLIP_HUB_FILES = ["config.json", "preprocessor_config.json", "processor_config.json", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
                  "*.safetensors", "model.safetensors.index.json"]
CLIP_HUB_BIN_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_embedded_clip_notice_shown = False


def add_clip_arguments(parser):
    """--clip_model and --clip_revision, the same in every script and page that embeds with CLIP."""
    parser.add_argument(CLIP_FLAG, default=None, help=CLIP_HELP)
    parser.add_argument("--clip_revision", default=None,
                        help=f"branch, tag or commit id of a hub {CLIP_FLAG} (default: main)")


def announce_embedded_clip():
    global _embedded_clip_notice_shown
    if not _embedded_clip_notice_shown and int(os.environ.get("RANK", "0")) == 0:  # once per job
        _embedded_clip_notice_shown = True
        print(EMBEDDED_CLIP_NOTICE, file=sys.stderr, flush=True)


def resolve_clip_path(clip_model=None, revision=None):
    """The local folder of a CLIP model.

    None is the embedded small Chinese CLIP (built on first use; said once per process on stderr), and so is the name
    it records, "embedded:<folder name>" (an index built with it names it so). An existing folder is used as it is.
    Otherwise `owner/name` is a Hugging Face repo id: its snapshot at `revision` in the Hugging Face cache, downloaded
    on first use (see glm_tune.loading.download_from_hub). The folder must hold a ChineseCLIPModel or CLIPModel:
    config.json, weights, tokenizer and preprocessor files."""
    from glm_tune.loading import REPO_ID, download_from_hub

    if clip_model is None or str(clip_model).startswith(EMBEDDED_PREFIX):
        announce_embedded_clip()
        return embedded_folder(clip_model)
    folder = Path(clip_model)
    where = f"{CLIP_FLAG} {clip_model}"
    if not folder.is_dir():
        if not REPO_ID.fullmatch(str(clip_model)):
            raise UserError(f"{where}: no such folder, and not a Hugging Face repo id (owner/name, e.g. "
                            f"{CLIP_EXAMPLE})")
        hub = dict(revision=revision, flag=CLIP_FLAG, example=CLIP_EXAMPLE, local_folder="a local CLIP folder")
        folder = download_from_hub(str(clip_model), allow_patterns=CLIP_HUB_FILES, **hub)
        if not any((folder / name).exists() for name in WEIGHT_FILES):  # an older repo with .bin weights only
            folder = download_from_hub(str(clip_model), allow_patterns=CLIP_HUB_FILES + CLIP_HUB_BIN_FILES, **hub)
        where = f"{where} (revision {revision or 'main'}, {folder})"
    check_clip_folder(folder, where)
    return folder


def embedded_folder(name=None):
    """The embedded model's folder; for a recorded "embedded:<folder name>", that folder if it is still in the cache
    (an older build, made before the code changed), else a one-line error."""
    folder = small_clip()
    if name is None or name == f"{EMBEDDED_PREFIX}{folder.name}":
        return folder
    older = cache_root() / name[len(EMBEDDED_PREFIX):]
    if older.name.startswith("clip-small-") and (older / "config.json").exists():
        return older
    raise UserError(f"{CLIP_FLAG} {name}: that embedded model is no longer in {cache_root()} (the code that builds it "
                    f"changed; the current one is {EMBEDDED_PREFIX}{folder.name}): rebuild with the current one")


def check_clip_folder(folder, where):
    """One-line errors for a folder that is no ChineseCLIPModel / CLIPModel folder, naming what is missing."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{where}: not a CLIP model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{config_path}: not valid JSON ({err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_TYPES:
        raise UserError(f"{where}: not a CLIP model (config.json model_type {model_type!r}; {CLIP_FLAG} takes a "
                        "ChineseCLIPModel (chinese_clip) or CLIPModel (clip) folder)")
    tokenizer_files = ["vocab.txt"] if model_type == "chinese_clip" else ["vocab.json", "merges.txt"]
    missing = []
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not (folder / "tokenizer.json").is_file() and not all((folder / name).is_file() for name in tokenizer_files):
        missing.append(f"a tokenizer (tokenizer.json or {' + '.join(tokenizer_files)})")
    if not any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        missing.append("an image preprocessor (preprocessor_config.json)")
    if missing:
        raise UserError(f"{where}: a {model_type} folder without {', '.join(missing)}")


# -- embedding --------------------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class ClipEmbedder:
    """A loaded CLIP model that turns pictures and texts into unit vectors of one space (cosine = inner product).

    `name` is what an index records to know the model again: the --clip_model as given for a hub id, the absolute
    path of a folder, "embedded:<folder name>" for the embedded one."""

    name: str
    folder: Path
    kind: str  # "chinese" (ChineseCLIPModel) or "english" (CLIPModel)
    dim: int  # projection size
    model: object
    image_processor: object
    tokenizer: object
    max_length: int  # longer texts are cut to this many tokens
    device: str
    dtype: torch.dtype
    lock: object  # a fast tokenizer called from two threads at once can fail ("Already borrowed")

    def embed_images(self, images, batch_size=32):
        """PIL images of any mode -> float32 (n, dim), rows of unit length."""
        rows = []
        for start in range(0, len(images), batch_size):
            batch = [image.convert("RGB") for image in images[start:start + batch_size]]
            pixel_values = self.image_processor(batch, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                features = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))
            rows.append(unit_rows(features.pooler_output))
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)

    def embed_texts(self, texts, batch_size=64):
        """Texts -> float32 (n, dim), rows of unit length; a text longer than the model takes is cut."""
        rows = []
        for start in range(0, len(texts), batch_size):
            with self.lock:
                tokens = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                features = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
            rows.append(unit_rows(features.pooler_output))
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)


def unit_rows(features):
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


_loaded = {}
_loading = threading.Lock()


def load_clip(clip_model=None, revision=None, dtype="fp32", device=None):
    """The ClipEmbedder of `clip_model` (see resolve_clip_path), loaded once per (folder, dtype, device) in a process
    and shared (Streamlit sessions, threads). `dtype` is fp32, bf16 or fp16; `device` defaults to CUDA when there is
    one. Loading errors are one line naming the folder."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with _loading:
        folder = resolve_clip_path(clip_model, revision)
        if clip_model is None or str(clip_model).startswith(EMBEDDED_PREFIX):
            name = f"{EMBEDDED_PREFIX}{folder.name}"
        elif Path(clip_model).is_dir():
            name = str(Path(clip_model).resolve())
        else:
            name = str(clip_model)  # a hub id
        key = (str(folder.resolve()), dtype, str(device))
        if key not in _loaded:
            _loaded[key] = load_embedder(folder, name, DTYPES[dtype], device)
    embedder = _loaded[key]
    return embedder if embedder.name == name else dataclasses.replace(embedder, name=name)


def load_embedder(folder, name, dtype, device):
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, ChineseCLIPModel, CLIPModel

    try:
        config = AutoConfig.from_pretrained(folder)
        kind = MODEL_TYPES[config.model_type]
        model_class = ChineseCLIPModel if kind == "chinese" else CLIPModel
        model = model_class.from_pretrained(folder, dtype=dtype).to(device).eval()
        # Always the PIL image processor (ChineseCLIPImageProcessorPil / CLIPImageProcessorPil): the torchvision one
        # resizes slightly differently, and an index built on one machine must be searchable from another. Passed
        # here, not to AutoProcessor, which would hand backend="pil" to the tokenizer too.
        image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # every way a folder can be broken: bad JSON, truncated weights, a missing file
        raise UserError(f"{folder}: cannot load the CLIP model ({first_line(err)})") from None
    max_length = min(tokenizer.model_max_length, config.text_config.max_position_embeddings)
    return ClipEmbedder(name=name, folder=Path(folder), kind=kind, dim=config.projection_dim, model=model,
                        image_processor=image_processor, tokenizer=tokenizer, max_length=max_length,
                        device=str(device), dtype=dtype, lock=threading.Lock())

