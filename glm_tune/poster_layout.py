"""The poster's text: where each line goes, in which size and colour, and the poster drawn (APP_example/auto_poster).

    background, blocks --> region --------> font size ----------> lines ---------------> colours ------> Layout
    (painted image, its    the least busy   the largest title at  wrapped (CJK at any    each line's, by  (layout.json),
    size the canvas;       candidate, or    which every block     character, Latin at    contrast with    render_poster
    (role, text) pairs)    the plan's       fits the region       spaces), rows/columns  what is under it draws it

Orientation. Horizontal: lines stacked top to bottom, each centred in the region. Vertical: each line a column of
upright characters read top to bottom, columns right to left (traditional Chinese setting), the title rightmost;
punctuation takes its vertical presentation form (，→︐) so that it sits in its cell as in printed vertical text.

Regions are parts of the canvas inside the margin: top and bottom (its whole width, 40% of its height), left and right
(half its width, its whole height) and center (80% of the width x 40% of the height; for columns 40% x 80%). "auto" takes the least busy of them (busyness below: edges
plus spread of luminance); among regions within AUTO_TOLERANCE of the least busy one the orientation's usual place
wins (horizontal: top, bottom, center, left, right; vertical: right, left, center, top, bottom), so that a plain
background gets a conventional poster and a busy one keeps its text off the busy part.

Sizes. The title's size is the largest (at most TITLE_SHARE of the canvas's shorter side) at which every block fits;
a subtitle is ROLE_SCALE x that, body text likewise, none below MIN_FONT_SIZE (smaller text OCR loses, and so do
readers). A block wraps when it is wider than the region (balanced: "五一劳动节促销" in two lines is 4 + 3 characters, not
6 + 1); while a size exists at which no block wraps past ROLE_MAX_LINES (a title in at most two lines) that size is
taken, else the largest size that fits at all. Text that does not fit even at MIN_FONT_SIZE is a UserError.

Colour. Each line's fill is the first of: the caller's palette (the plan's mood), a dark and a light tint of the
region's own colour, black, white; that reaches MIN_CONTRAST (WCAG 2.x AA for text, with a 10% safety margin: see
CONTRAST_SAFETY) against the pixels under its box.
Under a box of many colours "the" contrast is the CONTRAST_PERCENTILE-th percentile of the per-pixel ratios: 90% of
the pixels under the text contrast with it at least that much. When no fill reaches it (noise, stripes, a half-dark
half-light box), the best fill gets an outline in black or white, whichever stands out from it more, and the line
records it (its legibility is then fill against outline). Space for an outline is kept around every line, so adding
one never makes lines touch.

Retries (attempt >= 1, after a review failed):
    0   as above
    1   every size x SMALLER_SCALE: the text takes less of its region, with more space round it
    2   the next least busy region other than the one attempt 0 used (the plan's region is given up)
    3   attempt 0's region and sizes, and every line outlined, twice the usual width, with a drop shadow in the
        outline colour
    4+  each block on a plate (a rectangle in the outline colour, a quarter em round its lines' ink) instead of the
        shadow: legible on any background, fine stripes included (where OCR loses even outlined text)

Fonts: Noto Sans CJK from PyPI (package noto-cjk-sans-otc, via `noto-cjk[sans]`), its Simplified Chinese face, which
has Latin letters and digits too; no font is looked up on the system or downloaded. PyPI has that collection in the
Regular weight only (noto-cjk's per-language SC OTFs are not published), so a bold title is the Regular face
emboldened by a stroke in its own colour. Lines are shaped by Pillow's basic layout (FreeType, no raqm), which is the
same on every machine: the same layout draws the same pixels.
"""

import functools
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from glm_tune.errors import UserError, warn

ROLES = ("title", "subtitle", "body")
ORIENTATIONS = ("horizontal", "vertical")
REGIONS = ("auto", "top", "bottom", "left", "right", "center")
MIN_CONTRAST = 4.5  # WCAG 2.x AA for normal-size text

ROLE_SCALE = {"title": 1.0, "subtitle": 0.6, "body": 0.45}
ROLE_MAX_LINES = {"title": 2, "subtitle": 2, "body": 3}
BOLD_ROLES = ("title",)
MIN_FONT_SIZE = 16  # PP-OCR reads lines from ~12 px up; 16 leaves room for a busy background and an outline
TITLE_SHARE = 0.13  # a title at most 13% of the shorter side: 100 px on a 768 x 1024 poster
MARGIN_SHARE = 0.05
SMALLER_SCALE = 0.85
ONE_LINE_TITLE_SHARE = 0.75
AUTO_TOLERANCE = 0.02  # busyness is 0 (flat) to ~1 (noise); regions this close count as equally quiet
AUTO_ORDER = {"horizontal": ("top", "bottom", "center", "left", "right"),
              "vertical": ("right", "left", "center", "top", "bottom")}
CONTRAST_PERCENTILE = 10
# A fill is taken without an outline only from MIN_CONTRAST x this: the review measures again on the poster, round
# the glyphs rather than under the whole box, and a fill chosen at 4.6 can measure 4.4 there.
CONTRAST_SAFETY = 1.1
FONT_HINT = "pip install 'noto-cjk[sans]' (APP_example/requirements.txt; bash setup.sh installs it)"
SC_FACE = "Noto Sans CJK SC"
# Noto CJK's ideographic em box spans 0.88 em above the baseline and 0.12 em below: a baseline 0.88 em under a
# vertical cell's top centres the character in its cell.
EM_BOX_TOP = 0.88
VERTICAL_FORMS = dict(zip("，、。：；！？（）【】《》〈〉「」『』〔〕…—", "︐︑︒︓︔︕︖︵︶︻︼︽︾︿﹀﹁﹂﹃﹄︹︺︙︱"))
CLOSING = set("，。、！？；：）》〉」』】〕…,.!?;:)]}%”’")  # never starts a line
OPENING = set("（《〈「『【〔([{“‘")  # never ends one


# ----------------------------------------------------------------------------------------------------------------------
# Fonts


def cjk_font(bold=False):
    """The Noto Sans CJK font file (a .ttc; its Simplified Chinese face is font_face_index(path)). `bold` gives the
    same file: PyPI has no bold Simplified Chinese face, and render_poster emboldens a bold line instead. Missing is
    a one-line UserError saying how to install it."""
    del bold  # one file for both weights, see above
    try:
        from noto_cjk import FontNotInstalled, otc_path
    except ImportError:
        raise UserError(f"the CJK font package is not installed: {FONT_HINT}") from None
    try:
        return Path(otc_path("sans"))
    except FontNotInstalled:
        raise UserError(f"the Noto Sans CJK font is not installed: {FONT_HINT}") from None


@functools.cache
def font_face_index(path):
    """The index of the Simplified Chinese face in a font collection (0 for a single font): a .ttc's first face is the
    Japanese one, whose forms of some shared characters (直, 骨, 写) differ."""
    for index in range(32):
        try:
            name = ImageFont.truetype(str(path), 10, index=index).getname()[0]
        except OSError:
            break
        if name == SC_FACE:
            return index
    return 0


@functools.cache
def load_font(path, size, index=0):
    """The font at `size` px, shaped by Pillow's basic layout (deterministic everywhere; see the module's docstring).
    A missing or unreadable file is a one-line UserError."""
    try:
        return ImageFont.truetype(str(path), size, index=index, layout_engine=ImageFont.Layout.BASIC)
    except OSError as err:
        raise UserError(f"font {path}: cannot be read ({err}); install the CJK font: {FONT_HINT}") from None


@functools.cache
def has_glyph(ch, font_file, index=0):
    """Whether the font draws `ch` as itself rather than as its .notdef box (what Pillow draws for a character the
    font lacks: an emoji, say)."""
    font = load_font(font_file, 20, index)
    mask, notdef = font.getmask2(ch, mode="L"), font.getmask2(chr(0x10FFFD), mode="L")  # a private-use code point
    return mask[0].size != notdef[0].size or bytes(mask[0]) != bytes(notdef[0])


def _drop_missing_glyphs(blocks, font_file, index):
    """The blocks without the characters the font lacks, each dropped with a one-line warning: a box in their place
    would read as nothing, to OCR and to people."""
    kept = []
    for number, (role, text) in enumerate(blocks):
        missing = sorted({ch for ch in text if not ch.isspace() and not has_glyph(ch, font_file, index)})
        if missing:
            warn(f"text block {number + 1} ({role}): the font has no {' '.join(missing)}; left out")
            text = " ".join("".join(ch for ch in text if ch not in missing).split())
            if not text:
                raise UserError(f"text block {number + 1} ({role}): nothing left that the font can draw")
        kept.append((role, text))
    return kept


def _line_font(line):
    return load_font(_font_file(line.font_path), line.font_size, line.font_index)


def _font_file(path):
    """`path` if it is there, else this machine's Noto Sans CJK when the file has its name (a layout.json written
    with another Python environment)."""
    if Path(path).is_file():
        return str(path)
    installed = cjk_font()
    if installed.name == Path(path).name:
        return str(installed)
    raise UserError(f"font {path}: no such file; install the CJK font: {FONT_HINT}")


# ----------------------------------------------------------------------------------------------------------------------
# Colour


def _linear(channel):
    channel = np.asarray(channel, dtype=np.float64) / 255.0
    return np.where(channel <= 0.04045, channel / 12.92, ((channel + 0.055) / 1.055) ** 2.4)


def relative_luminance(rgb):
    """WCAG 2.x relative luminance of an (r, g, b) in 0-255, or of an (..., 3) array of them."""
    lin = _linear(rgb)
    return lin[..., 0] * 0.2126 + lin[..., 1] * 0.7152 + lin[..., 2] * 0.0722


def contrast_ratio(rgb1, rgb2):
    """WCAG 2.x contrast ratio of two colours: 1 (same luminance) to 21 (black on white)."""
    l1, l2 = float(relative_luminance(rgb1)), float(relative_luminance(rgb2))
    return (max(l1, l2) + 0.05) / (min(l1, l2) + 0.05)


def contrast_over(fill, pixels):
    """The contrast of `fill` with an (n, 3) array of pixels: the CONTRAST_PERCENTILE-th percentile of the per-pixel
    ratios (90% of the pixels contrast at least this much)."""
    pixels = np.asarray(pixels).reshape(-1, 3)
    if not len(pixels):
        return 21.0
    lum, lf = relative_luminance(pixels), float(relative_luminance(fill))
    ratios = (np.maximum(lum, lf) + 0.05) / (np.minimum(lum, lf) + 0.05)
    return round(float(np.percentile(ratios, CONTRAST_PERCENTILE)), 3)


def halo_colour(fill):
    """Black or white, whichever stands out more from `fill`: the colour of an outline and of a shadow."""
    return (0, 0, 0) if contrast_ratio(fill, (0, 0, 0)) >= contrast_ratio(fill, (255, 255, 255)) else (255, 255, 255)


def _fill_candidates(region_pixels, palette):
    mean = np.asarray(region_pixels).reshape(-1, 3).mean(axis=0)
    dark = tuple(int(round(c * 0.25)) for c in mean)
    light = tuple(int(round(c + (255 - c) * 0.85)) for c in mean)
    seen, out = set(), []
    for colour in [*(palette or ()), dark, light, (0, 0, 0), (255, 255, 255)]:
        if colour not in seen:
            seen.add(colour)
            out.append(colour)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Busyness and regions


def _grey(image):
    return np.asarray(image.convert("L"), dtype=np.float64)


def busyness(image, box):
    """How busy `image` is inside `box` (x0, y0, x1, y1), 0 (flat) to about 1 (random noise): the mean absolute
    luminance step between neighbouring pixels (edges, texture: what glyphs get lost in) plus the standard deviation of
    luminance (light and dark areas that no single text colour contrasts with), both over 255."""
    return _busyness(_grey(image), box)


def _busyness(grey, box):
    x0, y0, x1, y1 = box
    patch = grey[y0:y1, x0:x1]
    if patch.size == 0:
        return 0.0
    steps = 0.0
    if patch.shape[1] > 1:
        steps += float(np.abs(np.diff(patch, axis=1)).mean())
    if patch.shape[0] > 1:
        steps += float(np.abs(np.diff(patch, axis=0)).mean())
    return round((steps + float(patch.std())) / 255.0, 4)


def default_margin(width, height):
    """The blank border kept round the text: MARGIN_SHARE of the shorter side (38 px on 768 x 1024)."""
    return max(4, round(MARGIN_SHARE * min(width, height)))


def region_box(region, width, height, margin, orientation="horizontal"):
    """The (x0, y0, x1, y1) of a named region inside the margin (see the module's docstring)."""
    x0, y0, x1, y1 = margin, margin, width - margin, height - margin
    w, h = x1 - x0, y1 - y0
    across, down = (0.8, 0.4) if orientation == "horizontal" else (0.4, 0.8)  # the centre is shaped for its lines
    return {"top": (x0, y0, x1, y0 + round(0.4 * h)),
            "bottom": (x0, y1 - round(0.4 * h), x1, y1),
            "left": (x0, y0, x0 + w // 2, y1),
            "right": (x1 - w // 2, y0, x1, y1),
            "center": (x0 + round((1 - across) / 2 * w), y0 + round((1 - down) / 2 * h),
                       x1 - round((1 - across) / 2 * w), y1 - round((1 - down) / 2 * h))}[region]


def rank_regions(background, orientation, margin):
    """The regions, quietest first: by busyness, regions within AUTO_TOLERANCE of each other in the orientation's usual
    order. Region 0 is what "auto" takes."""
    grey = _grey(background)
    width, height = background.size
    order = AUTO_ORDER[orientation]
    scores = {name: _busyness(grey, region_box(name, width, height, margin, orientation)) for name in order}
    ranked, left = [], list(order)
    while left:
        quietest = min(scores[name] for name in left)
        pick = next(name for name in left if scores[name] <= quietest + AUTO_TOLERANCE)
        ranked.append(pick)
        left.remove(pick)
    return ranked


# ----------------------------------------------------------------------------------------------------------------------
# Lines: breaking, shaping, ink


def _wide(ch):
    return unicodedata.east_asian_width(ch) in ("W", "F")


def break_units(text):
    """The pieces a line may break between: each CJK character, each Latin word with the spaces after it; closing
    punctuation stays with the piece before it and opening punctuation with the one after ("，" never starts a line,
    "《" never ends one)."""
    units, pending = [], ""
    for ch in text:
        if ch.isspace():
            if units and not units[-1].endswith(" "):
                units[-1] += " "
        elif ch in OPENING:
            pending += ch
        elif ch in CLOSING and units and not pending and not units[-1].endswith(" "):
            units[-1] += ch
        elif (not _wide(ch) and not pending and units and not units[-1].endswith(" ")
              and not _wide(units[-1][-1]) and units[-1][-1] not in CLOSING):
            units[-1] += ch  # a Latin word goes on
        else:
            units.append(pending + ch)
            pending = ""
    if pending:
        units.append(pending)
    return units


def _greedy(units, fits):
    lines, current = [], ""
    queue = list(units)
    while queue:
        unit = queue.pop(0)
        trial = current + unit
        if fits(trial.rstrip()):
            current = trial
        elif current:
            lines.append(current.rstrip())
            queue.insert(0, unit)
            current = ""
        elif len(unit.rstrip()) > 1:
            queue[:0] = list(unit.rstrip())  # one word wider than the line: it breaks between its letters
        else:
            current = trial  # one character wider than the line: placement finds it does not fit
    if current.strip():
        lines.append(current.rstrip())
    return lines


def wrap(text, measure, limit):
    """`text` in lines of measure(line) <= limit, as even as the fewest lines allow: the greedy break decides how many
    lines, then the narrowest limit that still gives that many decides where."""
    units = break_units(text.strip())
    lines = _greedy(units, lambda t: measure(t) <= limit)
    if len(lines) <= 1:
        return lines
    low, high = 1, limit
    while low < high:
        mid = (low + high) // 2
        if len(_greedy(units, lambda t: measure(t) <= mid)) <= len(lines):
            high = mid
        else:
            low = mid + 1
    return _greedy(units, lambda t: measure(t) <= high)


def _pieces(text, size, vertical):
    """What draws a line, relative to its pen position: [(text, (dx, dy), anchor)]. Horizontal: the line on its
    baseline. Vertical: one character per square cell of `size`, centred on the column's axis."""
    if not vertical:
        return [(text, (0, 0), "ls")]
    top = round(EM_BOX_TOP * size)
    characters = [ch for ch in text if not ch.isspace()]  # a space between columns' words takes no cell
    return [(VERTICAL_FORMS.get(ch, ch), (0, i * size + top), "ms") for i, ch in enumerate(characters)]


@functools.lru_cache(maxsize=8192)  # a layout measures a few hundred (line, size) pairs; a server makes many layouts
def _ink(text, font_file, index, size, vertical, stroke, shadow):
    """The bounding box of a line's ink relative to its pen position: every glyph pixel drawn, outline (stroke) and
    shadow (offset `shadow` px right and down) included."""
    font = load_font(font_file, size, index)
    box = None
    for piece, (dx, dy), anchor in _pieces(text, size, vertical):
        mask, (ox, oy) = font.getmask2(piece, mode="L", anchor=anchor, stroke_width=stroke)
        bbox = mask.getbbox()
        if bbox is None:
            continue
        part = (dx + ox + bbox[0], dy + oy + bbox[1], dx + ox + bbox[2], dy + oy + bbox[3])
        if shadow:
            part = (part[0], part[1], part[2] + shadow, part[3] + shadow)
        box = part if box is None else (min(box[0], part[0]), min(box[1], part[1]),
                                        max(box[2], part[2]), max(box[3], part[3]))
    return box or (0, 0, 0, 0)


def bold_width(size):
    """The stroke that emboldens a bold line: 1/40 em (2-3 px at a title's size)."""
    return max(1, round(size / 40))


def base_outline_width(size):
    """An outline's width at attempts 0-2: 1/16 em, at least 2 px."""
    return max(2, round(size / 16))


def shadow_offset(size):
    """How far a shadow lies right of and below its line: 1/20 em, at least 1 px."""
    return max(1, round(size / 20))


def _halo(size, attempt):
    """(outline width, shadow offset) a line of `size` may get at `attempt`: what placement keeps room for."""
    if attempt >= 4:
        return max(2 * base_outline_width(size), round(size / 4)), 0  # the plate's padding: a quarter em
    if attempt == 3:
        return 2 * base_outline_width(size), shadow_offset(size)
    return base_outline_width(size), 0


# ----------------------------------------------------------------------------------------------------------------------
# The layout


@dataclass
class PlacedLine:
    """One drawn line (a row, or a column when vertical). `box` is its ink on the canvas, outline and shadow included
    (with `plate`, its block's plate covers the box: see plates()); `contrast` is its fill against the
    background under its text (before any outline); a wrapped block is several lines with the same `block` (its
    index in the blocks given to make_layout)."""

    role: str
    text: str
    box: tuple
    font_path: str
    font_size: int
    vertical: bool
    fill: tuple
    outline: tuple | None
    outline_width: int
    shadow: bool
    contrast: float
    block: int = 0
    font_index: int = 0
    bold: bool = False
    plate: bool = False

    def stroke(self):
        """The stroke drawn round the glyphs: emboldening plus outline."""
        return (bold_width(self.font_size) if self.bold else 0) + (self.outline_width if self.outline else 0)

    def halo(self):
        """The colour of the outline and shadow: the recorded outline, else black or white against the fill."""
        return tuple(self.outline) if self.outline else halo_colour(self.fill)

    def pen(self):
        """The pen position that puts this line's ink exactly on `box` (moving `box` moves the text)."""
        ink = _ink(self.text, _font_file(self.font_path), self.font_index, self.font_size, self.vertical,
                   self.stroke(), shadow_offset(self.font_size) if self.shadow else 0)
        return self.box[0] - ink[0], self.box[1] - ink[1]

    def cells(self):
        """A vertical line's character cells on the canvas, one (x0, y0, x1, y1) per non-space character."""
        x, y = self.pen()
        half = self.font_size // 2
        return [(x - half, y + dy - round(EM_BOX_TOP * self.font_size), x - half + self.font_size,
                 y + dy - round(EM_BOX_TOP * self.font_size) + self.font_size)
                for _, (_, dy), _ in _pieces(self.text, self.font_size, True)]


@dataclass
class Layout:
    """Where every line goes on a width x height canvas. `region` is the region used ("auto" resolved), `attempt` the
    retry it was made for (see the module's docstring)."""

    width: int
    height: int
    orientation: str
    region: str
    lines: list = field(default_factory=list)
    attempt: int = 0
    margin: int = 0

    def to_json(self):
        data = asdict(self)
        for line in data["lines"]:
            line["box"] = list(line["box"])
            line["fill"] = list(line["fill"])
            line["outline"] = list(line["outline"]) if line["outline"] else None
        return data

    @classmethod
    def from_json(cls, data, where="layout.json"):
        """A Layout from to_json's dict; a missing or ill-typed field is a one-line UserError naming `where` and the
        field."""
        check = _Checker(where)
        data = check.mapping(data, "")
        width, height = check.integer(data, "width", 1), check.integer(data, "height", 1)
        layout = cls(width=width, height=height, orientation=check.choice(data, "orientation", ORIENTATIONS),
                     region=check.choice(data, "region", REGIONS[1:]), attempt=check.integer(data, "attempt", 0),
                     margin=check.integer(data, "margin", 0, default=default_margin(width, height)))
        rows = data.get("lines")
        if not isinstance(rows, list):
            raise UserError(f"{where}: lines: expected a list of lines")
        for i, row in enumerate(rows):
            row = check.mapping(row, f"lines[{i}]")
            name = f"lines[{i}]."
            outline = row.get("outline")
            layout.lines.append(PlacedLine(
                role=check.choice(row, "role", ROLES, name), text=check.text(row, "text", name),
                box=check.box(row, "box", name), font_path=check.text(row, "font_path", name),
                font_size=check.integer(row, "font_size", 1, prefix=name),
                vertical=check.boolean(row, "vertical", name), fill=check.colour(row, "fill", name),
                outline=None if outline is None else check.colour(row, "outline", name),
                outline_width=check.integer(row, "outline_width", 0, prefix=name),
                shadow=check.boolean(row, "shadow", name), contrast=check.number(row, "contrast", name),
                block=check.integer(row, "block", 0, prefix=name, default=0),
                font_index=check.integer(row, "font_index", 0, prefix=name, default=0),
                bold=check.boolean(row, "bold", name, default=False),
                plate=check.boolean(row, "plate", name, default=False)))
        return layout


class _Checker:
    """Field readers for from_json: each returns the value or raises a one-line UserError `where: field: problem`."""

    def __init__(self, where):
        self.where = where

    def fail(self, field_name, problem):
        raise UserError(f"{self.where}: {field_name}: {problem}")

    def mapping(self, value, name):
        if not isinstance(value, dict):
            self.fail(name or "top level", "expected an object")
        return value

    def _get(self, data, key, prefix, default):
        if key not in data:
            if default is not None:
                return default
            self.fail(prefix + key, "missing")
        return data[key]

    def integer(self, data, key, minimum, prefix="", default=None):
        value = self._get(data, key, prefix, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(prefix + key, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def number(self, data, key, prefix=""):
        value = self._get(data, key, prefix, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(prefix + key, f"expected a number, got {value!r}")
        return float(value)

    def boolean(self, data, key, prefix="", default=None):
        value = self._get(data, key, prefix, default)
        if not isinstance(value, bool):
            self.fail(prefix + key, f"expected true or false, got {value!r}")
        return value

    def text(self, data, key, prefix=""):
        value = self._get(data, key, prefix, None)
        if not isinstance(value, str) or not value.strip():
            self.fail(prefix + key, f"expected a non-empty string, got {value!r}")
        return value

    def choice(self, data, key, choices, prefix=""):
        value = self._get(data, key, prefix, None)
        if value not in choices:
            self.fail(prefix + key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def box(self, data, key, prefix=""):
        value = self._get(data, key, prefix, None)
        if (not isinstance(value, list) or len(value) != 4 or any(isinstance(v, bool) or not isinstance(v, int)
                                                                  for v in value)
                or value[2] < value[0] or value[3] < value[1]):
            self.fail(prefix + key, f"expected [x0, y0, x1, y1], integers with x0 <= x1 and y0 <= y1, got {value!r}")
        return tuple(value)

    def colour(self, data, key, prefix=""):
        value = self._get(data, key, prefix, None)
        if (not isinstance(value, list) or len(value) != 3
                or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255 for v in value)):
            self.fail(prefix + key, f"expected [r, g, b], integers 0-255, got {value!r}")
        return tuple(value)


def _check_blocks(blocks):
    checked = []
    for i, block in enumerate(blocks):
        if not isinstance(block, (tuple, list)) or len(block) != 2:
            raise UserError(f"text block {i + 1}: expected (role, text), got {block!r}")
        role, text = block
        if role not in ROLES:
            raise UserError(f"text block {i + 1}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"text block {i + 1} ({role}): empty text")
        checked.append((role, " ".join(text.split())))
    if not checked:
        raise UserError("no text to lay out: the plan has no lines")
    return checked


def _check_colour(colour, name):
    try:
        rgb = tuple(int(c) for c in colour)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise UserError(f"{name}: expected (r, g, b), integers 0-255, got {colour!r}")
    return rgb


def _sizes(blocks, title_size):
    return [max(MIN_FONT_SIZE, round(title_size * ROLE_SCALE[role])) for role, _ in blocks]


def _arrange(blocks, title_size, region, box, orientation, attempt, font_file, index, limits):
    """The lines at this title size in `region` (its `box`): [(block, role, text, size, pen)], or None when they do
    not fit (`limits`, {role: most lines} or None: a block wrapped into more lines counts as not fitting). Every
    line's ink plus the room kept for its outline and shadow lies inside `box`, apart from every other line's."""
    rx0, ry0, rx1, ry1 = box
    vertical = orientation == "vertical"
    rows = []  # (block, role, text, size, room, plain ink relative to the pen)
    for number, ((role, text), size) in enumerate(zip(blocks, _sizes(blocks, title_size))):
        font = load_font(font_file, size, index)
        outline, shadow = _halo(size, attempt)
        room = outline + shadow
        if vertical:
            lines = wrap(text, lambda t: sum(not ch.isspace() for ch in t) * size, ry1 - ry0 - 2 * room)
        else:
            lines = wrap(text, font.getlength, rx1 - rx0 - 2 * room)
        if limits and len(lines) > limits[role]:
            return None
        stroke = bold_width(size) if role in BOLD_ROLES else 0
        rows += [(number, role, line, size, room, _ink(line, font_file, index, size, vertical, stroke, 0))
                 for line in lines]

    def gap(prev, row):
        return round((0.25 if prev[0] == row[0] else 0.6) * row[3])

    placed = []
    if not vertical:
        heights = [ink[3] - ink[1] + 2 * room for *_, room, ink in rows]
        total = sum(heights) + sum(gap(a, b) for a, b in zip(rows, rows[1:]))
        if total > ry1 - ry0:
            return None
        y = {"top": ry0, "bottom": ry1 - total}.get(region, ry0 + (ry1 - ry0 - total) // 2)
        for i, (number, role, line, size, room, ink) in enumerate(rows):
            width = ink[2] - ink[0] + 2 * room
            if width > rx1 - rx0:
                return None
            y += gap(rows[i - 1], rows[i]) if i else 0
            x = rx0 + (rx1 - rx0 - width) // 2
            pen = (x + room - ink[0], y + room - ink[1])
            placed.append((number, role, line, size, pen))
            y += heights[i]
    else:
        widths = [max(size, ink[2] - ink[0]) + 2 * room for _, _, _, size, room, ink in rows]
        total = sum(widths) + sum(gap(a, b) for a, b in zip(rows, rows[1:]))
        if total > rx1 - rx0:
            return None
        right = rx1 - (rx1 - rx0 - total) // 2
        for i, (number, role, line, size, room, ink) in enumerate(rows):
            right -= gap(rows[i - 1], rows[i]) if i else 0
            left = right - widths[i] + room  # the ink centred in its column, the cells' tops on the region's top
            pen = (left + (widths[i] - 2 * room - (ink[2] - ink[0])) // 2 - ink[0], ry0 + room - min(0, ink[1]))
            if pen[1] + ink[3] + room > ry1:
                return None
            placed.append((number, role, line, size, pen))
            right -= widths[i]
    return placed


def _fit(blocks, region, box, orientation, attempt, font_file, index, scale, cap):
    """The arrangement at the largest title size that fits (see the module's docstring), scaled by `scale`; None when
    nothing fits even at MIN_FONT_SIZE. A title is kept on one line when that costs it less than a quarter of the
    size two lines would give it ("Labour Day Sale" at 95 px rather than "Labour" over "Day Sale" at 100)."""
    args = (region, box, orientation, attempt, font_file, index)
    one_line_title = dict(ROLE_MAX_LINES, title=1)
    one, two = _largest(blocks, cap, one_line_title, *args), _largest(blocks, cap, ROLE_MAX_LINES, *args)
    if one is not None and (two is None or one >= ONE_LINE_TITLE_SHARE * two):
        chosen = [(one, one_line_title)]
    else:
        chosen = [(two, ROLE_MAX_LINES)] if two is not None else []
    chosen.append((_largest(blocks, cap, None, *args), None))
    for best, limits in chosen:
        if best is None:
            continue
        for size in range(max(MIN_FONT_SIZE, int(best * scale)), MIN_FONT_SIZE - 1, -1):
            arranged = _arrange(blocks, size, *args, limits)
            if arranged is not None:
                return arranged
    return None


def _largest(blocks, cap, limits, *args):
    """The largest title size up to `cap` at which the blocks fit (a binary search: fitting is close enough to
    monotonic in the size), or None."""
    low, high, best = MIN_FONT_SIZE, max(MIN_FONT_SIZE, cap), None
    while low <= high:
        mid = (low + high) // 2
        if _arrange(blocks, mid, *args, limits) is not None:
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def _colour(line_box, background, palette, size, attempt):
    """(fill, outline or None, outline width, shadow, contrast) for a line whose text covers `line_box` (see the
    module's docstring: the first candidate fill that reaches MIN_CONTRAST x CONTRAST_SAFETY, else the best one,
    outlined; from attempt 3 on every line is outlined)."""
    x0, y0, x1, y1 = line_box
    pixels = background[max(0, y0):max(0, y1), max(0, x0):max(0, x1)]
    candidates = _fill_candidates(pixels if pixels.size else background, palette)
    scored = [(contrast_over(colour, pixels), colour) for colour in candidates]
    fill, contrast = None, 0.0
    for ratio, colour in scored:
        if ratio >= MIN_CONTRAST * CONTRAST_SAFETY:
            fill, contrast = colour, ratio
            break
    width, shadow = _halo(size, attempt)
    if fill is not None and attempt < 3:
        return fill, None, 0, False, contrast
    if fill is None:
        contrast, fill = max(scored, key=lambda pair: pair[0])  # first of the best: the earlier candidate wins a tie
    return fill, halo_colour(fill), width, shadow > 0, contrast


def make_layout(background, blocks, orientation="horizontal", region="auto", attempt=0, margin=None, palette=None):
    """Place `blocks` ([(role, text)], reading order, title first) on `background` (PIL RGB; its size is the canvas).
    `palette`: fill colours to try first (the plan's mood), (r, g, b) each. Same inputs, same layout. A bad
    orientation, region, role or empty text, or text that does not fit the canvas, is a one-line UserError."""
    if orientation not in ORIENTATIONS:
        raise UserError(f"orientation {orientation!r}: choose one of {', '.join(ORIENTATIONS)}")
    if region not in REGIONS:
        raise UserError(f"region {region!r}: choose one of {', '.join(REGIONS)}")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise UserError(f"attempt {attempt!r}: must be an integer >= 0")
    blocks = _check_blocks(blocks)
    palette = [_check_colour(colour, f"palette colour {i + 1}") for i, colour in enumerate(palette or ())]
    background = background.convert("RGB")
    width, height = background.size
    margin = default_margin(width, height) if margin is None else int(margin)
    if not 0 <= margin < min(width, height) // 4:
        raise UserError(f"margin {margin}: must be between 0 and a quarter of the poster's shorter side")
    font_file = str(cjk_font())
    index = font_face_index(font_file)
    blocks = _drop_missing_glyphs(blocks, font_file, index)

    ranked = rank_regions(background, orientation, margin)
    first = ranked[0] if region == "auto" else region
    if attempt == 2:
        order = [name for name in ranked if name != first]  # another region: the quietest of the others
    else:
        order = [first] + [name for name in ranked if name != first]
    scale = SMALLER_SCALE if attempt == 1 else 1.0
    cap = round(TITLE_SHARE * min(width, height))
    for name in order:
        box = region_box(name, width, height, margin, orientation)
        arranged = _fit(blocks, name, box, orientation, attempt, font_file, index, scale, cap)
        if arranged is not None:
            break
    else:
        raise UserError(f"the text does not fit a {width} x {height} poster even at {MIN_FONT_SIZE} px: shorten the "
                        f"lines (longest: {max((t for _, t in blocks), key=len)!r})")

    pixels = np.asarray(background)
    layout = Layout(width=width, height=height, orientation=orientation, region=name, attempt=attempt, margin=margin)
    vertical = orientation == "vertical"
    for number, role, text, size, (px, py) in arranged:
        bold = role in BOLD_ROLES
        plain = _ink(text, font_file, index, size, vertical, bold_width(size) if bold else 0, 0)
        fill, outline, outline_width, shadow, contrast = _colour(
            (px + plain[0], py + plain[1], px + plain[2], py + plain[3]), pixels, palette, size, attempt)
        line = PlacedLine(role=role, text=text, box=(0, 0, 0, 0), font_path=font_file, font_size=size,
                          vertical=vertical, fill=fill, outline=outline, outline_width=outline_width, shadow=shadow,
                          contrast=contrast, block=number, font_index=index, bold=bold, plate=attempt >= 4)
        ink = _ink(text, font_file, index, size, vertical, line.stroke(), shadow_offset(size) if shadow else 0)
        line.box = (px + ink[0], py + ink[1], px + ink[2], py + ink[3])
        layout.lines.append(line)
    return layout


# ----------------------------------------------------------------------------------------------------------------------
# Drawing


def render_poster(background, layout):
    """`background` with the layout's lines drawn on it (a new RGB image, the background's size), in layers: plates,
    shadows, outlines, then the text itself, each layer for every line before the next (a vertical line is one draw
    per character, and one character's outline must not cover its neighbour's fill). A line on a plate gets no
    outline stroke: the plate is its outline. The same layout on the same background gives the same pixels."""
    background = background.convert("RGB")
    if background.size != (layout.width, layout.height):
        raise UserError(f"the background is {background.size[0]} x {background.size[1]} but the layout is for "
                        f"{layout.width} x {layout.height}")
    poster = background.copy()
    draw = ImageDraw.Draw(poster)
    for box, colour in plates(layout):
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour)
    for line in layout.lines:
        if line.shadow:
            d = shadow_offset(line.font_size)
            _draw_line(draw, line, (d, d), line.halo(), line.stroke())
    for line in layout.lines:
        if line.outline and not line.plate:
            _draw_line(draw, line, (0, 0), line.halo(), line.stroke())
    for line in layout.lines:
        _draw_line(draw, line, (0, 0), tuple(line.fill), bold_width(line.font_size) if line.bold else 0)
    return poster


def _draw_line(draw, line, shift, colour, stroke):
    font = _line_font(line)
    x, y = line.pen()
    for piece, (dx, dy), anchor in _pieces(line.text, line.font_size, line.vertical):
        draw.text((x + dx + shift[0], y + dy + shift[1]), piece, fill=colour, font=font, anchor=anchor,
                  stroke_width=stroke, stroke_fill=colour)


def plates(layout):
    """[(box, colour)]: one plate per block whose lines have `plate`, the rectangle round their boxes (the gaps between
    a wrapped block's lines covered too: stripes left in them read to OCR as letters) in the first line's outline
    colour."""
    found = {}
    for line in layout.lines:
        if line.plate:
            box, colour = found.get(line.block, (line.box, line.halo()))
            found[line.block] = ((min(box[0], line.box[0]), min(box[1], line.box[1]), max(box[2], line.box[2]),
                                  max(box[3], line.box[3])), colour)
    return [found[block] for block in sorted(found)]


def text_mask(layout):
    """An "L" image of the layout's size, 255 where any line's ink (outline and shadow included) or plate is drawn:
    what the review leaves out when it measures the background round the text."""
    mask = Image.new("L", (layout.width, layout.height), 0)
    draw = ImageDraw.Draw(mask)
    for box, _ in plates(layout):
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    for line in layout.lines:
        _draw_line(draw, line, (0, 0), 255, line.stroke())
        if line.shadow:
            d = shadow_offset(line.font_size)
            _draw_line(draw, line, (d, d), 255, line.stroke())
    return mask
