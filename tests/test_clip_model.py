"""The small CLIP models (glm_tune.clip_model): trained here in seconds, they retrieve for real (every shipped caption,
Chinese and English, finds its own picture first among the 30 canonical ones); the folders are the standard layout that
transformers' ChineseCLIPModel / CLIPModel load, and load_clip's vectors equal transformers' own features, batched or
not, in bf16 within a stated tolerance. --clip_model names a folder, a hub id (resolved offline from a Hugging Face
cache laid out as snapshot_download leaves it) or, by default, the embedded model, which says so once per process."""

import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import glm_tune.clip_model as clip_model
from glm_tune.clip_model import (CLIP_HUB_FILES, COLOURS, EMBEDDED_CLIP_NOTICE, SHAPES, caption, load_clip,
                                 render_shape, resolve_clip_path, write_caption_images, write_small_clip)
from glm_tune.errors import UserError
from hub_cache import add_to_hub_cache

ROOT = Path(__file__).resolve().parent.parent
CLASSES = [(shape, colour) for shape in SHAPES for colour in COLOURS]
MIN_MARGIN = 0.03  # cosine of the right picture minus the best wrong one (seed 0: 0.18; seeds 0-5: 0.09 or more)
BF16_MIN_COSINE = 0.99  # bf16 weights and activations vs fp32: the vectors' directions barely move
HUB_ID = "OFA-Sys/chinese-clip-vit-base-patch16"
COMMIT = "c" * 8 + "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def chinese(tmp_path_factory):
    start = time.perf_counter()
    folder = write_small_clip(tmp_path_factory.mktemp("clip") / "chinese-clip-small", kind="chinese", seed=0)
    print(f"chinese small CLIP trained in {time.perf_counter() - start:.1f} s")
    return folder


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    start = time.perf_counter()
    folder = write_small_clip(tmp_path_factory.mktemp("clip") / "clip-small-en", kind="english", seed=0)
    print(f"english small CLIP trained in {time.perf_counter() - start:.1f} s")
    return folder


@pytest.fixture(scope="module")
def canonical():
    return [render_shape(shape, colour) for shape, colour in CLASSES]


def retrieval(embedder, texts, images):
    """Cosine similarities (texts x images), and each text's margin: its own picture minus the best other one."""
    similarity = embedder.embed_texts(texts) @ embedder.embed_images(images).T
    own = np.diag(similarity)
    others = np.where(np.eye(len(texts), dtype=bool), -np.inf, similarity).max(axis=1)
    return similarity, own - others


# ----------------------------------------------------------------------------------------------------------------------
# Retrieval


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_every_caption_finds_its_picture_first_with_the_chinese_model(chinese, canonical, lang):
    captions = [caption(shape, colour, lang) for shape, colour in CLASSES]
    similarity, margins = retrieval(load_clip(chinese), captions, canonical)
    assert list(similarity.argmax(axis=1)) == list(range(len(CLASSES)))
    assert margins.min() > MIN_MARGIN, dict(zip(captions, margins.round(3)))


def test_red_circle_in_chinese_finds_the_red_circle(chinese, canonical):
    similarity, _ = retrieval(load_clip(chinese), ["红色圆形"], canonical)
    assert CLASSES[similarity[0].argmax()] == ("circle", "red")


def test_every_english_caption_finds_its_picture_first_with_the_english_clip(english, canonical):
    embedder = load_clip(english)
    assert embedder.kind == "english" and embedder.dim == 32
    captions = [caption(shape, colour, "en") for shape, colour in CLASSES]
    similarity, margins = retrieval(embedder, captions, canonical)
    assert list(similarity.argmax(axis=1)) == list(range(len(CLASSES)))
    assert margins.min() > MIN_MARGIN, dict(zip(captions, margins.round(3)))


def test_an_image_finds_itself_first_with_score_one(chinese, canonical):
    vectors = load_clip(chinese).embed_images(canonical)
    scores = vectors @ vectors.T
    assert list(scores.argmax(axis=1)) == list(range(len(CLASSES)))
    assert np.abs(np.diag(scores) - 1).max() < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# The folders and the embeddings


def test_folder_has_the_standard_layout(chinese, english):
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json",
            "vocab.txt"} <= {p.name for p in chinese.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json", "vocab.json",
            "merges.txt"} <= {p.name for p in english.iterdir()}
    assert json.loads((chinese / "config.json").read_text())["model_type"] == "chinese_clip"
    assert json.loads((english / "config.json").read_text())["model_type"] == "clip"
    preprocessor = json.loads((chinese / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"height": 32, "width": 32} and preprocessor["image_mean"][0] == 0.48145466


def independent_pixels(images, size=32):
    """Chinese CLIP's preprocessing written out: bicubic resize to size x size, scale to [0, 1], CLIP's mean/std."""
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    rows = [(np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) / 255.0 - mean) / std
            for im in images]
    return torch.tensor(np.stack(rows).transpose(0, 3, 1, 2), dtype=torch.float32)


def unit(features):
    return (features / features.norm(dim=-1, keepdim=True)).numpy()


def test_chinese_folder_reloads_and_load_clip_equals_transformers_features(chinese, canonical):
    from transformers import BertTokenizer, ChineseCLIPModel

    model = ChineseCLIPModel.from_pretrained(chinese).eval()
    tokenizer = BertTokenizer.from_pretrained(chinese)
    texts = ["红色圆形", "a blue star", "一个黑色的十字形"]
    assert tokenizer.tokenize("红色圆形") == ["红", "色", "圆", "形"]  # CJK by character, as cn_clip's tokenizer
    with torch.no_grad():
        images = unit(model.get_image_features(pixel_values=independent_pixels(canonical)).pooler_output)
        text = unit(model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output)
    embedder = load_clip(chinese)
    assert (embedder.kind, embedder.dim) == ("chinese", 32)
    np.testing.assert_allclose(embedder.embed_images(canonical), images, atol=1e-5)
    np.testing.assert_allclose(embedder.embed_texts(texts), text, atol=1e-5)


def test_english_folder_reloads_and_load_clip_equals_transformers_features(english, canonical):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(english).eval()
    tokenizer = CLIPTokenizer.from_pretrained(english)
    pixels = CLIPImageProcessorPil.from_pretrained(english)(canonical, return_tensors="pt")["pixel_values"]
    texts = ["a red circle", "yellow square"]
    with torch.no_grad():
        images = unit(model.get_image_features(pixel_values=pixels).pooler_output)
        text = unit(model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output)
    embedder = load_clip(english)
    np.testing.assert_allclose(embedder.embed_images(canonical), images, atol=1e-5)
    np.testing.assert_allclose(embedder.embed_texts(texts), text, atol=1e-5)


def test_batched_embeddings_equal_one_by_one(chinese, canonical):
    embedder = load_clip(chinese)
    texts = [caption(shape, colour, lang) for shape, colour in CLASSES[:8] for lang in ("zh", "en")]
    mixed = [im.convert("L").convert("RGBA") if i % 3 == 0 else im for i, im in enumerate(canonical)]  # any mode
    batched = embedder.embed_images(mixed, batch_size=7)
    one_by_one = np.concatenate([embedder.embed_images([im]) for im in mixed])
    assert batched.dtype == np.float32 and batched.shape == (len(CLASSES), 32)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_allclose(embedder.embed_texts(texts, batch_size=5),
                               np.concatenate([embedder.embed_texts([t]) for t in texts]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)
    assert embedder.embed_images([]).shape == embedder.embed_texts([]).shape == (0, 32)


def test_texts_longer_than_the_model_takes_are_cut(chinese):
    embedder = load_clip(chinese)
    assert embedder.max_length == 32
    long = embedder.embed_texts(["红色圆形" * 40])
    assert long.shape == (1, 32) and np.isfinite(long).all()


def test_bf16_embeddings_are_close_to_fp32_and_still_retrieve(chinese, canonical):
    fp32, bf16 = load_clip(chinese), load_clip(chinese, dtype="bf16")
    assert bf16.model.dtype == torch.bfloat16 and fp32.model.dtype == torch.float32
    captions = [caption(shape, colour, "zh") for shape, colour in CLASSES]
    for a, b in ((fp32.embed_images(canonical), bf16.embed_images(canonical)),
                 (fp32.embed_texts(captions), bf16.embed_texts(captions))):
        assert b.dtype == np.float32
        assert (a * b).sum(axis=1).min() > BF16_MIN_COSINE
    similarity, _ = retrieval(bf16, captions, canonical)
    assert list(similarity.argmax(axis=1)) == list(range(len(CLASSES)))


def test_a_model_is_loaded_once_per_folder_dtype_and_device(chinese):
    assert load_clip(chinese).model is load_clip(str(chinese)).model
    assert load_clip(chinese).name == str(chinese.resolve())
    assert load_clip(chinese, dtype="bf16").model is not load_clip(chinese).model
    with pytest.raises(UserError, match="^--dtype fp8: choose one of fp32, bf16, fp16$"):
        load_clip(chinese, dtype="fp8")


def test_threads_loading_one_model_at_once_share_one_copy(chinese):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        embedders = list(pool.map(lambda _: load_clip(chinese, dtype="fp16"), range(4)))
    assert all(e.model is embedders[0].model for e in embedders)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # and embed at once: one tokenizer, one model
        vectors = list(pool.map(lambda text: embedders[0].embed_texts([text] * 50), ["红色圆形"] * 4))
    assert all(np.array_equal(v, vectors[0]) for v in vectors)


def test_write_small_clip_is_deterministic_for_a_seed(tmp_path):
    first = write_small_clip(tmp_path / "a", seed=3, steps=20)
    second = write_small_clip(tmp_path / "b", seed=3, steps=20)
    other = write_small_clip(tmp_path / "c", seed=4, steps=20)
    a, b, c = (load_file(folder / "model.safetensors") for folder in (first, second, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_caption_images_are_written_nested_by_shape_with_their_captions(tmp_path):
    rows = write_caption_images(tmp_path / "shapes", variants=1)
    assert len(rows) == 2 * len(CLASSES)
    assert rows[0] == {"path": "circle/red.png", "zh": "红色圆形", "en": "a red circle", "shape": "circle",
                       "colour": "red"}
    assert rows[1]["path"] == "circle/red-0.png"
    lines = (tmp_path / "shapes" / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    picture = Image.open(tmp_path / "shapes" / "star" / "blue.png")
    assert (picture.mode, picture.size) == ("RGB", (64, 64))
    assert np.array_equal(np.asarray(picture), np.asarray(render_shape("star", "blue")))
    assert not np.array_equal(np.asarray(render_shape("star", "blue", seed=1)), np.asarray(picture))


# ----------------------------------------------------------------------------------------------------------------------
# Finding the model: hub ids, wrong folders, the embedded default


@pytest.fixture
def offline_hub(monkeypatch, tmp_path, chinese):
    """A Hugging Face cache holding the small Chinese CLIP as OFA-Sys/chinese-clip-vit-base-patch16 (the files
    resolve_clip_path asks for), an older-style repo with .bin weights only, and a repo that is no CLIP model; this
    process offline on it."""
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, HUB_ID, chinese, COMMIT, patterns=CLIP_HUB_FILES)
    bin_only = tmp_path / "bin-only"
    bin_only.mkdir()
    torch.save(load_file(chinese / "model.safetensors"), bin_only / "pytorch_model.bin")
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json", "vocab.txt"):
        (bin_only / name).write_bytes((chinese / name).read_bytes())
    add_to_hub_cache(cache, "OFA-Sys/chinese-clip-vit-large-patch14", bin_only, COMMIT)
    chatglm = tmp_path / "chatglm"
    chatglm.mkdir()
    (chatglm / "config.json").write_text('{"model_type": "chatglm"}')
    add_to_hub_cache(cache, "THUDM/chatglm-6b", chatglm, COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_id_resolves_offline_to_its_snapshot_and_loads(offline_hub, chinese, canonical):
    folder = resolve_clip_path(HUB_ID)
    assert folder == offline_hub / "models--OFA-Sys--chinese-clip-vit-base-patch16" / "snapshots" / COMMIT
    assert (folder / "model.safetensors").is_symlink()
    embedder = load_clip(HUB_ID)
    assert embedder.name == HUB_ID
    np.testing.assert_allclose(embedder.embed_images(canonical[:3]), load_clip(chinese).embed_images(canonical[:3]),
                               atol=1e-6)


def test_a_hub_repo_with_bin_weights_only_resolves_and_loads(offline_hub, chinese, canonical):
    folder = resolve_clip_path("OFA-Sys/chinese-clip-vit-large-patch14")
    assert (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists()
    np.testing.assert_allclose(load_clip(folder).embed_texts(["红色圆形"]), load_clip(chinese).embed_texts(["红色圆形"]),
                               atol=1e-6)


def test_a_missing_repo_and_a_repo_that_is_no_clip_model_are_one_line_errors(offline_hub):
    with pytest.raises(UserError, match=r"^--clip_model nobody/no-such-clip \(revision main\): no such local folder, "
                                        r"and not in the Hugging Face cache .*HF_HUB_OFFLINE") as err:
        resolve_clip_path("nobody/no-such-clip")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"^--clip_model THUDM/chatglm-6b \(revision main, .*\): not a CLIP model "
                                        r"\(config.json model_type 'chatglm'"):
        resolve_clip_path("THUDM/chatglm-6b")
    with pytest.raises(UserError, match="no such folder, and not a Hugging Face repo id"):
        resolve_clip_path("no/such/folder")


def test_a_folder_that_is_no_clip_model_is_a_one_line_error_naming_what_is_missing(tmp_path, chinese):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"^--clip_model {empty}: not a CLIP model folder \\(no config.json\\)$"):
        resolve_clip_path(empty)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((chinese / "config.json").read_bytes())
    with pytest.raises(UserError, match=f"^--clip_model {partial}: a chinese_clip folder without weights "
                                        r"\(model.safetensors or pytorch_model.bin\), a tokenizer \(tokenizer.json or "
                                        r"vocab.txt\), an image preprocessor \(preprocessor_config.json\)$"):
        resolve_clip_path(partial)
    (partial / "model.safetensors").write_bytes(b"not safetensors")
    (partial / "vocab.txt").write_bytes((chinese / "vocab.txt").read_bytes())
    (partial / "preprocessor_config.json").write_bytes((chinese / "preprocessor_config.json").read_bytes())
    with pytest.raises(UserError, match=f"^{partial}: cannot load the CLIP model "):
        load_clip(partial)


def test_the_embedded_default_says_so_once_per_process(monkeypatch, capsys, chinese):
    monkeypatch.setattr(clip_model, "small_clip", lambda kind="chinese": chinese)
    monkeypatch.setattr(clip_model, "_embedded_clip_notice_shown", False)
    embedder = load_clip()
    assert embedder.name == f"embedded:{chinese.name}"
    assert resolve_clip_path() == chinese
    assert load_clip(embedder.name).model is embedder.model  # the name an index records loads it again
    assert capsys.readouterr().err == EMBEDDED_CLIP_NOTICE + "\n"
    with pytest.raises(UserError, match="^--clip_model embedded:clip-small-000000000000: that embedded model is no "
                                        "longer in "):
        resolve_clip_path("embedded:clip-small-000000000000")


def test_make_small_clip_writes_a_loadable_folder(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    helped = subprocess.run([sys.executable, "make_small_clip.py", "--help"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0
    for flag in ("--output_dir", "--kind", "--seed", "--image_size", "--patch_size", "--hidden", "--layers",
                 "--heads", "--projection_dim", "--steps", "--lr", "--variants"):
        assert flag in helped.stdout
    out = tmp_path / "clip-en"
    made = subprocess.run([sys.executable, "make_small_clip.py", "--output_dir", str(out), "--kind", "english",
                           "--steps", "5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert made.stdout.splitlines()[-1].startswith(f"wrote {out} (english, trained 5 steps in ")
    embedder = load_clip(out)
    assert embedder.kind == "english" and embedder.embed_texts(["a red circle"]).shape == (1, 32)


def test_make_small_clip_reports_bad_settings_as_usage_errors(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("make_small_clip", ROOT / "make_small_clip.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["make_small_clip.py", "--output_dir", str(tmp_path / "x"), "--patch_size", "5"])
    with pytest.raises(SystemExit) as exit_:
        script.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith("error: image_size 32 must be a multiple of patch_size 5\n")
    assert not (tmp_path / "x").exists()


def test_the_embedded_model_is_built_once_into_the_cache(monkeypatch):
    monkeypatch.setattr(clip_model, "SMALL_CLIP_SHAPE", {**clip_model.SMALL_CLIP_SHAPE, "steps": 3})
    folder = clip_model.small_clip()
    assert folder.parent == clip_model.cache_root() and folder.name.startswith("clip-small-")
    assert resolve_clip_path(folder) == folder

    def no_second_build(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(clip_model, "write_small_clip", no_second_build)
    assert clip_model.small_clip() == folder
