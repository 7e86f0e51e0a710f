"""The poster read back and checked (APP_example/auto_poster's last stage): what a reader would see, not what the layout
meant to draw.

    poster + layout + planned lines ---> OCR of the whole poster ---> four checks ---------------------> review.json
                                         (RapidOCR: detect, turn,      lines    every planned line read back
                                          recognise)                   inside   every box inside the margin
                                                                       overlap  no two boxes overlap
                                                                       contrast every line legible

lines: OCR's readings and the planned line are compared after normalising both (NFKC, lower case, no spaces or
punctuation: OCR drops and swaps those freely, and a reader does not need them). A planned line may have been wrapped
into several rows or columns, and OCR reads a wrapped line as several pieces in its own order (columns right to left
come back left to right), so the readings that mostly belong to the line (half their characters or more) are joined in
every order and the best join counts. It is recovered when its character-level similarity (difflib's ratio, 2 x
matching characters / both lengths) is at least MATCH_THRESHOLD: one wrong or missing character in ten is OCR's,
more than that is the poster's. A vertical line the page reading misses is read once more column by column: each
column's character cells cut out and set side by side as a row, the upright characters that recognition models are
trained on.

contrast: measured on the poster, not taken from the layout: the line's fill against the poster's pixels round its
text inside its box (its own ink and every other line's left out), as the layout measures (poster_layout.contrast_over).
A line below MIN_CONTRAST passes only with an outline or shadow whose colour contrasts with the fill by MIN_CONTRAST.

RapidOCR is the `rapidocr` package (PP-OCR detection, direction and recognition models as ONNX files inside its wheel,
run by onnxruntime, nothing downloaded) with OpenCV's headless build: no display or libGL needed. One reader is made
per process and shared; a lock lets one poster through at a time (the engine keeps per-call settings). One reading of
a 768 x 1024 poster takes 0.3-0.45 s on one CPU thread, after ~1 s to load the models once.
"""

import difflib
import functools
import itertools
import os
import threading
import unicodedata
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from glm_tune.atomic import write_json
from glm_tune.errors import UserError
from glm_tune.poster_layout import MIN_CONTRAST, contrast_over, contrast_ratio, text_mask

MATCH_THRESHOLD = 0.8
PIECE_SHARE = 0.5  # a reading belongs to a planned line when at least half its characters are in it
MAX_PIECES = 5  # joins of up to this many pieces are tried (5! = 120 orders)
OCR_HINT = "pip install 'rapidocr>=3.10,<4' onnxruntime (APP_example/requirements.txt; bash setup.sh installs it)"


# ----------------------------------------------------------------------------------------------------------------------
# OCR


@dataclass
class Reading:
    """One piece of text OCR found: what it says, where ((x0, y0, x1, y1) round its quadrilateral), how sure."""

    text: str
    box: tuple
    score: float


class PosterReader:
    """RapidOCR, loaded once. `threads`: onnxruntime's threads per model; None takes OMP_NUM_THREADS when set (how this
    project's scripts are told to share the cores), else onnxruntime's default (one per core)."""

    def __init__(self, threads=None):
        try:
            from rapidocr import RapidOCR
        except ImportError:
            raise UserError(f"the OCR package is not installed: {OCR_HINT}") from None
        if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
            threads = int(os.environ["OMP_NUM_THREADS"])
        params = {"Global.log_level": "warning"}
        if threads:
            params.update({"EngineConfig.onnxruntime.intra_op_num_threads": threads,
                           "EngineConfig.onnxruntime.inter_op_num_threads": 1})
        self._engine = RapidOCR(params=params)
        self._lock = threading.Lock()

    def read_page(self, image):
        """Every piece of text on `image` (PIL), in RapidOCR's order (top to bottom, then left to right)."""
        with self._lock:
            result = self._engine(image.convert("RGB"), use_det=True, use_cls=True, use_rec=True)
        if not getattr(result, "txts", None):
            return []
        readings = []
        for text, quad, score in zip(result.txts, result.boxes, result.scores):
            quad = np.asarray(quad)
            box = (int(quad[:, 0].min()), int(quad[:, 1].min()), int(quad[:, 0].max()), int(quad[:, 1].max()))
            readings.append(Reading(text=str(text), box=box, score=round(float(score), 4)))
        return readings

    def read_line(self, image):
        """The text of `image` taken as one line (recognition only, no detection)."""
        with self._lock:
            result = self._engine(image.convert("RGB"), use_det=False, use_cls=False, use_rec=True)
        texts = getattr(result, "txts", None) or ()
        return "".join(str(t) for t in texts)


_READER_LOCK = threading.Lock()


@functools.cache
def _reader():
    return PosterReader()


def default_reader():
    """The process's PosterReader (made on first use: loading the models takes about a second; two threads asking at
    once get the same one)."""
    with _READER_LOCK:
        return _reader()


# ----------------------------------------------------------------------------------------------------------------------
# Matching


def normalise(text):
    """What the lines check compares: NFKC (full-width to plain forms), lower case, letters, digits and symbols only."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "PZC")


def similarity(a, b):
    """Character-level similarity, 0 to 1: 2 x matching characters / (len(a) + len(b)) (difflib)."""
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _share_in(piece, line):
    matched = sum(block.size for block in difflib.SequenceMatcher(None, piece, line, autojunk=False)
                  .get_matching_blocks())
    return matched / len(piece) if piece else 0.0


def best_match(line, readings):
    """(the best reading of the planned `line` among `readings` (texts), its similarity); both normalised. Pieces
    that mostly belong to the line are joined in every order (see the module's docstring)."""
    target = normalise(line)
    pieces = [p for p in (normalise(r) for r in readings) if p and _share_in(p, target) >= PIECE_SHARE]
    pieces = sorted(pieces, key=lambda p: -_share_in(p, target) * len(p))[:MAX_PIECES]
    best, best_score = "", similarity(target, "")
    for count in range(1, len(pieces) + 1):
        for order in itertools.permutations(pieces, count):
            joined = "".join(order)
            score = similarity(target, joined)
            if score > best_score:
                best, best_score = joined, score
    return best, round(best_score, 4)


def _columns_as_row(poster, lines):
    """The vertical `lines`' character cells, cut out in reading order and set side by side as one row."""
    cells = [cell for line in lines for cell in line.cells()]
    if not cells:
        return None
    size = max(c[3] - c[1] for c in cells)
    pad = max(2, size // 6)
    row = Image.new("RGB", (len(cells) * size + 2 * pad, size + 2 * pad), tuple(lines[0].halo()))
    for i, (x0, y0, x1, y1) in enumerate(cells):
        row.paste(poster.crop((x0, y0, x1, y1)), (pad + i * size, pad))
    return row


# ----------------------------------------------------------------------------------------------------------------------
# The checks


def _lines_check(poster, layout, expected_lines, readings, reader):
    texts = [r.text for r in readings]
    detail, passed = [], True
    for number, line in enumerate(expected_lines):
        read, score = best_match(line, texts)
        how = "page"
        columns = [placed for placed in layout.lines if placed.block == number and placed.vertical]
        if score < MATCH_THRESHOLD and columns:
            row = _columns_as_row(poster, columns)
            if row is not None:
                column_read, column_score = best_match(line, [reader.read_line(row)])
                if column_score > score:
                    read, score, how = column_read, column_score, "columns"
        ok = score >= MATCH_THRESHOLD
        passed &= ok
        detail.append({"expected": line, "read": read, "similarity": score, "how": how, "passed": ok})
    return {"passed": passed, "threshold": MATCH_THRESHOLD, "detail": detail}


def _inside_check(layout, margin):
    x0, y0, x1, y1 = margin, margin, layout.width - margin, layout.height - margin
    outside = [{"line": i, "text": line.text, "box": list(line.box)} for i, line in enumerate(layout.lines)
               if line.box[0] < x0 or line.box[1] < y0 or line.box[2] > x1 or line.box[3] > y1]
    return {"passed": not outside, "allowed": [x0, y0, x1, y1], "detail": outside}


def _overlap_check(layout):
    overlapping = []
    for (i, a), (j, b) in itertools.combinations(enumerate(layout.lines), 2):
        if min(a.box[2], b.box[2]) > max(a.box[0], b.box[0]) and min(a.box[3], b.box[3]) > max(a.box[1], b.box[1]):
            overlapping.append({"lines": [i, j], "texts": [a.text, b.text], "boxes": [list(a.box), list(b.box)]})
    return {"passed": not overlapping, "detail": overlapping}


def _contrast_check(poster, layout):
    pixels = np.asarray(poster)
    # Ink, outlines, shadows and their anti-aliased edges (a few px out) are not background.
    ink = np.asarray(text_mask(layout).filter(ImageFilter.MaxFilter(5))) > 0
    detail, passed = [], True
    for i, line in enumerate(layout.lines):
        x0, y0, x1, y1 = (max(0, v) for v in line.box)
        x1, y1 = min(x1, layout.width), min(y1, layout.height)
        around = pixels[y0:y1, x0:x1][~ink[y0:y1, x0:x1]]
        measured = contrast_over(line.fill, around) if len(around) else None
        halo = line.halo() if (line.outline or line.shadow) else None
        halo_ratio = round(contrast_ratio(line.fill, halo), 3) if halo else None
        ok = (measured is not None and measured >= MIN_CONTRAST) or (halo_ratio or 0) >= MIN_CONTRAST
        passed &= ok
        detail.append({"line": i, "text": line.text, "measured": measured, "recorded": line.contrast,
                       "halo": halo_ratio, "passed": ok})
    return {"passed": passed, "minimum": MIN_CONTRAST, "detail": detail}


@dataclass
class Review:
    """The four checks ({name: {"passed", "detail", ...}}), whether all passed, and everything OCR read."""

    checks: dict
    passed: bool
    ocr_text: list = field(default_factory=list)

    def to_json(self):
        return {"passed": self.passed, "checks": self.checks, "ocr_text": list(self.ocr_text)}

    def failed(self):
        """The names of the checks that failed."""
        return [name for name, check in self.checks.items() if not check["passed"]]


def review_poster(poster, layout, expected_lines, margin=None, ocr=None):
    """Read `poster` (PIL) back and check it against `layout` and the planned `expected_lines` (the texts, in order,
    or the (role, text) blocks given to make_layout; line i is the layout's block i). `margin`: the border boxes must keep clear of (None: the layout's). `ocr`: a
    reader with read_page/read_line (None: default_reader())."""
    poster = poster.convert("RGB")
    if poster.size != (layout.width, layout.height):
        raise UserError(f"the poster is {poster.size[0]} x {poster.size[1]} but the layout is for "
                        f"{layout.width} x {layout.height}")
    expected_lines = [line[1] if isinstance(line, (tuple, list)) else line for line in expected_lines]
    reader = ocr or default_reader()
    readings = reader.read_page(poster)
    checks = {"lines": _lines_check(poster, layout, expected_lines, readings, reader),
              "inside": _inside_check(layout, layout.margin if margin is None else margin),
              "overlap": _overlap_check(layout),
              "contrast": _contrast_check(poster, layout)}
    return Review(checks=checks, passed=all(c["passed"] for c in checks.values()), ocr_text=[r.text for r in readings])


def write_review(review, path):
    """review.json, written atomically."""
    write_json(path, review.to_json())
