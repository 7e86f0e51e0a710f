"""APP_example/retrieval_image_gen: a request becomes a prompt (ChatGLM, or the request when ChatGLM's answer is
unusable), the prompt finds a reference picture (CLIP over an image index), and img2img redraws the reference. On the
embedded small models: the generated ChineseCLIP over the sample collection of captioned shapes, the random small
ChatGLM (its answers are unusable: the fallback) and the small Stable Diffusion pipeline."""

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from PIL import Image

import glm_tune.sd_lora
from glm_tune.clip_model import load_clip
from glm_tune.errors import UserError
from glm_tune.image_index import ImageIndex, ensure_sample_index
from glm_tune.image_rag import RagSettings, clean_prompt, rewrite_request, run
from glm_tune.sd_checkpoint import load_pipeline, small_sd_pipeline

import app_helpers
from app_helpers import one_line_error

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "APP_example" / "retrieval_image_gen"
SD = dict(steps=4, strength=0.75, seed=5)


def load_script(name):
    return app_helpers.load_script(APP / f"{name}.py", "retrieval_image_gen")


def open_page(monkeypatch, *flags):
    return app_helpers.open_page(monkeypatch, APP / "app.py", *flags, timeout=300)


@pytest.fixture(scope="module")
def index_dir():
    return ensure_sample_index()


@pytest.fixture(scope="module")
def index(index_dir):
    return ImageIndex.open(index_dir)


@pytest.fixture(scope="module")
def embedder(index):
    return load_clip(index.model)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(small_sd_pipeline())


@pytest.fixture
def opened(monkeypatch):
    """The paths of the pictures img2img starts from, as generate() opens them."""
    seen = []
    real = glm_tune.sd_lora.open_image

    def spy(path):
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(glm_tune.sd_lora, "open_image", spy)
    return seen


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1: the prompt

@pytest.mark.parametrize("answer, prompt", [
    ("a red circle on a white background", "a red circle on a white background"),
    ('Prompt: "a red circle, flat colours"\n(I hope this helps)', "a red circle, flat colours"),
    ("英文提示词：a blue square", "a blue square"),
    ("```\na green triangle\n```", "a green triangle"),
])
def test_a_usable_answer_is_cleaned_into_the_prompt(answer, prompt):
    assert clean_prompt(answer) == (prompt, None)


@pytest.mark.parametrize("answer, reason", [
    ("", "empty answer"),
    ("   \n \n", "empty answer"),
    ("a red\ufffd circle", "unreadable characters"),
    ("!!! ??? 123", "no words"),
    ("red red red red red red red", "the same words over and over"),
    ("eque" * 40, "the same words over and over"),
    (" ".join(f"{w}{i}" for i, w in enumerate("a red circle drawn on paper with soft light".split() * 6)),
     "longer than 300 characters"),
    ("一个红色的圆形", "not in English (Stable Diffusion 1.x/2.x's text encoder reads English)"),
])
def test_an_unusable_answer_says_why(answer, reason):
    assert clean_prompt(answer) == (None, reason)
    assert clean_prompt("一个红色的圆形", language="any") == ("一个红色的圆形", None)


def test_the_request_is_used_when_the_answer_is_unusable_and_the_choice_says_so():
    choice = rewrite_request("红色圆形", FakeListChatModel(responses=["红色的圆"]))
    assert (choice.prompt, choice.source, choice.llm_output) == ("红色圆形", "request", "红色的圆")
    assert choice.note == ("note: ChatGLM's prompt was unusable (not in English (Stable Diffusion 1.x/2.x's text "
                           "encoder reads English)), so the raw request is the prompt")
    choice = rewrite_request(" 红色圆形 ", FakeListChatModel(responses=["Prompt: a red circle"]))
    assert (choice.prompt, choice.source, choice.note) == ("a red circle", "chatglm", None)
    with pytest.raises(UserError, match=r"^--request: empty"):
        rewrite_request("  ", FakeListChatModel(responses=["x"]))


# ----------------------------------------------------------------------------------------------------------------------
# The whole pipeline

def test_the_retrieved_picture_is_what_img2img_starts_from(index_dir, index, embedder, pipe, opened):
    settings = RagSettings(index_dir=str(index_dir), sd=dict(SD, width=48, height=40))
    llm = FakeListChatModel(responses=["a red circle"])
    result = run("画一个红色的圆", settings, llm=llm, index=index, embedder=embedder, pipe=pipe)
    assert result.choice.prompt == "a red circle" and result.choice.source == "chatglm"
    assert result.reference.relative_path == "circle/red.png"  # the small CLIP really retrieves
    assert opened == [Path(result.reference.path)]
    assert result.record["image_sha256"] == hashlib.sha256(Path(result.reference.path).read_bytes()).hexdigest()
    assert result.record["reference"]["score"] == pytest.approx(result.reference.score)
    assert result.images[0].size == (48, 40)
    # another request finds another reference, and the picture follows it (same prompt, seed and settings)
    other = run("x", RagSettings(index_dir=str(index_dir), prompt="a red circle", sd=dict(SD, width=48, height=40)),
                index=index, embedder=embedder, pipe=pipe)
    assert other.reference == result.reference and np.array_equal(np.asarray(other.images[0]),
                                                                   np.asarray(result.images[0]))
    blue = run("x", RagSettings(index_dir=str(index_dir), prompt="a blue square", sd=dict(SD, width=48, height=40)),
               index=index, embedder=embedder, pipe=pipe)
    assert blue.reference.relative_path == "square/blue.png"
    assert not np.array_equal(np.asarray(blue.images[0]), np.asarray(result.images[0]))


def test_script_on_the_embedded_models_falls_back_to_the_request_and_its_json_reproduces_the_image(tmp_path,
                                                                                                  capsys):
    main = load_script("generate").main
    out = tmp_path / "out"
    image, settings_path = main(["--request", "红色圆形", "--width", "40", "--height", "32", "--steps", "4",
                                 "--seed", "9", "--out_dir", str(out), "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "prompt (request): 红色圆形"
    assert lines[1].startswith("note: ChatGLM's prompt was unusable (") and lines[1].endswith(
        "so the raw request is the prompt")  # the random small ChatGLM's answer
    summary = json.loads(lines[-1])
    assert summary["prompt"] == "红色圆形" and summary["prompt_source"] == "request"
    assert summary["reference"]["relative_path"] == "circle/red.png"
    assert Image.open(image).size == (40, 32)
    record = json.loads(settings_path.read_text())
    assert record["request"] == "红色圆形" and record["settings"]["prompt"] == "红色圆形"
    assert record["settings"]["image"] == summary["reference"]["path"] and record["settings"]["seed"] == 9
    assert record["llm_output"] and record["fallback_reason"]
    again, again_settings = main(["--settings", str(settings_path), "--out_dir", str(out)])
    assert np.array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(again)))
    assert json.loads(again_settings.read_text())["reference"] == record["reference"]
    # lora_sd's generate.py reads the same file and makes the same picture
    spec = importlib.util.spec_from_file_location("lora_sd_generate", ROOT / "APP_example/lora_sd/generate.py")
    lora_generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lora_generate)
    (third,), _ = lora_generate.main(["--settings", str(settings_path), "--out_dir", str(tmp_path / "lora_sd")])
    assert np.array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(third)))


def test_bad_input_is_one_line(index_dir, tmp_path, capsys):
    main = load_script("generate").main
    out = ["--out_dir", tmp_path / "out"]
    not_json = tmp_path / "settings.json"
    not_json.write_text("{")
    foreign = tmp_path / "lora_sd.json"
    foreign.write_text(json.dumps({"version": 1, "settings": {"prompt": "a photo"}}))
    cases = [
        (["--request", "x", "--index_dir", tmp_path / "none"], f"error: --index_dir {tmp_path / 'none'}: no image "
                                                                "index"),
        (["--request", "  ", "--index_dir", index_dir], "error: --request: empty; say what picture you want"),
        (["--request", "x", "--strength", "0"], "error: --strength 0.0: must be in (0, 1]"),
        (["--request", "x", "--width", "30"], "error: --width 30: must be a positive multiple of 8"),
        ([], "error: --request: required (or --settings FILE to repeat a run)"),
        (["--settings", not_json], f"error: --settings {not_json}: not valid JSON"),
        (["--settings", foreign], f"error: --settings {foreign}: not a run of this script"),
    ]
    for flags, expected in cases:
        line = one_line_error(capsys, main, *flags, *out)
        assert line.startswith(expected), line


# ----------------------------------------------------------------------------------------------------------------------
# The page

def test_page_shows_the_three_stages_side_by_side(monkeypatch, index_dir):
    at = open_page(monkeypatch, "--index_dir", index_dir)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.selectbox(key="index_dir").options == [str(index_dir)]  # only what the operator named
    at.text_area(key="request").input("蓝色正方形")
    at.slider(key="steps").set_value(4)
    at.button[0].click().run()  # the form's submit button
    assert not at.exception and not at.error, [e.value for e in at.error]
    result = at.session_state["result"]
    assert result.choice.source == "request" and result.reference.relative_path == "square/blue.png"
    assert [h.value for h in at.subheader] == ["1 · Prompt", "2 · Reference", "3 · Picture"]
    assert at.warning[0].value.startswith("note: ChatGLM's prompt was unusable")
    assert len(at.get("image")) == 2 and at.get("download_button")  # the reference and the picture


def test_page_flags_errors_are_one_line(monkeypatch, tmp_path):
    at = open_page(monkeypatch, "--index_dir", tmp_path / "none")
    assert not at.exception
    assert at.error[0].value.startswith(f"error: --index_dir {tmp_path / 'none'}: no image index")
