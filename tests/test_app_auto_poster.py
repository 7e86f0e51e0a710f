"""APP_example/auto_poster: a theme -> ChatGLM's plan (read by a tolerant parser that records where each field came
from) -> a Stable Diffusion background -> layout -> render -> review, each stage a file in the run folder, reused when
its inputs are unchanged. On the embedded small models: the random ChatGLM's plan is noise (the defaults carry it),
the small SD pipeline paints 32x32 colour noise, and RapidOCR reads the poster back."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app_helpers
import glm_tune.poster
import glm_tune.sd_generate
from app_helpers import assert_clean, one_line_error
from glm_tune.errors import UserError
from glm_tune.locking import hold_output_lock
from glm_tune.poster import SAMPLE_THEME, paint_size, parse_size
from glm_tune.poster_plan import (FIELDS, MAX_BODY_LINES, MAX_WIDTH, defaults, display_width, edited_plan,
                                  parse_plan, read_plan, write_plan)
from glm_tune.sd_generate import GenerationSettings, fit_image, generate

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "APP_example" / "auto_poster"
SAMPLE_PLAN = APP / "sample_plan.json"
THEME = "五一劳动节促销"
SMALL = ["--size", "384x512", "--steps", "4"]  # fast, and large enough for every line to be read back


def script():
    return app_helpers.load_script(APP / "poster.py", "auto_poster").main


def run_script(capsys, *argv, status=0):
    """poster.py's main in-process -> (its output lines, the run); `status` is the exit status it must end with."""
    argv = list(map(str, argv))
    if status:
        with pytest.raises(SystemExit) as exit_info:
            script()(argv)
        assert exit_info.value.code == status
        run = None
    else:
        run = script()(argv)
    return capsys.readouterr().out.strip().splitlines(), run


def stage_lines(lines):
    """{label: what the line says in brackets} for the stage lines (plan, background, layout, poster, review)."""
    return {line.split(":")[0]: line.split(" (", 1)[1] for line in lines
            if line.split(":")[0] in ("plan", "background", "layout", "poster", "review")}


# ----------------------------------------------------------------------------------------------------------------------
# The plan: a tolerant parser that says where each field came from

GOOD = {"image_prompt": "red lanterns over a street", "title": "五一大促", "subtitle": "全场五折起",
        "body": ["5月1日-5月5日", "满300减50"], "orientation": "vertical", "region": "right",
        "mood": "warm red and gold"}


def test_a_plan_in_prose_and_a_code_fence_is_found_and_every_field_is_the_models():
    answer = f"好的，这是海报方案：\n```json\n{json.dumps(GOOD, ensure_ascii=False)}\n```\n希望你喜欢！"
    plan = parse_plan(answer, THEME)
    assert {name: getattr(plan, name) for name in FIELDS} == GOOD
    assert plan.provenance == dict.fromkeys(FIELDS, "model") and plan.repairs == []
    assert plan.llm_output == answer and plan.theme == THEME
    assert plan.blocks() == [("title", "五一大促"), ("subtitle", "全场五折起"), ("body", "5月1日-5月5日"),
                             ("body", "满300减50")]
    assert plan.palette() == [(200, 30, 40), (235, 185, 50)]  # red, gold: the text colours tried first
    assert plan.paint_prompt() == "red lanterns over a street, warm red and gold"


@pytest.mark.parametrize("answer, repairs", [
    ('{"title": "五一大促", "body": ["满300减50", "包邮",], "region": "right",}', ["trailing commas"]),
    ("{'title': '五一大促', 'body': ['满300减50', '包邮'], 'region': 'right'}", ["single quotes"]),
    ("｛“title”：“五一大促”，“body”：［“满300减50”，“包邮”］，“region”：“right”｝", ["full-width punctuation"]),
    ('{title: "五一大促", // the title\n body: ["满300减50", "包邮"], region: right, draft: True',
     ["unquoted keys", "comments", "unquoted values", "Python True/False/None", "missing closing brackets"]),
    ('{"title": "五一大促" "body": ["满300减50", "包邮"] "region": "right"}', ["missing commas"]),
])
def test_broken_json_is_mended_and_the_repairs_are_recorded(answer, repairs):
    plan = parse_plan(f"方案如下：{answer}\n以上就是方案。", THEME)
    assert (plan.title, plan.body, plan.region) == ("五一大促", ["满300减50", "包邮"], "right")
    assert sorted(plan.repairs) == sorted(repairs)
    assert {name: plan.provenance[name] for name in ("title", "body", "region")} == dict.fromkeys(
        ("title", "body", "region"), "model")


def test_full_width_commas_inside_a_string_are_text_not_syntax():
    plan = parse_plan('｛“title”：“五一，大促”，“subtitle”："劳动，最光荣"｝', THEME)
    assert (plan.title, plan.subtitle) == ("五一，大促", "劳动，最光荣")


def test_missing_fields_get_defaults_derived_from_the_theme():
    plan = parse_plan('{"subtitle": "全场五折起"}', THEME)
    assert plan.title == THEME and THEME in plan.image_prompt
    assert plan.subtitle == "全场五折起" and plan.body == [] and plan.orientation == "horizontal"
    assert plan.region == "auto" and plan.mood == defaults(THEME)["mood"]
    assert plan.provenance == {**dict.fromkeys(FIELDS, "default"), "subtitle": "model"}


def test_values_out_of_range_are_clipped_and_wrong_shapes_repaired():
    answer = json.dumps({
        "title": "五一劳动节超级无敌大促销活动开始啦",  # 17 characters, 34 columns
        "body": [f"第{i}行" for i in range(1, 8)],
        "orientation": "diagonal", "region": "左侧", "subtitle": 2024, "mood": ["red", "gold"],
        "image_prompt": "a street\nat night"}, ensure_ascii=False)
    plan = parse_plan(answer, THEME)
    assert plan.title == "五一劳动节超级无敌大促销" and display_width(plan.title) == MAX_WIDTH["title"]
    assert plan.body == ["第1行", "第2行", "第3行", "第4行"] and len(plan.body) == MAX_BODY_LINES
    assert (plan.orientation, plan.region, plan.subtitle, plan.mood) == ("horizontal", "left", "2024", "red gold")
    assert plan.image_prompt == "a street at night"
    assert plan.provenance == {"title": "clipped", "body": "clipped", "orientation": "clipped", "region": "repaired",
                               "subtitle": "repaired", "mood": "repaired", "image_prompt": "repaired"}
    one_string = parse_plan('{"body": "5月1日开始\\n满300减50", "orientation": "竖排"}', THEME)
    assert one_string.body == ["5月1日开始", "满300减50"] and one_string.orientation == "vertical"
    assert one_string.provenance["body"] == one_string.provenance["orientation"] == "repaired"


@pytest.mark.parametrize("answer", ["", "equeequeeque撇run", "标题：五一大促", "{not json at all", "[1, 2, 3]",
                                    '{"answer": "好的", "n": 3}'])
def test_an_answer_without_a_plan_gives_the_default_plan(answer):
    plan = parse_plan(answer, THEME)
    assert plan.provenance == dict.fromkeys(FIELDS, "default")
    assert {name: getattr(plan, name) for name in FIELDS} == defaults(THEME)
    assert plan.blocks() == [("title", THEME)]


def test_a_plan_file_reads_back_as_written_and_a_hand_written_one_is_the_users(tmp_path):
    plan = parse_plan(json.dumps({"title": "五一大促", "body": ["a", "b", "c", "d", "e"]}), THEME)
    write_plan(plan, tmp_path / "plan.json")
    again = read_plan(tmp_path / "plan.json")
    assert again == plan  # values, provenance, repairs and ChatGLM's answer
    by_hand = read_plan(SAMPLE_PLAN, "--plan")
    assert by_hand.provenance == dict.fromkeys(FIELDS, "user") and by_hand.orientation == "vertical"
    (tmp_path / "short.json").write_text('{"title": "夏日冰饮"}', encoding="utf-8")
    short = read_plan(tmp_path / "short.json", "--plan")
    assert short.theme == "夏日冰饮" and short.provenance == {**dict.fromkeys(FIELDS, "default"), "title": "user"}


def test_an_edit_makes_the_changed_fields_the_users():
    plan = parse_plan(json.dumps(GOOD, ensure_ascii=False), THEME)
    edited = json.loads(plan.editable_json())
    edited["title"] = "五一狂欢购"
    del edited["mood"]
    new = edited_plan(plan, json.dumps(edited, ensure_ascii=False))
    assert new.title == "五一狂欢购" and new.mood == defaults(THEME)["mood"] and new.llm_output == plan.llm_output
    assert new.provenance == {**dict.fromkeys(FIELDS, "model"), "title": "user", "mood": "default"}
    with pytest.raises(UserError, match=r'^the plan: field "region": \'middle\' is not one of auto, top'):
        edited_plan(plan, json.dumps({**edited, "region": "middle"}))


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline

def test_size_is_width_x_height_in_multiples_of_8():
    assert parse_size("768x1024") == (768, 1024) and parse_size(" 512 × 640 ") == (512, 640)

    class Pipe:  # SD 1.5's and the embedded pipeline's native sizes: 64 x 8 and 16 x 2
        def __init__(self, sample_size, scale):
            self.unet = type("Unet", (), {"config": type("Config", (), {"sample_size": sample_size})})
            self.vae_scale_factor = scale

    assert paint_size(Pipe(64, 8), (768, 1024)) == (440, 592)  # 512 x 512's area at 3:4
    assert paint_size(Pipe(64, 8), (512, 512)) == (512, 512)
    assert paint_size(Pipe(16, 2), (768, 1024)) == (24, 40)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python APP_example/auto_poster/poster.py` with no arguments, in a fresh working directory."""
    with app_helpers.working_directory(tmp_path_factory.mktemp("default")) as cwd:
        return script()([]), cwd


def test_the_embedded_default_makes_the_sample_theme_poster_and_it_passes_its_own_review(default_run):
    run, cwd = default_run
    out = cwd / "output" / "auto_poster"
    assert cwd / run.out_dir == out and run.passed
    assert run.plan.theme == SAMPLE_THEME and run.plan.title == SAMPLE_THEME  # the defaults carry the noise
    assert run.plan.provenance == dict.fromkeys(FIELDS, "default") and run.plan.llm_output
    for name in ("plan.json", "background.png", "background.json", "layout.json", "poster.png", "review.json",
                 "run.json"):
        assert (out / name).is_file(), name
    assert Image.open(out / "poster.png").size == Image.open(out / "background.png").size == (768, 1024)
    review = json.loads((out / "review.json").read_text())
    assert review["passed"] and review["attempts"] == [{"attempt": 0, "region": run.layout.region, "passed": True,
                                                        "failed": []}]
    record = json.loads((out / "background.json").read_text())
    assert record["source"] == "painted" and (record["settings"]["width"], record["settings"]["height"]) == (24, 40)


def test_the_output_names_each_stage_file_and_the_plan_fields_that_came_from_defaults(tmp_path, capsys):
    lines, run = run_script(capsys, "--out", tmp_path / "out", *SMALL, "--json")
    out = tmp_path / "out"
    assert lines[:2] == [f"plan: {out / 'plan.json'} (made)",
                         "note: every plan field came from defaults, since ChatGLM's answer held no usable plan: "
                         "image_prompt, title, subtitle, body, orientation, region, mood"]
    assert lines[2].startswith(f"background: {out / 'background.png'} (made: painted at 24x40, resized to 384x512; "
                               f"its settings: {out / 'background.json'}")
    assert lines[3].startswith(f"layout: {out / 'layout.json'} (made: attempt 0")
    assert lines[4] == f"poster: {out / 'poster.png'} (made)"
    assert lines[5] == f"review: {out / 'review.json'} (made: passed all 4 checks)"
    summary = json.loads(lines[-1])
    assert summary["review_passed"] and summary["provenance"] == {"default": 7} and summary["size"] == [384, 512]
    assert summary["files"]["poster"] == str(out / "poster.png") and summary["stages"] == dict.fromkeys(
        ("plan", "paint", "layout", "render", "review"), "made")


@pytest.fixture
def counted(monkeypatch):
    """How often ChatGLM planned and Stable Diffusion painted."""
    calls = {"plan": 0, "paint": 0}
    real_plan, real_generate = glm_tune.poster.make_plan, glm_tune.sd_generate.generate

    def plan(*args, **kwargs):
        calls["plan"] += 1
        return real_plan(*args, **kwargs)

    def paint(*args, **kwargs):
        calls["paint"] += 1
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(glm_tune.poster, "make_plan", plan)
    monkeypatch.setattr(glm_tune.sd_generate, "generate", paint)
    return calls


def test_a_run_again_reuses_every_stage_and_redo_makes_a_stage_and_the_later_ones_again(tmp_path, capsys, counted):
    out = tmp_path / "out"
    args = ["--theme", THEME, "--out", out, *SMALL]
    run_script(capsys, *args)
    assert counted == {"plan": 1, "paint": 1}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    lines, run = run_script(capsys, *args)
    assert counted == {"plan": 1, "paint": 1}  # nothing planned or painted again
    said = stage_lines(lines)
    assert len(said) == 5 and all(how.startswith("reused") for how in said.values()), said
    assert run.status == dict.fromkeys(("plan", "paint", "layout", "render", "review"), "reused")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "run.json"} == {
        name: t for name, t in mtimes.items() if name != "run.json"}
    lines, run = run_script(capsys, *args, "--redo", "layout")
    assert counted == {"plan": 1, "paint": 1}
    assert run.status == {"plan": "reused", "paint": "reused", "layout": "made", "render": "made", "review": "made"}
    lines, run = run_script(capsys, *args, "--redo", "plan")
    assert counted == {"plan": 2, "paint": 2} and run.status == dict.fromkeys(run.status, "made")


def test_a_changed_theme_seed_or_size_is_never_served_a_stale_stage(tmp_path, capsys, counted):
    out = tmp_path / "out"
    _, first = run_script(capsys, "--theme", THEME, "--out", out, *SMALL)
    _, seeded = run_script(capsys, "--theme", THEME, "--out", out, *SMALL, "--seed", "1")
    assert counted == {"plan": 1, "paint": 2}
    assert seeded.status == {"plan": "reused", "paint": "made", "layout": "made", "render": "made", "review": "made"}
    assert not np.array_equal(np.asarray(seeded.background), np.asarray(first.background))
    _, themed = run_script(capsys, "--theme", "夏日冰饮", "--out", out, *SMALL, "--seed", "1")
    assert counted == {"plan": 2, "paint": 3}  # the default image prompt follows the theme
    assert themed.plan.title == "夏日冰饮" and json.loads((out / "plan.json").read_text())["title"] == "夏日冰饮"
    assert themed.layout.lines[0].text.startswith("夏日")
    _, resized = run_script(capsys, "--theme", "夏日冰饮", "--out", out, "--size", "448x512", "--steps", "4",
                            "--seed", "1")
    assert counted == {"plan": 2, "paint": 4} and resized.poster.size == (448, 512)
    assert Image.open(out / "poster.png").size == (448, 512)


def test_the_same_plan_and_seed_give_the_same_poster_and_the_background_record_paints_it_again(tmp_path, capsys):
    posters = []
    for name in ("a", "b"):
        _, run = run_script(capsys, "--plan", SAMPLE_PLAN, "--out", tmp_path / name, *SMALL, "--seed", "3")
        assert run.passed and run.plan.orientation == "vertical"
        posters.append((tmp_path / name / "poster.png").read_bytes())
    assert posters[0] == posters[1]
    settings = GenerationSettings.from_json(tmp_path / "a" / "background.json")
    (painting,), _ = generate(settings)
    again = fit_image(painting, 384, 512)
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(tmp_path / "a" / "background.png")))


def test_a_supplied_background_is_used_instead_of_painting(tmp_path, capsys, counted):
    picture = np.zeros((300, 200, 3), np.uint8)
    picture[:, :, 2] = np.linspace(40, 220, 200, dtype=np.uint8)[None, :]  # a blue gradient, 200 x 300
    Image.fromarray(picture).save(tmp_path / "bg.png")
    lines, run = run_script(capsys, "--plan", SAMPLE_PLAN, "--background", tmp_path / "bg.png",
                            "--out", tmp_path / "out", "--size", "384x512")
    assert counted["paint"] == 0 and run.passed
    expected = fit_image(Image.open(tmp_path / "bg.png").convert("RGB"), 384, 512)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "background.png")), np.asarray(expected))
    assert run.background_record["source"] == "supplied"
    assert stage_lines(lines)["background"].startswith(f"made: {tmp_path / 'bg.png'}")


def test_a_broken_layout_fails_the_review_and_retries_mend_it(tmp_path, capsys):
    out = tmp_path / "out"
    run_script(capsys, "--plan", SAMPLE_PLAN, "--out", out, *SMALL)
    layout = json.loads((out / "layout.json").read_text())
    title = layout["lines"][0]
    title["box"] = [title["box"][0] + 300, title["box"][1], title["box"][2] + 300, title["box"][3]]  # off the canvas
    for line in layout["lines"][1:]:
        line.update(fill=[255, 255, 255], outline=None, outline_width=0, shadow=False)  # white on the noise
    (out / "layout.json").write_text(json.dumps(layout))
    lines, _ = run_script(capsys, "--plan", SAMPLE_PLAN, "--out", out, *SMALL, "--redo", "render", status=1)
    assert stage_lines(lines)["layout"].startswith("reused, edited by hand")
    review = json.loads((out / "review.json").read_text())
    assert not review["passed"] and {"inside", "lines"} <= set(review["attempts"][-1]["failed"])
    lines, run = run_script(capsys, "--plan", SAMPLE_PLAN, "--out", out, *SMALL, "--retries", "3")
    retries = [line for line in lines if line.startswith("retry ")]
    assert retries[0].startswith("retry 1 of 3: the review failed: ") and retries[0].endswith("; laying out again")
    assert run.passed and lines[-1] == f"review: {out / 'review.json'} (made: passed all 4 checks)"
    attempts = json.loads((out / "review.json").read_text())["attempts"]
    assert not attempts[0]["passed"] and attempts[-1]["passed"] and attempts[-1]["attempt"] >= 1
    assert json.loads((out / "layout.json").read_text())["attempt"] == attempts[-1]["attempt"]
    lines, again = run_script(capsys, "--plan", SAMPLE_PLAN, "--out", out, *SMALL)
    assert again.passed and again.status["layout"] == "reused"  # the mended layout is kept


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "not_json.json").write_text("{")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "diagonal.json").write_text(json.dumps({"title": "五一", "orientation": "diagonal"}))
    (tmp_path / "long.json").write_text(json.dumps({"title": "五一", "body": ["x"] * 5}))
    (tmp_path / "typo.json").write_text(json.dumps({"title": "五一", "subtitel": "x"}))
    out = ["--out", tmp_path / "out"]
    cases = [
        (["--theme", "  ", *out], "error: --theme: empty; say what the poster is for"),
        (["--size", "768", *out], "error: --size 768: not WIDTHxHEIGHT (e.g. 768x1024)"),
        (["--size", "770x1024", *out], "error: --size 770x1024: each side must be a multiple of 8 between 64 and "
                                       "4096"),
        (["--size", "32x32", *out], "error: --size 32x32: each side must be a multiple of 8"),
        (["--background", tmp_path / "notes.txt", *out],
         f"error: --background {tmp_path / 'notes.txt'}: not an image that can be read"),
        (["--background", tmp_path / "none.png", *out], f"error: --background {tmp_path / 'none.png'}: no such file"),
        (["--out", tmp_path / "notes.txt"], f"error: --out {tmp_path / 'notes.txt'}: not a folder"),
        (["--out", tmp_path / "notes.txt" / "run"],
         f"error: --out {tmp_path / 'notes.txt' / 'run'}: cannot write there (Not a directory)"),
        (["--plan", tmp_path / "none.json", *out], f"error: --plan {tmp_path / 'none.json'}: cannot read it"),
        (["--plan", tmp_path / "not_json.json", *out], f"error: --plan {tmp_path / 'not_json.json'}: not valid JSON"),
        (["--plan", tmp_path / "list.json", *out], f"error: --plan {tmp_path / 'list.json'}: not a poster plan"),
        (["--plan", tmp_path / "diagonal.json", *out],
         f"error: --plan {tmp_path / 'diagonal.json'}: field \"orientation\": 'diagonal' is not one of horizontal, "
         "vertical"),
        (["--plan", tmp_path / "long.json", *out],
         f"error: --plan {tmp_path / 'long.json'}: field \"body\": 5 lines, more than 4"),
        (["--plan", tmp_path / "typo.json", *out],
         f"error: --plan {tmp_path / 'typo.json'}: field \"subtitel\": unknown"),
        (["--retries", "-1", *out], "error: --retries -1: must be 0 or more"),
    ]
    for flags, expected in cases:
        line = one_line_error(capsys, script(), *flags)
        assert line.startswith(expected), line
    assert not (tmp_path / "out").exists()  # nothing was started
    with hold_output_lock(tmp_path / "busy", "--out"):  # another run is writing this folder
        line = one_line_error(capsys, script(), "--out", tmp_path / "busy")
    assert line.startswith(f"error: --out {tmp_path / 'busy'}: in use by pid {os.getpid()}")


def test_a_hand_edited_plan_json_is_what_the_later_stages_read_and_a_broken_one_is_one_line(tmp_path, capsys,
                                                                                            counted):
    out = tmp_path / "out"
    run_script(capsys, "--out", out, *SMALL)
    plan = json.loads((out / "plan.json").read_text())
    (out / "plan.json").write_text(json.dumps({**plan, "title": "五一狂欢购", "body": ["满300减50"]}))
    lines, run = run_script(capsys, "--out", out, *SMALL)
    assert stage_lines(lines)["plan"] == "reused, edited by hand)" and counted == {"plan": 1, "paint": 1}
    assert run.status == {"plan": "reused", "paint": "reused", "layout": "made", "render": "made", "review": "made"}
    assert [line.text for line in run.layout.lines] == ["五一狂欢购", "满300减50"] and run.passed
    (out / "plan.json").write_text(json.dumps({**plan, "region": "middle"}))
    line = one_line_error(capsys, script(), "--out", out, *SMALL)
    assert line.startswith(f"error: {out / 'plan.json'}: field \"region\": 'middle' is not one of auto, top")


# ----------------------------------------------------------------------------------------------------------------------
# The page

def test_page_makes_a_poster_from_a_theme_shows_its_review_and_re_lays_out_an_edited_plan(monkeypatch):
    at = app_helpers.open_page(monkeypatch, APP / "app.py", timeout=300)
    assert_clean(at)
    at.sidebar.selectbox(key="size").set_value("512x512")
    at.sidebar.slider(key="steps").set_value(4)
    at.text_input(key="theme").input("春季新品发布")
    at.button[0].click().run()  # the theme form's submit button
    assert_clean(at)
    run = at.session_state["run"]
    assert run.passed and run.poster.size == (512, 512) and run.plan.title == "春季新品发布"
    assert [h.value for h in at.subheader] == ["1 · Plan", "2 · Background", "3 · Layout", "4 · Poster", "5 · Review"]
    assert len(at.get("image")) == 3 and at.get("download_button")  # background, layout preview, poster
    assert [m.value for m in at.markdown if m.value[:1] in "✅❌"] == [
        "✅ **lines**", "✅ **inside**", "✅ **overlap**", "✅ **contrast**"]
    assert at.success[0].value == "passed every check"
    edited = json.loads(at.text_area[0].value)
    edited.update(title="春装上新", body=["全场八折"])
    at.text_area[0].input(json.dumps(edited, ensure_ascii=False))
    at.button[1].click().run()  # "Apply edits"
    assert_clean(at)
    run = at.session_state["run"]
    assert run.status == {"plan": "given", "paint": "reused", "layout": "made", "render": "made", "review": "made"}
    assert run.plan.title == "春装上新" and run.plan.provenance["title"] == run.plan.provenance["body"] == "user"
    assert json.loads(at.text_area[0].value)["title"] == "春装上新"


def test_page_flag_errors_are_one_line(monkeypatch):
    at = app_helpers.open_page(monkeypatch, APP / "app.py", "--sd_dtype", "fp64")
    assert not at.exception
    assert at.error[0].value.startswith("error: app.py: argument --sd_dtype: invalid choice: 'fp64'")
