"""The poster's layout, drawing and OCR review (glm_tune/poster_layout.py, glm_tune/poster_review.py), on generated
768 x 1024 backgrounds: plain light, plain dark, a painted-looking gradient, and busy ones (random noise, fine stripes,
half noise and half plain).

Layout: every box inside the margin, none overlapping; horizontal lines stacked in reading order, vertical columns
right to left with the characters top to bottom; too long a line wraps (CJK between characters, Latin between words)
or the size shrinks; every fill reaches WCAG 4.5:1 on what lies under it, or the line records an outline that does;
"auto" keeps off the busy half. Drawing: real glyphs (never the .notdef box) from the PyPI Noto Sans CJK, the same
pixels every time. Review: OCR (RapidOCR, offline) reads back every line of Chinese and English posters, horizontal and
vertical; a line pushed off the canvas and white text on white fail exactly the checks they should; every retry
attempt passes.
"""

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from glm_tune import poster_layout
from glm_tune.errors import UserError
from glm_tune.poster_layout import (MIN_CONTRAST, Layout, break_units, busyness, cjk_font, contrast_over,
                                    contrast_ratio, font_face_index, has_glyph, load_font, make_layout,
                                    render_poster, wrap)
from glm_tune.poster_review import Reading, best_match, default_reader, normalise, review_poster, write_review

W, H = 768, 1024
CHINESE = [("title", "五一劳动节促销"), ("subtitle", "全场商品低至五折"),
           ("body", "活动时间：5月1日至5月5日，满300减50，会员再享九五折")]
ENGLISH = [("title", "Labour Day Sale"), ("subtitle", "Everything up to 50% off"),
           ("body", "May 1 to May 5 only, free delivery on orders over 300 yuan")]


def plain(colour):
    return Image.new("RGB", (W, H), colour)


def noise(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8))


def stripes(period=8):
    pixels = np.zeros((H, W, 3), np.uint8)
    pixels[:, (np.arange(W) // (period // 2)) % 2 == 0] = 255
    return Image.fromarray(pixels)


def half_busy(side):
    """Random noise on one half (`side`: "top" or "right"), a plain light grey on the other."""
    pixels = np.full((H, W, 3), 235, np.uint8)
    busy = np.asarray(noise(1))
    if side == "top":
        pixels[: H // 2] = busy[: H // 2]
    else:
        pixels[:, W // 2:] = busy[:, W // 2:]
    return Image.fromarray(pixels)


def painted():
    """Something like a painted background: a sky-to-sunset gradient, soft discs, a little grain."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    t = y / H
    pixels = np.stack([70 + 170 * t, 120 + 60 * t, 200 - 120 * t], axis=-1)
    for cx, cy, r, colour in ((200, 300, 150, (250, 220, 120)), (600, 750, 220, (120, 60, 40))):
        disc = np.clip(1 - np.hypot(x - cx, y - cy) / r, 0, 1)[..., None]
        pixels = pixels * (1 - disc) + np.array(colour) * disc
    pixels += np.random.default_rng(3).normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


BACKGROUNDS = {"light": lambda: plain((245, 240, 225)), "dark": lambda: plain((20, 30, 60)), "painted": painted,
               "noise": noise, "stripes": stripes, "half-busy": lambda: half_busy("top")}


def inside(box, margin):
    return box[0] >= margin and box[1] >= margin and box[2] <= W - margin and box[3] <= H - margin


def overlaps(a, b):
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def assert_well_placed(layout):
    assert layout.lines
    for line in layout.lines:
        assert inside(line.box, layout.margin), (line.text, line.box)
    for i, a in enumerate(layout.lines):
        for b in layout.lines[i + 1:]:
            assert not overlaps(a.box, b.box), (a.text, a.box, b.text, b.box)


def block_text(layout, block):
    return [line.text for line in layout.lines if line.block == block]


# ----------------------------------------------------------------------------------------------------------------------
# Fonts and drawing


def test_the_font_is_noto_sans_cjk_from_pypi_with_its_simplified_chinese_face():
    path = cjk_font()
    assert path.is_file() and "site-packages" in str(path) and path.suffix == ".ttc"
    assert cjk_font(bold=True) == path
    assert load_font(str(path), 20, font_face_index(str(path))).getname() == ("Noto Sans CJK SC", "Regular")


def test_a_missing_font_is_one_line_saying_how_to_install_it(monkeypatch):
    import noto_cjk

    def not_installed(family):
        raise noto_cjk.FontNotInstalled(noto_cjk.get(family, "", "", "otc"))

    monkeypatch.setattr(noto_cjk, "otc_path", not_installed)
    with pytest.raises(UserError, match=r"pip install 'noto-cjk\[sans\]'") as err:
        cjk_font()
    assert "\n" not in str(err.value)


def test_chinese_and_latin_render_as_real_glyphs_not_the_notdef_box():
    font_file = str(cjk_font())
    index = font_face_index(font_file)
    font = load_font(font_file, 40, index)
    notdef = np.asarray(font.getmask("\U0010fffd"))  # a code point no font has
    glyphs = {}
    for ch in "五一劳动节促销满减Sale50%":
        mask = np.asarray(font.getmask(ch))
        assert mask.shape != notdef.shape or not np.array_equal(mask, notdef), ch
        assert has_glyph(ch, font_file, index)
        glyphs[ch] = mask.tobytes()
    assert len(set(glyphs.values())) == len(glyphs)  # every character its own shape
    assert not has_glyph("🎉", font_file, index)


def test_drawing_is_pixel_identical_and_the_size_of_the_background():
    background = painted()
    layout = make_layout(background, CHINESE)
    first, second = render_poster(background, layout), render_poster(background.copy(), layout)
    assert first.size == background.size == (W, H)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert not np.array_equal(np.asarray(first), np.asarray(background))
    # the text is drawn where the layout says: the title's box holds its fill colour, the area outside any box does not
    title = layout.lines[0]
    x0, y0, x1, y1 = title.box
    patch = np.asarray(first)[y0:y1, x0:x1].reshape(-1, 3)
    assert (np.abs(patch.astype(int) - title.fill).sum(axis=1) < 10).mean() > 0.1
    with pytest.raises(UserError, match="768 x 1024"):
        render_poster(background.resize((512, 512)), layout)


def test_characters_the_font_lacks_are_left_out_with_a_warning(capsys):
    layout = make_layout(plain("white"), [("title", "🎉五一快乐🎉")])
    assert [line.text for line in layout.lines] == ["五一快乐"]
    assert "warning: text block 1 (title): the font has no 🎉; left out" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# Measures


def test_contrast_ratio_is_wcag():
    assert contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21.0)
    assert contrast_ratio((123, 45, 67), (123, 45, 67)) == pytest.approx(1.0)
    assert contrast_ratio((0x76, 0x76, 0x76), (255, 255, 255)) == pytest.approx(4.54, abs=0.01)  # the AA grey
    assert contrast_ratio((255, 0, 0), (255, 255, 255)) == pytest.approx(4.0, abs=0.01)
    # over many pixels: 90% of them contrast at least this much
    half = np.array([[0, 0, 0]] * 50 + [[255, 255, 255]] * 50)
    assert contrast_over((255, 255, 255), half) == pytest.approx(1.0)
    assert contrast_over((255, 255, 255), np.array([[0, 0, 0]] * 95 + [[255, 255, 255]] * 5)) == pytest.approx(21.0)


def test_busyness_is_zero_when_flat_low_for_a_gradient_and_high_for_noise_and_stripes():
    box = (0, 0, 256, 256)
    flat, gradient, striped, noisy = (busyness(image, box) for image in (plain((90, 160, 30)), painted(), stripes(),
                                                                         noise()))
    assert flat == 0.0
    assert gradient < 0.2  # the grain
    assert striped > 0.5 and noisy > 0.5


# ----------------------------------------------------------------------------------------------------------------------
# Breaking and wrapping


def test_cjk_breaks_between_characters_and_latin_between_words():
    assert break_units("五一劳动节，促销！") == ["五", "一", "劳", "动", "节，", "促", "销！"]
    assert break_units("Labour Day Sale, 50% off") == ["Labour ", "Day ", "Sale, ", "50% ", "off"]
    assert break_units("《五一》特惠 Big Sale") == ["《五", "一》", "特", "惠 ", "Big ", "Sale"]
    by_count = len  # one unit of width per character
    assert wrap("Labour Day Sale", by_count, 10) == ["Labour", "Day Sale"]  # never inside a word
    assert wrap("五一劳动节促销", by_count, 5) == ["五一劳动", "节促销"]  # balanced: 4 + 3, not 5 + 2
    assert wrap("Supercalifragilistic", by_count, 8) == ["Superca", "lifragi", "listic"]  # a word wider than a line


def test_a_line_too_long_for_the_region_wraps_and_shrinks():
    short = make_layout(plain("white"), [("title", "五一促销")])
    long_title = "五一劳动节全场商品大促销活动火热进行中"
    long = make_layout(plain("white"), [("title", long_title)])
    assert len(block_text(short, 0)) == 1 and len(block_text(long, 0)) == 2
    assert "".join(block_text(long, 0)) == long_title
    assert long.lines[0].font_size < short.lines[0].font_size
    assert_well_placed(long)

    sentence = "Spring Festival Grand Opening Sale with surprises in every single aisle of the store"
    latin = make_layout(plain("white"), [("title", "Sale"), ("body", sentence)])
    rows = block_text(latin, 1)
    assert len(rows) >= 2 and " ".join(rows) == sentence  # broken at spaces only
    assert_well_placed(latin)


def test_text_that_cannot_fit_is_one_line():
    with pytest.raises(UserError, match="does not fit") as err:
        make_layout(Image.new("RGB", (128, 128), "white"), [("body", "很长的文字" * 60)])
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------------------
# Layout


def test_horizontal_lines_are_stacked_in_reading_order_title_largest():
    layout = make_layout(plain((245, 240, 225)), CHINESE)
    assert layout.orientation == "horizontal" and layout.region == "top"
    assert_well_placed(layout)
    assert [line.block for line in layout.lines] == sorted(line.block for line in layout.lines)
    tops = [line.box[1] for line in layout.lines]
    assert tops == sorted(tops)
    sizes = {line.role: line.font_size for line in layout.lines}
    assert sizes["title"] > sizes["subtitle"] > sizes["body"] >= poster_layout.MIN_FONT_SIZE
    assert all(not line.vertical for line in layout.lines)


def test_vertical_lines_are_columns_right_to_left():
    layout = make_layout(plain((245, 240, 225)), CHINESE, orientation="vertical")
    assert layout.region == "right"
    assert_well_placed(layout)
    lefts = [line.box[0] for line in layout.lines]
    assert lefts == sorted(lefts, reverse=True)  # the title is the rightmost column
    for line in layout.lines:
        assert line.vertical
        x0, y0, x1, y1 = line.box
        assert y1 - y0 > 3 * (x1 - x0)  # a column, characters one below the other
        assert x1 - x0 <= line.font_size * 1.2
    cells = layout.lines[0].cells()
    assert len(cells) == len(layout.lines[0].text)
    assert [c[1] for c in cells] == sorted(c[1] for c in cells)


@pytest.mark.parametrize("name", sorted(BACKGROUNDS))
@pytest.mark.parametrize("orientation", ["horizontal", "vertical"])
def test_every_line_reaches_4_5_to_1_or_records_an_outline_that_does(name, orientation):
    background = BACKGROUNDS[name]()
    layout = make_layout(background, CHINESE, orientation=orientation)
    assert_well_placed(layout)
    pixels = np.asarray(background)
    for line in layout.lines:
        x0, y0, x1, y1 = line.box
        under = pixels[y0:y1, x0:x1]
        if line.outline is None:
            assert line.contrast >= MIN_CONTRAST
            assert contrast_over(line.fill, under) >= MIN_CONTRAST
        else:
            # below 4.5, or close enough above that the review's own measurement might not agree
            assert line.contrast < MIN_CONTRAST * poster_layout.CONTRAST_SAFETY and line.outline_width >= 2
            assert contrast_ratio(line.fill, line.outline) >= MIN_CONTRAST
    outlined = [line.outline is not None for line in layout.lines]
    if name in ("light", "dark", "half-busy"):
        assert not any(outlined)  # the text is on a plain colour
    if name in ("noise", "stripes"):
        assert all(outlined)  # no single colour stands out from every pixel


def test_the_palette_is_tried_first():
    red = (200, 30, 30)
    layout = make_layout(plain((250, 250, 250)), CHINESE, palette=[red])
    assert all(line.fill == red for line in layout.lines)  # 5.4:1 on near-white
    dark = make_layout(plain((20, 20, 20)), CHINESE, palette=[red])
    assert all(line.fill != red for line in dark.lines)  # 3.6:1 on near-black: not enough


def test_auto_region_keeps_off_the_busy_half():
    horizontal = make_layout(half_busy("top"), CHINESE)
    assert horizontal.region == "bottom"
    assert all(line.box[1] >= H // 2 for line in horizontal.lines)
    vertical = make_layout(half_busy("right"), CHINESE, orientation="vertical")
    assert vertical.region == "left"
    assert all(line.box[2] <= W // 2 for line in vertical.lines)
    assert make_layout(half_busy("top"), CHINESE, region="top").region == "top"  # the plan's region when it names one


def test_each_attempt_changes_what_its_docstring_says():
    background = painted()
    base = make_layout(background, CHINESE)
    smaller = make_layout(background, CHINESE, attempt=1)
    moved = make_layout(background, CHINESE, attempt=2)
    outlined = make_layout(background, CHINESE, attempt=3)
    plated = make_layout(background, CHINESE, attempt=4)
    assert smaller.region == base.region and smaller.lines[0].font_size < base.lines[0].font_size
    assert moved.region != base.region
    assert outlined.region == base.region and all(line.outline and line.shadow for line in outlined.lines)
    assert all(line.outline_width > 2 * poster_layout.base_outline_width(line.font_size) - 1 for line in outlined.lines)
    assert all(line.plate and not line.shadow for line in plated.lines)
    for layout in (smaller, moved, outlined, plated):
        assert_well_placed(layout)
        assert layout.attempt in (1, 2, 3, 4)


def test_same_inputs_same_layout():
    background = half_busy("top")
    assert make_layout(background, ENGLISH).to_json() == make_layout(background.copy(), ENGLISH).to_json()


def test_bad_arguments_are_one_line():
    for kwargs, pattern in (({"orientation": "diagonal"}, "orientation 'diagonal'"), ({"region": "middle"}, "region"),
                            ({"attempt": -1}, "attempt")):
        with pytest.raises(UserError, match=pattern):
            make_layout(plain("white"), CHINESE, **kwargs)
    with pytest.raises(UserError, match="role 'footer'"):
        make_layout(plain("white"), [("footer", "x")])
    with pytest.raises(UserError, match="empty text"):
        make_layout(plain("white"), [("title", "  ")])


# ----------------------------------------------------------------------------------------------------------------------
# layout.json


def test_layout_json_round_trip(tmp_path):
    layout = make_layout(noise(), CHINESE, orientation="vertical", attempt=3)
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout.to_json(), ensure_ascii=False))
    again = Layout.from_json(json.loads(path.read_text()), where=str(path))
    assert again == layout
    assert np.array_equal(np.asarray(render_poster(noise(), again)), np.asarray(render_poster(noise(), layout)))


@pytest.mark.parametrize("change, field", [
    (lambda d: d.pop("width"), "width: missing"),
    (lambda d: d.update(orientation="diagonal"), "orientation: 'diagonal' is not one of"),
    (lambda d: d["lines"][1].update(box=[10, 10, 5]), r"lines\[1\]\.box: expected \[x0, y0, x1, y1\]"),
    (lambda d: d["lines"][0].update(fill=[0, 0, 300]), r"lines\[0\]\.fill: expected \[r, g, b\]"),
    (lambda d: d["lines"][2].update(font_size="big"), r"lines\[2\]\.font_size: expected an integer"),
    (lambda d: d["lines"][0].update(role="footer"), r"lines\[0\]\.role: 'footer'"),
    (lambda d: d.update(lines={}), "lines: expected a list"),
])
def test_a_bad_layout_json_field_is_one_line_naming_file_and_field(change, field):
    data = make_layout(plain("white"), CHINESE).to_json()
    change(data)
    with pytest.raises(UserError, match=f"^runs/x/layout.json: {field}") as err:
        Layout.from_json(data, where="runs/x/layout.json")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------------------
# Review


def test_matching_normalises_joins_pieces_and_allows_one_error_in_ten():
    assert normalise("满300减50，会员 再享！") == "满300减50会员再享"
    assert normalise("ＳＡＬＥ　Sale.") == "salesale"
    assert best_match("五一劳动节促销", ["节促销", "五一劳动", "全场商品"]) == ("五一劳动节促销", 1.0)
    assert best_match("Labour Day Sale", ["Labour Dav Sale"])[1] == pytest.approx(12 / 13, abs=1e-4)
    assert best_match("五一劳动节促销", ["五一"])[1] < 0.8
    assert best_match("五一劳动节促销", [])[1] == 0.0


class FakeReader:
    """Reads back exactly what it is told: for tests of the geometric checks."""

    def __init__(self, texts):
        self.texts = texts

    def read_page(self, image):
        return [Reading(text=t, box=(0, 0, 1, 1), score=1.0) for t in self.texts]

    def read_line(self, image):
        return ""


def test_overlapping_boxes_fail_the_overlap_check():
    background = plain("white")
    layout = make_layout(background, CHINESE)
    second = layout.lines[1]
    layout.lines[1] = dataclasses.replace(second, box=(second.box[0], layout.lines[0].box[1] + 5,
                                                       second.box[2], layout.lines[0].box[1] + 5 + second.box[3]
                                                       - second.box[1]))
    review = review_poster(render_poster(background, layout), layout, [t for _, t in CHINESE],
                           ocr=FakeReader([t for _, t in CHINESE]))
    assert review.failed() == ["overlap"]
    assert review.checks["overlap"]["detail"][0]["lines"] == [0, 1]


@pytest.mark.parametrize("blocks, orientation, name", [
    (CHINESE, "horizontal", "painted"), (ENGLISH, "horizontal", "painted"), (CHINESE, "vertical", "painted"),
    (CHINESE, "horizontal", "noise"), (ENGLISH, "horizontal", "dark")])
def test_ocr_reads_back_every_line(blocks, orientation, name, tmp_path):
    background = BACKGROUNDS[name]()
    layout = make_layout(background, blocks, orientation=orientation)
    review = review_poster(render_poster(background, layout), layout, [t for _, t in blocks])
    assert review.passed, review.to_json()
    assert all(d["similarity"] >= 0.8 for d in review.checks["lines"]["detail"])
    write_review(review, tmp_path / "review.json")
    assert json.loads((tmp_path / "review.json").read_text()) == review.to_json()


def test_a_line_pushed_off_the_canvas_fails_inside_and_lines():
    background = painted()
    layout = make_layout(background, CHINESE)
    body = layout.lines[-1]
    layout.lines[-1] = dataclasses.replace(body, box=(body.box[0] + W, body.box[1], body.box[2] + W, body.box[3]))
    review = review_poster(render_poster(background, layout), layout, [t for _, t in CHINESE])
    assert not review.passed
    assert not review.checks["inside"]["passed"] and not review.checks["lines"]["passed"]
    assert review.checks["overlap"]["passed"]
    assert [d["line"] for d in review.checks["inside"]["detail"]] == [len(layout.lines) - 1]
    assert [d["passed"] for d in review.checks["lines"]["detail"]] == [True, True, False]


def test_white_text_on_white_without_outline_fails_contrast_and_lines():
    background = plain("white")
    layout = make_layout(background, CHINESE)
    layout.lines[0] = dataclasses.replace(layout.lines[0], fill=(255, 255, 255), outline=None, outline_width=0)
    review = review_poster(render_poster(background, layout), layout, [t for _, t in CHINESE])
    assert sorted(review.failed()) == ["contrast", "lines"]
    assert [d["passed"] for d in review.checks["contrast"]["detail"]][0] is False
    assert review.checks["contrast"]["detail"][0]["measured"] == pytest.approx(1.0)
    assert review.checks["lines"]["detail"][0]["passed"] is False


@pytest.mark.parametrize("attempt", [1, 2, 3, 4])
def test_every_retry_attempt_passes_the_review(attempt):
    background = half_busy("top")
    layout = make_layout(background, CHINESE, orientation="vertical", attempt=attempt)
    review = review_poster(render_poster(background, layout), layout, [t for _, t in CHINESE])
    assert review.passed, review.to_json()


def test_vertical_columns_the_page_reading_misses_are_read_as_rows_of_cells():
    """The fallback alone: a reader whose page reading finds nothing, whose line reading is RapidOCR's."""

    class BlindPage:
        def read_page(self, image):
            return []

        def read_line(self, image):
            return default_reader().read_line(image)

    background = painted()
    layout = make_layout(background, CHINESE, orientation="vertical")
    review = review_poster(render_poster(background, layout), layout, CHINESE, ocr=BlindPage())
    assert [d["how"] for d in review.checks["lines"]["detail"]] == ["columns"] * 3
    assert review.checks["lines"]["passed"], review.checks["lines"]


def test_two_threads_share_one_reader_and_read_alike():
    background = painted()
    layout = make_layout(background, ENGLISH)
    poster = render_poster(background, layout)
    alone = review_poster(poster, layout, ENGLISH).to_json()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: review_poster(poster, layout, ENGLISH).to_json(), range(2)))
    assert results == [alone, alone]
    assert default_reader() is default_reader()
