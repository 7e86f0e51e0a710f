"""Real-time drawing (APP_example/real_time_draw/, glm_tune/sd_draw.py) on the small pipeline the project generates:
a frame repeats under a seed, has the asked size, changes with the sketch, prompt or seed, runs exactly --steps UNet
calls with the LCM scheduler; an LCM-LoRA loads from a folder or a file (diffusers' PEFT naming and kohya's, which
the published LCM-LoRAs use) and changes the frame; the model loads once per (path, LoRA, dtype); bad input is one
line; the page draws under AppTest and redraws only when the sketch or a setting changed.

Exactness claims pin fp32 on a CPU (the default here).
"""

import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from glm_tune.errors import UserError
from glm_tune.sd_checkpoint import small_sd_pipeline
from glm_tune.sd_draw import (DrawSettings, Regenerator, compose_sketch, draw, lcm_scheduler, load_draw_pipeline,
                              lcm_timesteps, load_sketch)

import app_helpers
from app_helpers import one_line_error

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "APP_example" / "real_time_draw"
SKETCH = APP / "sample_sketch.png"
PROMPT = "an orange sun over the sea"


def load_script(name):
    return app_helpers.load_script(APP / f"{name}.py", "real_time_draw")


def open_page(monkeypatch, *flags):
    return app_helpers.open_page(monkeypatch, APP / "app.py", *flags)


def pixels(image):
    return np.asarray(image).astype(np.int16)


def with_stroke(image, box=(40, 40, 200, 90), colour=(200, 20, 20)):
    image = load_sketch(image).copy()
    ImageDraw.Draw(image).rectangle(box, fill=colour)
    return image


@pytest.fixture(scope="module")
def folder():
    return small_sd_pipeline()


@pytest.fixture(scope="module")
def drawer(folder):
    return load_draw_pipeline()


@pytest.fixture(scope="module")
def lcm_loras(folder, tmp_path_factory):
    """An adapter for the small UNet's attention layers, rank 4, random (non-zero) up and down matrices, written in
    diffusers' PEFT naming (a folder with pytorch_lora_weights.safetensors, as train_lora_sd.py writes) and in kohya's
    naming with alphas (one .safetensors file, as latent-consistency/lcm-lora-sdv1-5 is published)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from glm_tune.sd_lora import save_lora

    base = tmp_path_factory.mktemp("lcm_lora")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    peft_folder = base / "peft"
    save_lora(peft_folder, unet)
    kohya = {}
    for name, tensor in get_peft_model_state_dict(unet).items():
        module, kind = re.fullmatch(r"(.+)\.lora_(A|B)\.weight", name).groups()
        key = "lora_unet_" + module.replace(".", "_")
        kohya[f"{key}.lora_{'down' if kind == 'A' else 'up'}.weight"] = tensor.contiguous()
        kohya[f"{key}.alpha"] = torch.tensor(4.0)
    kohya_file = base / "lcm-lora-kohya.safetensors"
    save_file(kohya, kohya_file)
    return peft_folder, kohya_file


# ----------------------------------------------------------------------------------------------------------------------
# Frames


def test_a_frame_repeats_under_a_seed_and_has_the_asked_size(drawer):
    settings = DrawSettings(PROMPT, seed=3)
    first, second = draw(SKETCH, settings, drawer), draw(SKETCH, settings, drawer)
    assert first.image.size == (32, 32) and first.record["settings"]["width"] == 32  # the pipeline's own size
    assert np.array_equal(pixels(first.image), pixels(second.image))
    assert first.record["scheduler"] == "LCMScheduler" and first.record["timesteps"] == [599, 459, 299, 159]
    assert 0 < first.seconds < 5
    wide = draw(SKETCH, DrawSettings(PROMPT, seed=3, width=48, height=64), drawer)
    assert wide.image.size == (48, 64) and (wide.record["settings"]["width"], wide.record["settings"]["height"]) == (
        48, 64)
    # the sketch may come as a path, bytes, a PIL image or an array: the same pixels
    assert np.array_equal(pixels(draw(SKETCH.read_bytes(), settings, drawer).image), pixels(first.image))
    assert np.array_equal(pixels(draw(np.asarray(Image.open(SKETCH)), settings, drawer).image), pixels(first.image))


def test_a_changed_sketch_prompt_or_seed_changes_the_frame(drawer):
    """Measured on the random small UNet (max pixel change, 0-255): a stroke 57 at 1 step / strength 0.5, but only 3
    at 4 steps / 0.6, where each LCM step replaces the latent with the UNet's prediction and a random UNet keeps
    little of its input; the prompt ~28 and the seed ~150 at either."""
    for steps, strength, at_least in [(1, 0.5, 20), (4, 0.6, 1)]:
        settings = DrawSettings(PROMPT, steps=steps, strength=strength)
        base = pixels(draw(SKETCH, settings, drawer).image)
        stroke = pixels(draw(with_stroke(SKETCH), settings, drawer).image)
        assert np.abs(stroke - base).max() >= at_least
        for changed in (DrawSettings("a green dog in the snow", steps=steps, strength=strength),
                        DrawSettings(PROMPT, seed=1, steps=steps, strength=strength)):
            assert np.abs(pixels(draw(SKETCH, changed, drawer).image) - base).max() > 10
    # the stroke is a red bar over the sky (rows 40-90 of 256, 5-11 of 32): the frame changes most there
    settings = DrawSettings(PROMPT, steps=1, strength=0.5)
    diff = np.abs(pixels(draw(with_stroke(SKETCH), settings, drawer).image) - pixels(draw(SKETCH, settings,
                                                                                          drawer).image)).sum(-1)
    assert diff[5:12].mean() > 2 * diff[20:].mean()


def test_steps_are_the_unet_calls_that_run_and_strength_sets_where_they_start(drawer, monkeypatch):
    calls = []
    forward = drawer.pipe.unet.forward
    monkeypatch.setattr(drawer.pipe.unet, "forward", lambda *a, **k: calls.append(a[0].shape[0]) or forward(*a, **k))
    for steps, strength, guidance in [(1, 0.6, 1.0), (2, 0.6, 1.0), (4, 0.6, 1.0), (4, 0.25, 1.0), (3, 1.0, 2.0)]:
        calls.clear()
        frame = draw(SKETCH, DrawSettings(PROMPT, steps=steps, strength=strength, guidance=guidance), drawer)
        assert len(calls) == steps, (steps, strength)
        assert set(calls) == {2 if guidance > 1 else 1}  # guidance above 1 runs the unconditional half too
        assert len(frame.record["timesteps"]) == steps
    for steps in range(1, 9):
        for strength in [round(float(x), 2) for x in np.arange(0.2, 1.0001, 0.05)]:
            timesteps = lcm_timesteps(drawer.pipe.scheduler, steps, strength)
            assert len(timesteps) == steps and timesteps == sorted(set(timesteps), reverse=True)
            assert strength * 1000 - 20 <= timesteps[0] + 1 <= strength * 1000  # LCM's timesteps are 20 apart
    with pytest.raises(UserError, match=r"^--steps 8 at --strength 0.1: LCM's schedule has 5 timesteps"):
        lcm_timesteps(drawer.pipe.scheduler, 8, 0.1)


def test_the_lcm_scheduler_keeps_the_folders_schedule_and_prediction_type(drawer):
    from glm_tune.sd_checkpoint import make_scheduler

    config = drawer.pipe.scheduler.config
    assert type(drawer.pipe.scheduler).__name__ == "LCMScheduler" and config.prediction_type == "sample"
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    pndm = lcm_scheduler(make_scheduler("epsilon").config)  # SD 1.x's own scheduler: its keys LCM has no use for
    assert pndm.config.prediction_type == "epsilon" and "skip_prk_steps" not in pndm.config


def test_the_pipeline_loads_once_per_path_lora_and_dtype(drawer, folder, lcm_loras):
    peft_folder, _ = lcm_loras
    assert load_draw_pipeline() is drawer
    assert load_draw_pipeline(str(folder)) is drawer  # the default is that folder
    with_lora = load_draw_pipeline(None, str(peft_folder))
    assert with_lora is not drawer and load_draw_pipeline(None, str(peft_folder / "pytorch_lora_weights.safetensors"))\
        is with_lora


def test_an_lcm_lora_loads_from_a_folder_or_a_kohya_file_and_changes_the_frame(drawer, lcm_loras, tmp_path):
    peft_folder, kohya_file = lcm_loras
    settings = DrawSettings(PROMPT)
    plain = pixels(draw(SKETCH, settings, drawer).image)
    from_folder = load_draw_pipeline(None, str(peft_folder))
    assert from_folder.lcm_lora.endswith("pytorch_lora_weights.safetensors")
    assert from_folder.pipe.num_fused_loras == 1 and from_folder.pipe.get_list_adapters() == {}  # fused, unwrapped
    adapted = pixels(draw(SKETCH, settings, from_folder).image)
    assert np.abs(adapted - plain).max() > 10
    from_kohya = load_draw_pipeline(None, str(kohya_file))
    assert np.abs(pixels(draw(SKETCH, settings, from_kohya).image) - adapted).max() <= 1  # the same adapter
    # draw() given only settings finds the same pipeline
    again = draw(SKETCH, DrawSettings(PROMPT, lcm_lora=str(kohya_file)))
    assert np.abs(pixels(again.image) - adapted).max() <= 1


def test_compose_puts_the_strokes_over_the_background():
    strokes = np.zeros((64, 64, 4), np.uint8)
    strokes[10:20, 10:20] = (255, 0, 0, 255)
    sketch = np.asarray(compose_sketch(SKETCH, strokes))
    assert sketch.shape == (64, 64, 3) and (sketch[15, 15] == (255, 0, 0)).all()
    assert np.array_equal(sketch[40:], np.asarray(load_sketch(SKETCH).resize((64, 64), Image.Resampling.LANCZOS))[40:])
    assert compose_sketch(SKETCH).size == (256, 256)  # nothing sent yet: the background itself
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # a transparent drawing is white, not black
    assert (np.asarray(load_sketch(rgba)) == 255).all()


# ----------------------------------------------------------------------------------------------------------------------
# The script


def test_draw_script_writes_the_frame_and_its_settings_and_prints_the_latency(drawer, tmp_path, capsys):
    main = load_script("draw").main
    out = tmp_path / "frames" / "sun.png"
    frame, path, settings_path = main(["--sketch", str(SKETCH), "--prompt", PROMPT, "--steps", "2", "--guidance",
                                       "1.5", "--strength", "0.7", "--seed", "9", "--width", "40", "--height", "24",
                                       "--out", str(out)])
    printed = capsys.readouterr().out
    assert re.search(r"^latency \d+ ms$", printed, re.M) and f"wrote {out} (40x24, 2 steps" in printed
    assert Image.open(out).size == (40, 24) and not list(out.parent.glob(".*"))  # no temporary files left
    record = json.loads(settings_path.read_text())
    assert record["settings"]["pretrained_model_name_or_path"] is None and record["settings"]["steps"] == 2
    assert record["sketch"] == str(SKETCH) and record["image"] == "sun.png" and record["scheduler"] == "LCMScheduler"
    again = draw(SKETCH, DrawSettings(**record["settings"]), drawer)  # the settings file makes the frame again
    assert np.array_equal(pixels(again.image), pixels(Image.open(out)))


def test_the_model_can_be_a_folder_or_a_hub_id_from_the_hugging_face_cache(folder, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    main = load_script("draw").main
    commit = "d" * 40
    repo = tmp_path / "hub" / "models--someone--sd-small"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    images = []
    for model in (None, str(folder), "someone/sd-small"):
        flags = ["--pretrained_model_name_or_path", model] if model else []
        main(["--sketch", str(SKETCH), "--prompt", PROMPT, "--out", str(tmp_path / "x.png"), *flags])
        images.append(pixels(Image.open(tmp_path / "x.png")))
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])
    capsys.readouterr()


def test_bad_input_is_one_line(folder, tmp_path, capsys):
    main = load_script("draw").main
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG")
    text = tmp_path / "notes.safetensors"
    text.write_text("not weights")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--sketch", broken], f"error: --sketch {broken}: not an image that can be read"),
        (["--sketch", tmp_path / "missing.png"], f"error: --sketch {tmp_path / 'missing.png'}: no such file"),
        (["--width", "30"], "error: --width 30: must be a positive multiple of 8"),
        (["--height", "0"], "error: --height 0: must be a positive multiple of 8"),
        (["--lcm_lora", folder / "unet" / "diffusion_pytorch_model.safetensors"],
         "error: --lcm_lora " + str(folder / "unet" / "diffusion_pytorch_model.safetensors") + ": not LoRA weights"),
        (["--lcm_lora", folder / "unet"], f"error: --lcm_lora {folder / 'unet'}: no pytorch_lora_weights.safetensors"),
        (["--lcm_lora", text], "not a safetensors or PyTorch weights file"),
        (["--lcm_lora", empty], "no pytorch_lora_weights.safetensors in this folder"),
        (["--lcm_lora", tmp_path / "nothing"], "no such file or folder"),
        (["--strength", "0"], "error: --strength 0.0: must be in (0, 1]"),
        (["--steps", "8", "--strength", "0.1"], "error: --steps 8 at --strength 0.1: LCM's schedule has 5 timesteps "
                                                "below that strength"),
        (["--steps", "0"], "error: --steps 0: must be between 1 and 50"),
        (["--prompt", " "], "error: --prompt: empty"),
        (["--out", tmp_path / "x.jpg"], "must end in .png"),
        (["--pretrained_model_name_or_path", empty], "not a diffusers pipeline folder"),
    ]
    for flags, expected in cases:
        if "--sketch" not in flags:
            flags = ["--sketch", SKETCH, *flags]
        if "--prompt" not in flags:
            flags = ["--prompt", PROMPT, *flags]
        line = one_line_error(capsys, main, *flags, *([] if "--out" in flags else ["--out", tmp_path / "o.png"]))
        assert expected in line, line
    assert not (tmp_path / "o.png").exists()
    with pytest.raises(UserError, match=r"^sketch: an image array must be H x W"):
        load_sketch(np.zeros((4, 4, 2)), "sketch")


def test_the_sample_sketch_is_what_its_script_makes(tmp_path, monkeypatch, capsys):
    script = load_script("make_sample_sketch")
    monkeypatch.setattr(sys, "argv", ["make_sample_sketch.py", "--out", str(tmp_path / "s.png")])
    script.main()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s.png")), np.asarray(Image.open(SKETCH)))
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------------------------------
# The page


def test_the_handler_redraws_on_a_new_stroke_only(drawer):
    app = load_script("app")
    state = {}
    settings = DrawSettings(PROMPT, steps=1, strength=0.5)
    background = load_sketch(SKETCH).resize((128, 128))
    first, fresh = app.on_canvas(None, background, settings, drawer, state)  # before any stroke: the background
    assert fresh and state["regenerator"].frames == 1 and len(state["latencies"]) == 1
    strokes = np.zeros((128, 128, 4), np.uint8)
    same, fresh = app.on_canvas(strokes, background, settings, drawer, state)  # an empty canvas: the same sketch
    assert not fresh and same is first
    strokes[20:40, 20:100] = (200, 20, 20, 255)
    stroked, fresh = app.on_canvas(strokes, background, settings, drawer, state)
    assert fresh and np.abs(pixels(stroked.image) - pixels(first.image)).max() > 10
    again, fresh = app.on_canvas(strokes.copy(), background, settings, drawer, state)  # a rerun, same strokes
    assert not fresh and again is stroked
    slider = DrawSettings(PROMPT, steps=1, strength=0.5, seed=2)  # a slider moved
    _, fresh = app.on_canvas(strokes, background, slider, drawer, state)
    assert fresh and state["regenerator"].frames == 3 and len(state["latencies"]) == 3
    assert isinstance(Regenerator()(SKETCH, settings, drawer)[0].image, Image.Image)


def frames(at):
    return at.session_state["regenerator"].frames


def test_page_draws_the_starting_sketch_and_redraws_only_on_changes(monkeypatch, drawer):
    at = open_page(monkeypatch)
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("image")) == 1 and re.fullmatch(r"latency \d+ ms", at.markdown[0].value)
    assert frames(at) == 1
    frame = at.session_state["regenerator"].frame
    expected = draw(SKETCH, DrawSettings(at.text_input(key="prompt").value), drawer)  # what draw.py makes
    assert np.array_equal(pixels(frame.image), pixels(expected.image))
    at.run()  # a rerun with nothing new
    assert frames(at) == 1 and "unchanged, not redrawn" in at.caption[-1].value
    at.text_input(key="prompt").set_value("a green dog").run()
    assert frames(at) == 2
    at.slider(key="steps").set_value(2).run()
    assert frames(at) == 3 and at.session_state["regenerator"].frame.record["settings"]["steps"] == 2
    buffer = io.BytesIO()
    with_stroke(SKETCH).save(buffer, format="PNG")  # an uploaded background replaces the sketch
    at.sidebar.file_uploader(key="background_upload").set_value([("bg.png", buffer.getvalue(), "image/png")]).run()
    assert not at.error and frames(at) == 4
    at.sidebar.file_uploader(key="background_upload").set_value([("bad.png", b"not an image", "image/png")]).run()
    assert at.error[0].value.startswith("error: bad.png: not an image that can be read")
    assert frames(at) == 5  # back on the sample sketch, with the new steps
    at.number_input(key="width").set_value(12).run()  # typed, not stepped
    assert at.error[0].value == "error: --width 12: must be a positive multiple of 8 (Stable Diffusion's VAE works " \
                                "on 8-pixel blocks)"


def test_page_flag_errors_are_one_line(monkeypatch, tmp_path):
    at = open_page(monkeypatch, "--sketch", tmp_path / "missing.png")
    assert at.error[0].value == f"error: --sketch {tmp_path / 'missing.png'}: no such file"
    at = open_page(monkeypatch, "--lcm_lora", tmp_path)
    assert at.error[0].value == f"error: --lcm_lora {tmp_path}: no pytorch_lora_weights.safetensors in this folder " \
                                "(train_lora_sd.py writes one into its --output_dir and each checkpoint-N)"
