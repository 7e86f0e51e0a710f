"""Retrieval-augmented image generation (APP_example/retrieval_image_gen/): a request in words becomes a picture in
three stages, each of which can be looked at on its own:

    request ----ChatGLM----> image prompt ----CLIP over an image index----> reference image ----img2img----> image
    "一只红色的圆形气球"     "a red round balloon ..."   (clip_retrieval's index)   best match + score   the SD pipeline

1. ChatGLM (base checkpoint + optional adapter, glm_tune.chat_model) rewrites the request as a short English prompt,
   decoding greedily so that a request always gives the same prompt. Its answer is checked (clean_prompt): the first
   line, without labels such as "Prompt:" or quotes, must be words in English (Stable Diffusion 1.x/2.x's text
   encoder reads English; `language="any"` lifts that for other models), not over MAX_PROMPT_CHARS, and not one token
   repeated. An answer that fails is not used: the raw request is, and the result says why.
2. CLIP (glm_tune.clip_model) embeds the prompt used and the image index (glm_tune.image_index) gives the closest
   picture: the reference.
3. The SD pipeline redraws the reference towards the prompt (image-to-image, glm_tune.sd_generate.generate with the
   reference as its `image`).

A run is written as NAME.png and NAME.json (glm_tune.sd_generate.save_run): the JSON holds the request, the prompt
used and where it came from, the reference (path, sha256, score), and the generation settings (seed, steps,
strength, guidance, size, pipeline). Those settings make the same image again: `generate.py --settings NAME.json`,
or lora_sd's generate.py, which reads the same file.
"""

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from glm_tune.errors import UserError

REWRITE_PROMPT = ("把下面的画面需求改写成一条简短的英文图像生成提示词（Stable Diffusion prompt），"
                  "只输出英文提示词本身，不要解释。\n需求：{request}")
MAX_PROMPT_CHARS = 300
PROMPT_TOKENS = 96  # the longest answer read: a prompt is one line
LANGUAGES = ("en", "any")
# What models put before the prompt itself: "Prompt:", "英文提示词：", "Stable Diffusion prompt -", ...
LABEL = re.compile(r"^\s*(?:(?:stable\s+diffusion\s+)?prompt|英文提示词|提示词|图像提示词|英文|answer|答)\s*[:：\-]\s*",
                   re.I)
QUOTES = "\"'`“”‘’「」『』《》"


# -- stage 1: the prompt ----------------------------------------------------------------------------------------------

@dataclass
class PromptChoice:
    """The prompt a run uses, and where it came from: "chatglm" (the model's answer), "request" (the raw request,
    because the answer was unusable: `reason` says why) or "given" (the caller's own)."""

    prompt: str
    source: str
    llm_output: str | None = None
    reason: str | None = None

    @property
    def note(self):
        """One line for the user saying what happened (None when the model's prompt is used)."""
        if self.source == "request":
            return f"note: ChatGLM's prompt was unusable ({self.reason}), so the raw request is the prompt"
        return None


def _is_cjk(ch):
    return unicodedata.east_asian_width(ch) in "WF" and ch.isalpha()


def clean_prompt(text, language="en"):
    """(prompt, None) when `text`, a model's answer, holds a usable image prompt; (None, reason) when not."""
    if language not in LANGUAGES:
        raise UserError(f"--prompt_language {language}: choose one of {', '.join(LANGUAGES)}")
    lines = [line.strip() for line in (text or "").replace("```", "\n").splitlines()]
    lines = [LABEL.sub("", line).strip().strip(QUOTES).strip() for line in lines if line]
    prompt = next((line for line in lines if line), "")
    if not prompt:
        return None, "empty answer"
    if "\ufffd" in prompt or any(unicodedata.category(ch) in ("Cc", "Co", "Cs") for ch in prompt):
        return None, "unreadable characters"
    letters = [ch for ch in prompt if ch.isalpha()]
    if len(letters) < 2:
        return None, "no words"
    words = re.findall(r"\w+", prompt.lower())  # a run of CJK characters is one "word"
    if len(set(words)) * 3 <= len(words) if len(words) >= 6 else len(set(letters)) * 4 <= len(letters) >= 12:
        return None, "the same words over and over"
    if len(prompt) > MAX_PROMPT_CHARS:
        return None, f"longer than {MAX_PROMPT_CHARS} characters"
    if language == "en" and sum(map(_is_cjk, letters)) * 3 > len(letters):
        return None, "not in English (Stable Diffusion 1.x/2.x's text encoder reads English)"
    return prompt, None


def rewrite_request(request, llm, language="en"):
    """Stage 1: the PromptChoice for `request`, asking `llm` (a LangChain chat model, normally ChatGLM)."""
    request = check_request(request)
    answer = llm.invoke(REWRITE_PROMPT.format(request=request)).content
    prompt, reason = clean_prompt(answer, language)
    if prompt is None:
        return PromptChoice(request, "request", answer, reason)
    return PromptChoice(prompt, "chatglm", answer)


def check_request(request):
    if not request or not request.strip():
        raise UserError("--request: empty; say what picture you want")
    return request.strip()


# -- the whole run ----------------------------------------------------------------------------------------------------

@dataclass
class RagSettings:
    """What a run needs besides the request: the three models and the image settings (sd_generate's)."""

    index_dir: str
    prompt: str | None = None  # use this prompt instead of asking ChatGLM
    prompt_language: str = "en"
    model_name_or_path: str | None = None  # ChatGLM
    revision: str | None = None
    lora_path: str | None = None
    dtype: str = "auto"
    clip_model: str | None = None  # None: the model the index was built with
    clip_revision: str | None = None
    sd: dict = field(default_factory=dict)  # GenerationSettings fields: pretrained_model_name_or_path, seed, ...


@dataclass
class RagResult:
    request: str
    choice: PromptChoice
    reference: object  # glm_tune.image_index.Hit
    images: list
    record: dict  # what NAME.json holds


def chatglm(settings):
    """The greedy ChatGLM of `settings`' ChatGLM flags."""
    from glm_tune.chat_model import greedy_chatglm

    return greedy_chatglm(PROMPT_TOKENS, settings.model_name_or_path, settings.revision, settings.lora_path, settings.dtype)


def find_reference(index, embedder, prompt):
    """Stage 2: the indexed image closest to `prompt`."""
    return index.search_text(embedder, prompt, k=1)[0]


def run(request, settings, llm=None, index=None, embedder=None, pipe=None):
    """All three stages. `llm`, `index`, `embedder` and `pipe` default to the ones `settings` names (a server passes
    those it keeps loaded)."""
    from glm_tune.clip_model import load_clip
    from glm_tune.image_index import ImageIndex
    from glm_tune.sd_generate import GenerationSettings, file_sha256, generate

    request = check_request(request)
    index = index or ImageIndex.open(settings.index_dir)
    embedder = embedder or load_clip(settings.clip_model or index.model, settings.clip_revision)
    if settings.prompt is not None:
        choice = PromptChoice(check_request(settings.prompt), "given")
    else:
        choice = rewrite_request(request, llm or chatglm(settings), settings.prompt_language)
    hit = find_reference(index, embedder, choice.prompt)
    generation = GenerationSettings(**{**settings.sd, "prompt": choice.prompt, "image": str(hit.path)}).check()
    images, record = generate(generation, pipe)
    record = {**record, "request": request, "prompt_source": choice.source, "llm_output": choice.llm_output,
              "fallback_reason": choice.reason,
              "reference": {"path": str(hit.path), "relative_path": hit.relative_path, "score": hit.score,
                            "sha256": file_sha256(hit.path)},
              "index_dir": str(Path(settings.index_dir).resolve()), "clip_model": embedder.name,
              "chatglm": None if choice.source == "given" else {
                  "model_name_or_path": settings.model_name_or_path, "lora_path": settings.lora_path}}
    return RagResult(request, choice, hit, images, record)


def save(result, out_dir):
    """NAME.png and NAME.json into `out_dir` (the caller holds out_dir's lock); returns (png path, json path)."""
    from glm_tune.sd_generate import save_run

    paths, settings_path = save_run(result.images, result.record, out_dir)
    return paths[0], settings_path


def summary(result):
    return {"request": result.request, "prompt": result.choice.prompt, "prompt_source": result.choice.source,
            "fallback_reason": result.choice.reason, "reference": result.record["reference"],
            "settings": {k: v for k, v in result.record["settings"].items() if k in (
                "seed", "steps", "strength", "guidance", "width", "height")}}

