"""APP_example/clip_retrieval: build_index.py and search.py on the sample collection (captioned shapes) with the
generated small CLIP models, Chinese and English, and the page under AppTest. The index itself (incremental runs,
IVF, round trips, locks) is tested with an independent embedder in test_image_index.py."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from glm_tune.clip_model import COLOURS, SHAPES, caption, small_clip, write_caption_images

import app_helpers
from app_helpers import assert_clean, one_line_error

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "APP_example" / "clip_retrieval"


def load_script(name):
    return app_helpers.load_script(APP / f"{name}.py", "clip_retrieval")


build, search = load_script("build_index"), load_script("search")


def open_page(monkeypatch, *flags):
    return app_helpers.open_page(monkeypatch, APP / "app.py", *flags)


def json_hits(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """The captioned shapes (one per shape and colour, in a folder per shape), plus a corrupt file."""
    folder = tmp_path_factory.mktemp("pictures")
    rows = write_caption_images(folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder, rows


@pytest.fixture(scope="module")
def index_dir(collection, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("index") / "index"
    report = build.main(["--img_dir", str(collection[0]), "--index_dir", str(index_dir), "--quiet"])
    assert report.total == len(collection[1]) and report.embedded == len(collection[1])
    assert [Path(p).name for p, _ in report.skipped] == ["broken.png"]
    return index_dir


def test_every_caption_finds_its_picture_first_in_chinese_and_english(index_dir, collection, capsys):
    for row in collection[1]:
        for text in (row["zh"], row["en"]):
            search.main(["--index_dir", str(index_dir), "--text", text, "--k", "3", "--json"])
            hits = json_hits(capsys)
            assert len(hits) == 3 and hits[0]["path"] == str(collection[0] / row["path"]), text
            assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    search.main(["--index_dir", str(index_dir), "--text", "红色圆形"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[0].endswith(str(collection[0] / "circle" / "red.png"))  # the default k


def test_an_image_finds_itself_first_with_score_one(index_dir, collection, capsys):
    picture = collection[0] / "square" / "blue.png"
    search.main(["--index_dir", str(index_dir), "--image", str(picture), "--k", "2", "--json"])
    hits = json_hits(capsys)
    assert hits[0]["path"] == str(picture) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[1]["score"] < 0.999


def test_build_reports_the_corrupt_file_and_a_rerun_embeds_nothing(index_dir, collection, capsys):
    report = build.main(["--img_dir", str(collection[0]), "--index_dir", str(index_dir)])
    out, err = capsys.readouterr()
    assert report.embedded == 0 and report.unchanged == len(collection[1]) and len(report.skipped) == 1
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        f"warning: {collection[0] / 'broken.png'}: not a readable image ({report.skipped[0][1]}), skipped"]
    assert out.strip().endswith(f"skipped 1; embedded 0 in {report.seconds:.1f} s")


def test_the_english_clip_folder_works_the_same(collection, tmp_path, capsys):
    folder = small_clip("english")
    build.main(["--img_dir", str(collection[0]), "--index_dir", str(tmp_path / "en"), "--clip_model", str(folder),
                "--quiet"])
    for shape in SHAPES:
        for colour in COLOURS:
            search.main(["--index_dir", str(tmp_path / "en"), "--text", caption(shape, colour, "en"), "--k", "1",
                         "--json"])
            assert json_hits(capsys)[0]["path"] == str(collection[0] / shape / f"{colour}.png")


def test_bad_input_is_one_line(index_dir, collection, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures")
    text_file = tmp_path / "query.png"
    text_file.write_text("not a picture")
    n = len(collection[1])
    cases = [
        (build.main, ["--img_dir", empty, "--index_dir", tmp_path / "i"],
         f"error: --img_dir {empty}: no images (.jpg .jpeg .png .webp) found"),
        (build.main, ["--img_dir", tmp_path / "missing", "--index_dir", tmp_path / "i"],
         f"error: --img_dir {tmp_path / 'missing'}: "),
        (build.main, ["--img_dir", collection[0], "--index_dir", index_dir, "--batch_size", "0"],
         "error: --batch_size 0: must be at least 1"),
        (search.main, ["--index_dir", tmp_path / "nothing", "--text", "x"],
         f"error: --index_dir {tmp_path / 'nothing'}: no image index (build one with build_index.py)"),
        (search.main, ["--index_dir", index_dir, "--text", "x", "--k", n + 1],
         f"error: --k {n + 1}: the index holds only {n} images"),
        (search.main, ["--index_dir", index_dir, "--text", "x", "--k", 0], "error: --k 0: must be at least 1"),
        (search.main, ["--index_dir", index_dir, "--image", text_file], f"error: {text_file}: not an image"),
        (search.main, ["--index_dir", index_dir, "--text", "x", "--clip_model", small_clip("english")],
         "error: "),
    ]
    for main, flags, expected in cases:
        line = one_line_error(capsys, main, *flags)
        assert line.startswith(expected), line


# ----------------------------------------------------------------------------------------------------------------------
# The page

def result_captions(at):
    """The result grid's captions, in order: "**score** · relative path"."""
    return [c.value for c in at.main.caption if " · " in c.value]


def test_page_searches_by_text_by_upload_and_more_like_this(monkeypatch, index_dir, collection):
    at = open_page(monkeypatch, "--index_dir", index_dir, "--k", "4")
    assert_clean(at)
    assert at.selectbox(key="index_dir").options == [str(index_dir)]  # only what the operator named
    at.text_input(key="text").input("绿色三角形")
    at.button[0].click().run()  # the text form's submit
    assert_clean(at)
    assert at.session_state["query"] == ("text", "绿色三角形")
    assert at.subheader[0].value == "4 results for text “绿色三角形”"
    assert result_captions(at)[0].endswith("triangle/green.png") and len(result_captions(at)) == 4

    first_like = [b for b in at.button if b.key and b.key.startswith("like-")][0]
    first_like.click().run()
    assert_clean(at)
    assert at.session_state["query"] == ("like", "triangle/green.png")
    assert result_captions(at)[0] == "**1.000** · triangle/green.png"  # itself, first


def test_an_uploaded_picture_is_searched_as_the_page_does_and_a_non_image_is_one_line(index_dir, collection):
    """What the page does with an upload (AppTest cannot drive a file uploader): the file's bytes and name."""
    from glm_tune.clip_model import load_clip
    from glm_tune.errors import UserError
    from glm_tune.image_index import ImageIndex

    index = ImageIndex.open(index_dir)
    embedder = load_clip(index.model)
    png = io.BytesIO()
    Image.open(collection[0] / "star" / "purple.png").save(png, format="PNG")
    hits = index.search_image(embedder, png.getvalue(), 3, name="mine.png")
    assert hits[0].relative_path == "star/purple.png" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UserError, match=r"^notes.png: not an image"):
        index.search_image(embedder, b"hello", 3, name="notes.png")


def test_page_flag_errors_are_one_line(monkeypatch, tmp_path):
    at = open_page(monkeypatch, "--index_dir", tmp_path / "none")
    assert not at.exception
    assert at.error[0].value == f"error: --index_dir {tmp_path / 'none'}: no image index (build one with " \
                                "build_index.py)"
    at = open_page(monkeypatch, "--k", "0")
    assert at.error[0].value == "error: --k 0: must be between 1 and 50"
