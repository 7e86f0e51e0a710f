"""The poster's plan (APP_example/auto_poster, its first stage): what ChatGLM is asked for, how its answer becomes a
plan that can always be used, and plan.json.

    theme "五一劳动节促销" --ChatGLM--> answer with a JSON object in it --parse_plan--> PosterPlan (+ provenance)

A plan is the image prompt of the background, the lines of text (a title, an optional subtitle, up to MAX_BODY_LINES
body lines), the orientation of the text (horizontal, or vertical: Chinese written top to bottom), the region of the
poster the text goes in, and a colour mood: it is added to the image prompt, and the colours it names are the text
colours the layout tries first.

A 6B model asked for JSON mostly answers JSON, but not always clean JSON, and a random small one answers noise. So the
parser never fails; it goes in three steps:

1. find: every `{` in the answer is tried in turn (chatter and ``` fences around the object are ignored); the first
   object that holds a plan field wins.
2. mend: the object is read as JSON, and when that fails by a lenient reader (_LenientReader) that takes what models
   write instead: trailing or missing commas, single or full-width quotes, full-width ，：｛｝ as syntax, unquoted keys
   and values, // # /* */ comments, Python True/False/None, and an object never closed (cut off, or followed by
   chatter). Each kind of repair it needed is recorded (`repairs`).
3. fill and clip: each field is read from the keys models use for it (FIELD_KEYS: "title", "标题", "headline", ...);
   what is missing or unusable gets its default, derived from the theme (the title is the theme; the image prompt
   is a background for the theme); what is out of range is cut to range (too many or too long lines, an orientation
   or region that is none of the known ones).

`provenance` says where each field came from:

    model     ChatGLM's value, as it was
    repaired  ChatGLM's value, put into shape (body as one string split into lines, "竖排" read as vertical)
    clipped   ChatGLM's value, cut to the limits (lines dropped or shortened; an unknown region replaced by auto)
    default   not in the answer, or unusable: the default
    user      written by a person (a --plan file without provenance, or a field edited on the page)

plan.json is PosterPlan.to_json(): the fields, the theme, provenance, the repairs and ChatGLM's raw answer. Read back
(read_plan) it is checked strictly, since a person may have written or edited it: a field of the wrong type or out
of range is a one-line UserError naming the file and the field, not something mended silently.
"""

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from glm_tune.atomic import write_json
from glm_tune.errors import UserError
from glm_tune.poster_layout import ORIENTATIONS, REGIONS

FIELDS = ("image_prompt", "title", "subtitle", "body", "orientation", "region", "mood")
PROVENANCE = ("model", "repaired", "clipped", "default", "user")
# Limits in display columns: a Chinese character takes two, a Latin letter one, about as wide as they print.
MAX_WIDTH = {"image_prompt": 400, "title": 24, "subtitle": 36, "body": 40, "mood": 80}
MAX_BODY_LINES = 4
DEFAULT_MOOD = "bright, warm colours"
PLAN_VERSION = 1
PLAN_PROMPT = (
    "为主题「{theme}」设计一张海报。只输出一个 JSON 对象，不要解释，格式如下：\n"
    '{{"image_prompt": "背景画面的英文描述，画面里不要有文字", '
    '"title": "主标题，不超过 {title} 个字", '
    '"subtitle": "副标题，不超过 {subtitle} 个字，可以为空", '
    '"body": ["正文，最多 {lines} 行，每行不超过 {body} 个字"], '
    '"orientation": "horizontal（横排）或 vertical（竖排）", '
    '"region": "文字放在哪里：top、bottom、left、right、center 或 auto", '
    '"mood": "色调，例如 warm red and gold"}}'
)

# The keys models use for each field (compared lower-cased, spaces and hyphens as underscores).
FIELD_KEYS = {
    "image_prompt": ("image_prompt", "prompt", "imageprompt", "image", "background", "background_prompt",
                     "画面", "背景", "图像提示词", "提示词", "背景描述"),
    "title": ("title", "headline", "main_title", "标题", "主标题"),
    "subtitle": ("subtitle", "sub_title", "slogan", "tagline", "副标题", "标语"),
    "body": ("body", "body_lines", "lines", "text", "texts", "content", "正文", "文案", "内容"),
    "orientation": ("orientation", "direction", "text_direction", "writing", "方向", "排版", "排列", "文字方向"),
    "region": ("region", "text_region", "position", "text_position", "placement", "位置", "文字位置", "区域"),
    "mood": ("mood", "colour_mood", "color_mood", "colours", "colors", "colour", "color", "palette", "tone",
             "色调", "配色", "颜色", "风格"),
}
# Colour words of a mood, as text colours (r, g, b); Chinese ones are read a character at a time (红, 金).
MOOD_COLOURS = {
    **dict.fromkeys(("red", "红"), (200, 30, 40)), **dict.fromkeys(("gold", "golden", "金"), (235, 185, 50)),
    **dict.fromkeys(("yellow", "黄"), (250, 215, 60)), **dict.fromkeys(("orange", "橙", "橘"), (245, 130, 30)),
    **dict.fromkeys(("green", "绿"), (40, 150, 70)), **dict.fromkeys(("blue", "蓝"), (30, 90, 200)),
    **dict.fromkeys(("cyan", "teal", "青"), (20, 160, 170)), **dict.fromkeys(("purple", "violet", "紫"), (120, 50, 160)),
    **dict.fromkeys(("pink", "粉"), (240, 120, 170)), **dict.fromkeys(("brown", "棕", "褐"), (120, 70, 30)),
    **dict.fromkeys(("white", "白"), (255, 255, 255)), **dict.fromkeys(("black", "黑"), (0, 0, 0)),
    **dict.fromkeys(("silver", "grey", "gray", "银", "灰"), (190, 190, 195)),
}
# Words that name a known value; "竖排" is vertical. Checked in this order, so "top left" is top.
SYNONYMS = {
    "orientation": {"horizontal": ("horizontal", "landscape", "row", "横", "水平"),
                    "vertical": ("vertical", "portrait", "column", "竖", "纵", "垂直", "直排")},
    "region": {"top": ("top", "upper", "header", "上", "顶"), "bottom": ("bottom", "lower", "footer", "下", "底"),
               "left": ("left", "左"), "right": ("right", "右"), "center": ("center", "centre", "middle", "中"),
               "auto": ("auto", "自动", "任意")},
}


# -- the plan ---------------------------------------------------------------------------------------------------------

@dataclass
class PosterPlan:
    """What the poster says and shows; everything after the plan stage is made from it (and the background)."""

    theme: str
    title: str
    image_prompt: str
    subtitle: str = ""
    body: list = field(default_factory=list)
    orientation: str = "horizontal"
    region: str = "auto"
    mood: str = DEFAULT_MOOD
    provenance: dict = field(default_factory=dict)  # field -> one of PROVENANCE
    repairs: list = field(default_factory=list)  # what the lenient reader mended in ChatGLM's JSON
    llm_output: str | None = None

    def blocks(self):
        """The lines of text as make_layout takes them: [(role, text)], the title first."""
        lines = [("title", self.title)]
        if self.subtitle:
            lines.append(("subtitle", self.subtitle))
        return lines + [("body", line) for line in self.body]

    def palette(self):
        """The text colours the mood names, in its order (make_layout tries them first, where they are legible)."""
        words = re.findall(r"[a-z]+|[\u4e00-\u9fff]", self.mood.lower())
        return list(dict.fromkeys(MOOD_COLOURS[w] for w in words if w in MOOD_COLOURS))

    def paint_prompt(self):
        """What the background is painted from: the image prompt in the plan's colour mood."""
        return f"{self.image_prompt}, {self.mood}" if self.mood else self.image_prompt

    def fields_from(self, *sources):
        return [name for name in FIELDS if self.provenance.get(name) in sources]

    def editable_json(self):
        """The fields alone, as JSON text for a person to edit (edited_plan reads it back)."""
        return json.dumps({name: getattr(self, name) for name in FIELDS}, ensure_ascii=False, indent=2)

    def to_json(self):
        return {"version": PLAN_VERSION, "theme": self.theme, **{name: getattr(self, name) for name in FIELDS},
                "provenance": {name: self.provenance.get(name, "user") for name in FIELDS},
                "repairs": list(self.repairs), "llm_output": self.llm_output}


def check_theme(theme):
    if theme is None or not str(theme).strip():
        raise UserError("--theme: empty; say what the poster is for (e.g. \"五一劳动节促销\")")
    return " ".join(str(theme).split())


def defaults(theme):
    """Every field's default for `theme`."""
    prompt = f"a poster background for {theme}, simple composition with open space for text"
    return {"image_prompt": clip_text(prompt, MAX_WIDTH["image_prompt"]),
            "title": clip_text(theme, MAX_WIDTH["title"]), "subtitle": "", "body": [], "orientation": "horizontal",
            "region": "auto", "mood": DEFAULT_MOOD}


def plan_prompt(theme):
    """What ChatGLM is asked: the plan of a poster for `theme`, as one JSON object."""
    return PLAN_PROMPT.format(theme=check_theme(theme), title=MAX_WIDTH["title"] // 2,
                              subtitle=MAX_WIDTH["subtitle"] // 2, body=MAX_WIDTH["body"] // 2, lines=MAX_BODY_LINES)


def display_width(text):
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def clip_text(text, limit):
    """`text` cut to at most `limit` display columns."""
    width = 0
    for i, ch in enumerate(text):
        width += display_width(ch)
        if width > limit:
            return text[:i].rstrip()
    return text


# -- step 1 and 2: find the JSON object and mend it -------------------------------------------------------------------

QUOTES = {'"': '"', "'": "'", "“": "”\"", "‘": "’'", "「": "」"}  # opening quote -> what may close it
FULL_WIDTH = {"，": ",", "、": ",", "：": ":", "｛": "{", "｝": "}", "［": "[", "］": "]"}
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/", "\\": "\\", '"': '"', "'": "'"}
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


class _LenientReader:
    """Reads one JSON value from text[pos:], also when it is written the ways models get JSON wrong (see the module
    docstring); `repairs` lists the kinds of mending it needed. ValueError when there is no value to read."""

    def __init__(self, text, pos=0):
        self.text, self.pos, self.repairs = text, pos, []

    def mend(self, what):
        if what not in self.repairs:
            self.repairs.append(what)

    def peek(self):
        """The next character that is not space or a comment, as its ASCII form ('' at the end)."""
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch.isspace():
                self.pos += 1
            elif self.text.startswith(("//", "#"), self.pos):
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
                self.mend("comments")
            elif self.text.startswith("/*", self.pos):
                end = self.text.find("*/", self.pos + 2)
                self.pos = len(self.text) if end < 0 else end + 2
                self.mend("comments")
            else:
                return FULL_WIDTH.get(ch, ch)
        return ""

    def take(self):
        """Step over the character peek() returned."""
        if self.text[self.pos] in FULL_WIDTH:
            self.mend("full-width punctuation")
        self.pos += 1

    def value(self):
        ch = self.peek()
        if ch == "{":
            return self.container("{", "}")
        if ch == "[":
            return self.container("[", "]")
        if ch in QUOTES:
            return self.string()
        word = self.bare(",}]\n")
        if word in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[word]
        if word in ("True", "False", "None"):
            self.mend("Python True/False/None")
            return {"True": True, "False": False, "None": None}[word]
        if NUMBER.fullmatch(word):
            return float(word) if any(c in word for c in ".eE") else int(word)
        if not word:
            raise ValueError(f"no value at {self.pos}")
        self.mend("unquoted values")
        return word

    def container(self, opening, closing):
        self.take()
        result = {} if opening == "{" else []
        comma_missing = False  # a member followed the last one without a comma
        while True:
            ch = self.peek()
            if ch == "":
                self.mend("missing closing brackets")
                return result
            if ch == closing:
                self.take()
                return result
            if opening == "{":
                start = self.pos
                key = self.string() if ch in QUOTES else self.key()
                if self.peek() not in (":", "="):
                    if not result:
                        raise ValueError(f"no ':' after the key {key!r}")
                    self.pos = start  # chatter after an object that was never closed
                    self.mend("missing closing brackets")
                    return result
                self.take()
                result[key] = self.value()
            else:
                result.append(self.value())
            if comma_missing:
                self.mend("missing commas")
            ch = self.peek()
            comma_missing = ch not in (",", closing, "")
            if ch == ",":
                self.take()
                if self.peek() == closing:
                    self.mend("trailing commas")

    def key(self):
        word = self.bare(":=\n{}[],")
        if not word:
            raise ValueError(f"no key at {self.pos}")
        self.mend("unquoted keys")
        return word

    def bare(self, stops):
        """The text up to the next of `stops` (or their full-width forms), stripped."""
        start = self.pos
        while self.pos < len(self.text) and FULL_WIDTH.get(self.text[self.pos], self.text[self.pos]) not in stops:
            self.pos += 1
        return self.text[start:self.pos].strip()

    def string(self):
        opening = self.text[self.pos]
        if opening in "'‘":
            self.mend("single quotes")
        elif opening != '"':
            self.mend("full-width punctuation")
        closing = QUOTES[opening]
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch in closing:
                self.pos += 1
                return "".join(out)
            if ch == "\\" and self.pos + 1 < len(self.text):
                nxt = self.text[self.pos + 1]
                if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", self.text[self.pos + 2:self.pos + 6]):
                    out.append(chr(int(self.text[self.pos + 2:self.pos + 6], 16)))
                    self.pos += 6
                    continue
                out.append(ESCAPES.get(nxt, nxt))
                self.pos += 2
                continue
            out.append(ch)
            self.pos += 1
        self.mend("missing closing brackets")
        return "".join(out)


def read_object(text, pos):
    """(the JSON value at text[pos], repairs): exact JSON first, the lenient reader when that fails."""
    try:
        return json.JSONDecoder().raw_decode(text, pos)[0], []
    except ValueError:
        reader = _LenientReader(text, pos)
        return reader.value(), reader.repairs


def plan_fields(value):
    """{field: value} of the plan fields that a parsed object holds under any of FIELD_KEYS (one level of nesting,
    {"poster": {...}}, is looked into)."""
    if not isinstance(value, dict):
        return {}
    names = {re.sub(r"[\s\-]+", "_", str(k).strip().lower()): v for k, v in value.items()}
    found = {}
    for name, keys in FIELD_KEYS.items():
        key = next((k for k in keys if k in names), None)
        if key is not None:
            found[name] = names[key]
    if not found:
        inner = [v for v in value.values() if isinstance(v, dict)]
        return plan_fields(inner[0]) if len(inner) == 1 else {}
    return found


def find_plan(answer):
    """(plan fields, repairs) of the first object in `answer` that holds a plan field; ({}, []) when none does."""
    text = answer or ""
    for match in re.finditer(r"[{｛]", text):
        try:
            value, repairs = read_object(text, match.start())
        except (ValueError, RecursionError):
            continue
        found = plan_fields(value)
        if found:
            return found, repairs
    return {}, []


# -- step 3: fill and clip --------------------------------------------------------------------------------------------

MISSING = object()


def _text(value, limit, empty_is_value=False):
    """(text, provenance) of a one-line text field; (None, "default") when it is unusable."""
    how = "model"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value, how = str(value), "repaired"
    elif isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        value, how = " ".join(str(v).strip() for v in value), "repaired"
    if not isinstance(value, str):
        return None, "default"
    one_line = " ".join(value.split())
    if one_line != value.strip():
        how = "repaired"
    if not one_line:
        return ("", how) if empty_is_value else (None, "default")
    clipped = clip_text(one_line, limit)
    return clipped, ("clipped" if clipped != one_line else how)


def _lines(value):
    """(body lines, provenance); (None, "default") when unusable."""
    if value is MISSING or value is None or isinstance(value, (bool, dict)):
        return None, "default"
    how = "model"
    if isinstance(value, str) and not value.strip():
        return [], "model"
    if isinstance(value, (str, int, float)):  # one string: its lines
        value, how = re.split(r"[\n;；|]", str(value)), "repaired"
    lines = []
    for item in value:
        text, item_how = _text(item, MAX_WIDTH["body"])
        if text is None:
            how = "repaired"  # an empty or unusable line, dropped
            continue
        if item_how == "repaired" and how == "model":
            how = "repaired"
        if item_how == "clipped":
            how = "clipped"
        lines.append(text)
    if len(lines) > MAX_BODY_LINES:
        lines, how = lines[:MAX_BODY_LINES], "clipped"
    return lines, how


def _choice(value, name):
    """(one of the field's known values, provenance): a synonym is repaired, anything else clipped to the default."""
    if value is MISSING or value is None:
        return None, "default"
    text = str(value).strip().lower()
    choices = SYNONYMS[name]
    if text in choices:
        return text, "model"
    for known, words in choices.items():
        if any(word in text for word in words):
            return known, "repaired"
    return None, "clipped"


def parse_plan(answer, theme):
    """The plan for `theme` that ChatGLM's `answer` gives, every gap filled (see the module docstring)."""
    theme = check_theme(theme)
    found, repairs = find_plan(answer)
    fallback = defaults(theme)
    values, provenance = {}, {}
    for name in FIELDS:
        value = found.get(name, MISSING)
        if value is MISSING:
            result, how = None, "default"
        elif name == "body":
            result, how = _lines(value)
        elif name in SYNONYMS:
            result, how = _choice(value, name)
        else:
            result, how = _text(value, MAX_WIDTH[name], empty_is_value=name == "subtitle")
        values[name] = fallback[name] if result is None else result
        provenance[name] = how
    return PosterPlan(theme=theme, **values, provenance=provenance, repairs=repairs, llm_output=answer)


# -- plan.json --------------------------------------------------------------------------------------------------------

def _field_error(where, name, problem):
    return UserError(f"{where}: field \"{name}\": {problem}")


def _checked_text(data, name, where, required=False):
    value = data.get(name)
    if value is None:
        if required:
            raise _field_error(where, name, "missing; a plan needs at least a title")
        return None
    if not isinstance(value, str):
        raise _field_error(where, name, f"must be a string, not {type(value).__name__}")
    if "\n" in value:
        raise _field_error(where, name, "must be one line (put more lines in \"body\")")
    if required and not value.strip():
        raise _field_error(where, name, "empty")
    if name in MAX_WIDTH and display_width(value) > MAX_WIDTH[name]:
        raise _field_error(where, name, f"{value!r} is {display_width(value)} columns wide, more than "
                                        f"{MAX_WIDTH[name]} (a Chinese character is two)")
    return value.strip()


def plan_from_json(data, where, theme=None):
    """A PosterPlan from a plan object written by a person or by this module, checked strictly (one-line UserError
    naming `where` and the field). Fields it leaves out get their defaults; its provenance is kept, and fields without
    one are "user"."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: not a poster plan (a JSON object with at least a \"title\")")
    known = {*FIELDS, "theme", "version", "provenance", "repairs", "llm_output"}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise _field_error(where, unknown[0], f"unknown (a plan has {', '.join(FIELDS)})")
    title = _checked_text(data, "title", where, required=True)
    given_theme = _checked_text(data, "theme", where)
    theme = check_theme(given_theme or theme or title)
    values = {name: _checked_text(data, name, where) for name in ("image_prompt", "subtitle", "mood")}
    if values["image_prompt"] == "":
        raise _field_error(where, "image_prompt", "empty; say what the background shows")
    body = data.get("body")
    if body is not None:
        if not isinstance(body, list) or not all(isinstance(line, str) for line in body):
            raise _field_error(where, "body", "must be a list of strings, one per line")
        if len(body) > MAX_BODY_LINES:
            raise _field_error(where, "body", f"{len(body)} lines, more than {MAX_BODY_LINES}")
        body = [_checked_text({"body": line}, "body", where) for line in body]
    values.update(title=title, body=body)
    for name in SYNONYMS:
        value = data.get(name)
        allowed = ORIENTATIONS if name == "orientation" else REGIONS
        if value is not None and value not in allowed:
            raise _field_error(where, name, f"{value!r} is not one of {', '.join(allowed)}")
        values[name] = value
    recorded = data.get("provenance") or {}
    if not isinstance(recorded, dict) or any(v not in PROVENANCE for v in recorded.values()):
        raise _field_error(where, "provenance", f"must map fields to one of {', '.join(PROVENANCE)}")
    repairs = data.get("repairs") or []
    if not isinstance(repairs, list):
        raise _field_error(where, "repairs", "must be a list")
    llm_output = data.get("llm_output")
    if llm_output is not None and not isinstance(llm_output, str):
        raise _field_error(where, "llm_output", "must be a string or null")
    fallback = defaults(theme)
    provenance = {name: "default" if values[name] is None else recorded.get(name, "user") for name in FIELDS}
    values = {name: fallback[name] if value is None else value for name, value in values.items()}
    return PosterPlan(theme=theme, **values, provenance=provenance, repairs=repairs, llm_output=llm_output)


def read_plan(path, flag=None, theme=None):
    """The plan in the JSON file `path` (plan_from_json); errors name `flag path` or the path."""
    where = f"{flag} {path}" if flag else str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"{where}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{where}: not a text file (a plan is JSON, UTF-8)") from None
    try:
        data = json.loads(text)
    except ValueError as err:
        raise UserError(f"{where}: not valid JSON ({err})") from None
    return plan_from_json(data, where, theme)


def edited_plan(plan, text, where="the plan"):
    """The plan after a person edited `text`, the JSON of its fields (PosterPlan.editable_json; the page's editor):
    checked like a file; the fields that changed become "user", the others keep their provenance."""
    try:
        data = json.loads(text)
    except ValueError as err:
        raise UserError(f"{where}: not valid JSON ({err})") from None
    if isinstance(data, dict):
        kept = {"theme": plan.theme, "repairs": plan.repairs, "llm_output": plan.llm_output}
        data = {**kept, **{k: v for k, v in data.items() if k != "provenance"}}
    new = plan_from_json(data, where, plan.theme)
    new.provenance = {name: "default" if new.provenance[name] == "default" else plan.provenance.get(name, "user")
                      if getattr(new, name) == getattr(plan, name) else "user" for name in FIELDS}
    return new


def write_plan(plan, path):
    write_json(path, plan.to_json())
