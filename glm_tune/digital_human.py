"""Digital human (APP_example/digital_human/): a topic becomes a talking-head video in six stages, each writing its
own files in the run folder, so that a run can be looked at and resumed at any stage:

    stage     built in (offline, CPU)                                   file(s)                     reads
    script    ChatGLM (base + adapter) within a word budget, or --script  script.txt                  -
    portrait  --portrait, or Stable Diffusion; face box by OpenCV        portrait.png, face.json     -
    voice     glm_tune.voice (pitch and rate matched to --voice_ref)     voice.wav, voice.json       script
    motion    talking_head: idle sway, nod and blinks                    motion.mp4, motion.json     portrait
    lipsync   talking_head: the mouth opens with the voice's loudness    lipsync.mp4, mouth.json     portrait, motion,
                                                                                                   voice
    mux       the frames with the voice, H.264 + AAC (bundled ffmpeg)    talk.mp4                    lipsync, voice

Resuming. run.json records, per stage, the values it was made from (the topic, prompt and ChatGLM; the portrait's
sha256 or the painting's settings; the frame count and fps; the sha256 of the files it reads) and the sha256 of what
it wrote. A stage is made again when its files are missing, when those values changed, when a stage it reads (the
right-hand column) was made again in this run, or when --redo names it or a stage it reads; otherwise its files are
reused. So deleting voice.wav makes the voice, lip-sync and mux again, while the motion (which needs only the voice's
length) is reused.

Swapping a stage. Every stage but mux can be routed to an external command (the real CosyVoice, MuseV or MuseTalk)
by a config file (read_stage_config): the command runs with the stage's files filled into its {placeholders}, and
what it writes becomes the stage's file, checked like the built-in one's.
"""

import json
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

from glm_tune.atomic import atomic_path, write_json
from glm_tune.errors import UserError, first_line
from glm_tune.locking import hold_output_lock
from glm_tune.run_folder import ModelIdentities, RunFolder, plain, prepare_out_dir, read_json
from glm_tune.sd_generate import file_sha256, fit_image

STAGES = ("script", "portrait", "voice", "motion", "lipsync", "mux")
FILES = {"script": ("script.txt",), "portrait": ("portrait.png", "face.json"), "voice": ("voice.wav", "voice.json"),
         "motion": ("motion.mp4", "motion.json"), "lipsync": ("lipsync.mp4", "mouth.json"), "mux": ("talk.mp4",)}
READS = {"script": (), "portrait": (), "voice": ("script",), "motion": ("portrait",),
         "lipsync": ("portrait", "motion", "voice"), "mux": ("lipsync", "voice")}
ROUTABLE = STAGES[:-1]  # mux is ffmpeg itself
DEFAULT_SIZE = (256, 256)
DEFAULT_FPS = 25
DEFAULT_WORDS = 60
SCRIPT_TOKENS = 256
PORTRAIT_PROMPT = "a head-and-shoulders portrait photo of a friendly presenter facing the camera, {topic}, plain " \
                  "background, soft light"
PORTRAIT_NEGATIVE = "text, watermark, profile, side view, sunglasses, hands over the face"


# -- what a run is made with ------------------------------------------------------------------------------------------

@dataclass
class TalkSettings(ModelIdentities):
    """What a run is made with; each is a flag of pipeline.py."""

    topic: str | None = None
    script: str | None = None  # a script file to use instead of ChatGLM's
    portrait: str | None = None  # a picture to use instead of painting one
    voice_ref: str | None = None  # a WAV whose pitch and rate the voice matches
    words: int = DEFAULT_WORDS
    size: tuple = DEFAULT_SIZE
    fps: int = DEFAULT_FPS
    seed: int = 0
    steps: int = 20
    stage_config: str | None = None  # routes stages to external commands
    model_name_or_path: str | None = None  # ChatGLM, for the script
    revision: str | None = None
    lora_path: str | None = None
    dtype: str = "auto"
    pretrained_model_name_or_path: str | None = None  # Stable Diffusion, for the portrait
    sd_revision: str | None = None
    variant: str | None = None
    sd_dtype: str = "fp32"
    externals: dict = field(default_factory=dict, repr=False)  # stage -> ExternalCommand, filled by check()

    def check(self):
        """Every bad input fails here, one line each, before any stage runs (so nothing half-made is left)."""
        from glm_tune import voice
        from glm_tune.sd_lora import open_image

        if self.script is None and (self.topic is None or not self.topic.strip()):
            raise UserError("--topic: empty; say what the talk is about, or give --script FILE")
        if self.script is not None:
            read_script(self.script)
        width, height = self.size = tuple(self.size)
        if any(side % 8 or not 64 <= side <= 2048 for side in self.size):
            raise UserError(f"--size {width}x{height}: each side must be a multiple of 8 between 64 and 2048")
        if not 1 <= self.fps <= 60:
            raise UserError(f"--fps {self.fps}: must be between 1 and 60")
        if self.words < 5:
            raise UserError(f"--words {self.words}: must be at least 5")
        if self.steps < 1:
            raise UserError(f"--steps {self.steps}: must be at least 1")
        if self.portrait is not None:
            if not Path(self.portrait).is_file():
                raise UserError(f"--portrait {self.portrait}: no such file")
            try:
                open_image(self.portrait)
            except UserError as err:
                raise UserError(f"--portrait {err}") from None
        if self.voice_ref is not None:
            if not Path(self.voice_ref).is_file():
                raise UserError(f"--voice_ref {self.voice_ref}: no such file")
            voice.read_wav(self.voice_ref, "--voice_ref")
        self.externals = read_stage_config(self.stage_config) if self.stage_config else {}
        return self


def parse_size(text, flag="--size"):
    match = re.fullmatch(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", str(text))
    if not match:
        raise UserError(f"{flag} {text}: not WIDTHxHEIGHT (e.g. 256x256)")
    return int(match.group(1)), int(match.group(2))


def read_script(path, flag="--script"):
    """The script in `path`, whitespace tidied; a missing, unreadable or empty file is a one-line UserError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{flag} {path}: cannot read it as UTF-8 text ({first_line(err)})") from None
    text = "\n".join(" ".join(line.split()) for line in text.strip().splitlines() if line.strip())
    if not any(ch.isalnum() for ch in text):
        raise UserError(f"{flag} {path}: empty; write what the digital human should say")
    return text


# -- stage 1: the script ----------------------------------------------------------------------------------------------

def _is_cjk(ch):
    return unicodedata.east_asian_width(ch) in "WF" and ch.isalpha()


def count_words(text):
    """Words as a speaker counts them: each Chinese character is one, and so is each run of Latin letters or
    digits."""
    return sum(map(_is_cjk, text)) + len(re.findall(r"[^\W\d_]+|\d+", "".join(" " if _is_cjk(c) else c
                                                                              for c in text)))


def clip_to_words(text, budget):
    """`text` cut to at most `budget` words, at the end of a sentence where one fits (word by word otherwise)."""
    if count_words(text) <= budget:
        return text
    sentences = re.findall(r"[^。！？!?.;；\n]+[。！？!?.;；]*", text)
    kept = ""
    for sentence in sentences:
        if count_words(kept + sentence) > budget:
            break
        kept += sentence
    if kept.strip():
        return kept.strip()
    pieces = re.findall(r"\s*(?:[^\W\d_]+|\d+|\W)", text)  # the first sentence alone is too long: word by word
    kept = ""
    for piece in pieces:
        if count_words(kept + piece) > budget:
            break
        kept += piece
    return kept.strip()


def script_prompt(topic, words):
    from glm_tune.voice import detect_language

    if detect_language(topic) == "zh":
        return f"请为“{topic}”写一段口播稿，不超过{words}字。只写要念出来的话，不要标题，不要解释。"
    return (f"Write a short spoken script about {topic}, at most {words} words. Only the words to be spoken: no "
            "title, no stage directions.")


def template_script(topic, words):
    """The script when ChatGLM's answer is unusable: built from the topic, in its language."""
    from glm_tune.voice import detect_language

    if detect_language(topic) == "zh":
        text = f"大家好！今天想和大家聊一聊{topic}。它和我们每个人都有关系，开始也比想象中容易。谢谢大家的收听！"
    else:
        text = (f"Hello everyone! Today I would like to talk about {topic}. It matters to all of us, and starting "
                "is easier than you might think. Thank you for listening!")
    return clip_to_words(text, words)


LABEL = re.compile(r"^\s*(口播稿|稿子|脚本|script|answer|回答)\s*[:：]\s*", re.IGNORECASE)


def clean_script(answer, words):
    """(script, None) when `answer`, ChatGLM's, holds a usable spoken script (clipped to `words`); (None, reason)
    when not. A script is read aloud, so it must be words people say: readable characters, mostly letters, and
    not the same few words over and over (what a random or confused model writes)."""
    text = " ".join(LABEL.sub("", line).strip().strip("\"'“”「」") for line in (answer or "").splitlines())
    text = " ".join(text.replace("```", " ").split())
    if not text:
        return None, "empty answer"
    if "\ufffd" in text or any(unicodedata.category(ch) in ("Cc", "Co", "Cs", "Cn") for ch in text):
        return None, "unreadable characters"
    letters = [ch for ch in text if ch.isalpha()]
    if count_words(text) < 3 or len(letters) * 2 < len(text.replace(" ", "")):
        return None, "too few words"
    tokens = [ch for ch in text if _is_cjk(ch)] + re.findall(r"[^\W\d_]+", text.lower())
    if len(tokens) >= 8 and len(set(tokens)) * 3 <= len(tokens):
        return None, "the same words over and over"
    return clip_to_words(text, words), None


def chatglm(settings):
    """The greedy ChatGLM of `settings`' ChatGLM flags."""
    from glm_tune.chat_model import greedy_chatglm

    return greedy_chatglm(SCRIPT_TOKENS, settings.model_name_or_path, settings.revision, settings.lora_path, settings.dtype)


def write_script(topic, words, llm):
    """Stage 1: (script, note): ChatGLM's script for `topic`, or the topic's template when its answer is unusable
    (the note says why; None when ChatGLM's script is used)."""
    answer = llm.invoke(script_prompt(topic, words)).content
    script, reason = clean_script(answer, words)
    if script is None:
        return template_script(topic, words), f"note: ChatGLM's script was unusable ({reason}), so a template " \
                                              f"built from the topic is the script"
    return script, None


# -- stage 2: the portrait --------------------------------------------------------------------------------------------

def sd_pipeline(settings):
    from glm_tune.poster import PosterSettings, sd_pipeline as load

    return load(PosterSettings(pretrained_model_name_or_path=settings.pretrained_model_name_or_path,
                               sd_revision=settings.sd_revision, variant=settings.variant, sd_dtype=settings.sd_dtype))


def paint_portrait(settings, pipe):
    """Stage 2 without --portrait: Stable Diffusion paints the portrait at its native area (see
    poster.paint_size: SD draws well only near the size it was trained at), resized to --size."""
    from glm_tune.poster import paint_size
    from glm_tune.sd_generate import GenerationSettings, generate

    prompt = PORTRAIT_PROMPT.format(topic=settings.topic or "a short talk")
    width, height = paint_size(pipe, settings.size)
    images, _ = generate(GenerationSettings(prompt=prompt, negative_prompt=PORTRAIT_NEGATIVE, seed=settings.seed,
                                            steps=settings.steps, width=width, height=height,
                                            dtype=settings.sd_dtype), pipe)
    return fit_image(images[0], *settings.size)


def face_note(face):
    box = f"{face.w}x{face.h} at ({face.x}, {face.y})"
    if face.source == "detected":
        return f"face detected: {box}"
    return f"no face detected ({face.reason}), so the centred box {box} is used"


# -- the run folder ---------------------------------------------------------------------------------------------------

# -- the stages -------------------------------------------------------------------------------------------------------

class Stage:
    """One stage: its name, the files it writes (FILES), the stages whose files it reads (READS), the values it is
    made from (inputs) and how it makes its files (make: returns a line of detail for the log, or None)."""

    name = None

    @property
    def outputs(self):
        return FILES[self.name]

    @property
    def reads(self):
        return READS[self.name]

    def inputs(self, run):
        return {f: file_sha256(run.folder.path(f)) for stage in self.reads for f in FILES[stage]}

    def make(self, run):
        raise NotImplementedError

    def finish_external(self, run):
        """What the stage writes besides its first file when an external command made that one."""


class ScriptStage(Stage):
    name = "script"

    def inputs(self, run):
        settings = run.settings
        if settings.script is not None:
            return {"given": read_script(settings.script), "words": settings.words}
        return {"prompt": script_prompt(settings.topic, settings.words), "chatglm": settings.chatglm_identity()}

    def make(self, run):
        settings, path = run.settings, run.folder.path("script.txt")
        if settings.script is not None:
            text, how = read_script(settings.script), f"given: {settings.script}"
            if count_words(text) > settings.words:
                run.note(f"note: the script has {count_words(text)} words, more than --words {settings.words}; "
                         "it is read as written")
        else:
            text, note = write_script(settings.topic, settings.words, run.llm or chatglm(settings))
            how = "template" if note else "ChatGLM"
            if note:
                run.note(note)
        with atomic_path(path) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
        return f"{how}, {count_words(text)} words"

    def finish_external(self, run):
        read_script(run.folder.path("script.txt"), "script")


class PortraitStage(Stage):
    name = "portrait"

    def inputs(self, run):
        settings = run.settings
        if settings.portrait is not None:
            return {"portrait": file_sha256(settings.portrait), "size": settings.size}
        return {"prompt": PORTRAIT_PROMPT.format(topic=settings.topic or "a short talk"), "size": settings.size,
                "seed": settings.seed, "steps": settings.steps, "pipeline": settings.pipeline_identity()}

    def make(self, run):
        from glm_tune.sd_lora import open_image

        settings = run.settings
        if settings.portrait is not None:
            image, how = fit_image(open_image(settings.portrait), *settings.size), f"given: {settings.portrait}"
        else:
            image, how = paint_portrait(settings, run.pipe or sd_pipeline(settings)), "painted"
        with atomic_path(run.folder.path("portrait.png")) as tmp:
            image.save(tmp, format="PNG")
        face = self.finish_external(run)
        return f"{how}; {face_note(face)}" if face.source == "detected" else how

    def finish_external(self, run):
        from glm_tune.sd_lora import open_image
        from glm_tune.talking_head import detect_face

        path = run.folder.path("portrait.png")
        image = open_image(path)
        if image.size != tuple(run.settings.size):
            image = fit_image(image, *run.settings.size)
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
        face = detect_face(image)
        write_json(run.folder.path("face.json"), face.to_json())
        if face.source != "detected":
            run.note(f"note: {face_note(face)}")
        return face


class VoiceStage(Stage):
    name = "voice"

    def inputs(self, run):
        ref = run.settings.voice_ref
        return {**super().inputs(run), "voice_ref": file_sha256(ref) if ref else None}

    def make(self, run):
        from glm_tune import voice

        text = read_script(run.folder.path("script.txt"), "script.txt")
        settings, report = voice.VoiceSettings(), None
        if run.settings.voice_ref is not None:
            settings, report = voice.match_voice(run.settings.voice_ref, text, settings)
        voice.synthesize(text, run.folder.path("voice.wav"), settings)
        seconds = voice.duration(run.folder.path("voice.wav"))
        write_json(run.folder.path("voice.json"), {"source": "built-in", "settings": plain(asdict(settings)),
                                                   "match": report, "seconds": seconds})
        return f"{seconds:.2f} s" + (", matched to --voice_ref" if report is not None else "")

    def finish_external(self, run):
        from glm_tune import voice

        voice.read_wav(run.folder.path("voice.wav"), "voice.wav")
        seconds = voice.duration(run.folder.path("voice.wav"))
        write_json(run.folder.path("voice.json"), {"source": "external", "seconds": seconds})


class MotionStage(Stage):
    name = "motion"

    def inputs(self, run):
        from glm_tune.talking_head import Motion

        return {**super().inputs(run), "fps": run.settings.fps, "frames": run.frame_count(),
                "motion": asdict(Motion(seed=run.settings.seed))}

    def make(self, run):
        from glm_tune.sd_lora import open_image
        from glm_tune.talking_head import FaceBox, Motion, motion_frames, write_video

        settings, folder = run.settings, run.folder
        face = FaceBox(**read_json(folder.path("face.json")))
        portrait = open_image(folder.path("portrait.png"))
        matrices = []

        def frames():
            for frame, matrix in motion_frames(portrait, face, run.frame_count(), settings.fps,
                                               Motion(seed=settings.seed)):
                matrices.append(matrix.round(4).tolist())
                yield frame

        count = write_video(frames(), folder.path("motion.mp4"), portrait.size, settings.fps)
        write_json(folder.path("motion.json"), {"source": "built-in", "fps": settings.fps, "frames": count,
                                                "matrices": matrices})
        return f"{count} frames at {settings.fps} fps"

    def finish_external(self, run):
        write_json(run.folder.path("motion.json"), {"source": "external", "matrices": None})


class LipSyncStage(Stage):
    name = "lipsync"

    def inputs(self, run):
        return {**super().inputs(run), "fps": run.settings.fps}

    def make(self, run):
        import cv2
        import numpy as np

        from glm_tune import voice
        from glm_tune.talking_head import (FINAL_CRF, FaceBox, draw_mouth, mouth_openings, read_video,
                                           write_video)

        settings, folder = run.settings, run.folder
        face = FaceBox(**read_json(folder.path("face.json")))
        samples, rate = voice.read_wav(folder.path("voice.wav"), "voice.wav")
        envelope = np.asarray(voice.loudness_envelope(samples, rate, settings.fps), dtype=np.float64)
        openings = mouth_openings(envelope, face)
        motion_fps, _, motion = read_video(folder.path("motion.mp4"))
        motion = list(motion)
        if not motion:
            raise UserError(f"{folder.path('motion.mp4')}: holds no frames; --redo motion")
        matrices = read_json(folder.path("motion.json")).get("matrices") or None
        size = tuple(settings.size)

        def frames():
            for index, opening in enumerate(openings):
                # the motion loops when it is shorter than the voice (an external one may be), by time not index
                source = int(index / settings.fps * motion_fps) % len(motion)
                frame = motion[source]
                if frame.shape[1::-1] != size:
                    frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
                matrix = np.array(matrices[source]) if matrices and source < len(matrices) else None
                yield draw_mouth(frame.copy(), face, opening, matrix)

        count = write_video(frames(), folder.path("lipsync.mp4"), size, settings.fps, crf=FINAL_CRF)
        write_json(folder.path("mouth.json"), {"source": "built-in", "fps": settings.fps, "frames": count,
                                               "max_opening": face.mouth()[2], "envelope": envelope.round(4).tolist(),
                                               "opening": openings.round(3).tolist()})
        return f"{count} frames, the mouth opening with the voice"

    def finish_external(self, run):
        write_json(run.folder.path("mouth.json"), {"source": "external", "opening": None})


class MuxStage(Stage):
    name = "mux"

    def make(self, run):
        from glm_tune.talking_head import mux

        mux(run.folder.path("lipsync.mp4"), run.folder.path("voice.wav"), run.folder.path("talk.mp4"))
        return "H.264 + AAC"


BUILT_IN = {stage.name: stage for stage in (ScriptStage(), PortraitStage(), VoiceStage(), MotionStage(),
                                            LipSyncStage(), MuxStage())}


# -- external commands ------------------------------------------------------------------------------------------------

FILE_PLACEHOLDERS = {"script": "script.txt", "portrait": "portrait.png", "face": "face.json", "voice": "voice.wav",
                     "motion": "motion.mp4", "lipsync": "lipsync.mp4"}
PLACEHOLDERS = {"python", "out_dir", "topic", "words", "fps", "width", "height", "seed", "voice_ref",
                *FILE_PLACEHOLDERS}


@dataclass
class ExternalCommand:
    """A stage routed to a command: `command` (argument templates), the file it writes (`output`, a template; by
    default the stage's own file, which the command is then given as its placeholder) and its working folder."""

    stage: str
    command: list
    output: str | None = None
    cwd: str | None = None

    def values(self, run, own):
        settings, folder = run.settings, run.folder
        values = {name: str(folder.path(f).resolve()) for name, f in FILE_PLACEHOLDERS.items()}
        values.update(python=sys.executable, out_dir=str(folder.dir.resolve()), topic=settings.topic or "",
                      words=settings.words, fps=settings.fps, width=settings.size[0], height=settings.size[1],
                      seed=settings.seed, voice_ref=str(Path(settings.voice_ref).resolve()) if settings.voice_ref
                      else "")
        values[Path(FILES[self.stage][0]).stem] = str(own)
        return values


class ExternalStage(Stage):
    """A built-in stage whose first file an external command writes instead; the stage's other files (the face box,
    the records) are still written by the built-in stage."""

    def __init__(self, built_in, external):
        self.built_in, self.external = built_in, external
        self.name = built_in.name

    def inputs(self, run):
        ext = self.external
        return {**self.built_in.inputs(run), "external": {"command": ext.command, "output": ext.output}}

    def make(self, run):
        ext, target = self.external, run.folder.path(self.outputs[0])
        with atomic_path(target) as tmp:
            values = ext.values(run, tmp)
            args = [arg.format_map(values) for arg in ext.command]
            expected = Path(ext.output.format_map(values)) if ext.output else tmp
            if expected != tmp:
                expected.unlink(missing_ok=True)  # not an earlier run's
            else:
                tmp.unlink()  # so that "wrote nothing" is seen
            try:
                result = subprocess.run(args, capture_output=True, text=True, cwd=ext.cwd)
            except OSError as err:
                raise UserError(f"{self.name}: the external command {args[0]} could not start ({err.strerror})") \
                    from None
            if result.returncode != 0:
                tail = (result.stderr.strip().splitlines() or ["no error output"])[-1]
                raise UserError(f"{self.name}: the external command failed (exit status {result.returncode}): {tail}")
            if not expected.is_file():
                raise UserError(f"{self.name}: the external command wrote no {expected}")
            if expected != tmp:
                shutil.move(expected, tmp)
            check_output(self.name, tmp)
        self.built_in.finish_external(run)
        return f"external: {shlex.join(args[:1])}"


def check_output(stage, path):
    """An external command's file must be what the stage's is: a script, an image, a WAV, a video."""
    if stage == "script":
        read_script(path, f"{stage}: the external command's file")
    elif stage == "portrait":
        from glm_tune.sd_lora import open_image

        try:
            open_image(path)
        except UserError as err:
            raise UserError(f"{stage}: the external command's file {err}") from None
    elif stage == "voice":
        from glm_tune import voice

        voice.read_wav(path, f"{stage}: the external command's file")
    else:
        from glm_tune.talking_head import streams

        if not any(kind == "video" for kind, _ in streams(path)):
            raise UserError(f"{stage}: the external command's file {path} holds no video stream")


def read_stage_config(path, flag="--stage_config"):
    """{stage: ExternalCommand} from a .json or .toml file, one table per stage:

        [voice]
        command = "python /opt/CosyVoice/tts.py --text_file {script} --prompt_wav {voice_ref} --out {voice}"
        output = "{voice}"     # optional: where the command writes its file (default: the stage's placeholder)
        cwd = "/opt/CosyVoice"  # optional

    `command` is a string (split like a shell line, without a shell) or a list of arguments; the placeholders are
    the run's files by name ({script} {portrait} {face} {voice} {motion} {lipsync} and their .json records), and
    {voice_ref} {out_dir} {topic} {words} {fps} {width} {height} {seed} {python}. Every mistake is one line, and a
    command that is not installed is found here, before any stage runs."""
    import tomllib

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{flag} {path}: cannot read it as {'TOML' if path.suffix == '.toml' else 'JSON'} "
                        f"({first_line(err)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{flag} {path}: not a table of stages")
    externals = {}
    for stage, entry in data.items():
        where = f"{flag} {path}: {stage}"
        if stage not in ROUTABLE:
            raise UserError(f"{where}: not a stage that can be routed (choose from {', '.join(ROUTABLE)})")
        if not isinstance(entry, dict) or set(entry) - {"command", "output", "cwd"}:
            raise UserError(f"{where}: expected a table with command (and optional output, cwd)")
        command = entry.get("command")
        command = shlex.split(command) if isinstance(command, str) else command
        if not command or not all(isinstance(arg, str) for arg in command):
            raise UserError(f"{where}: command must be a non-empty string or list of strings")
        for template in [*command, entry.get("output") or ""]:
            for name in re.findall(r"{(\w*)}", template):
                if name not in PLACEHOLDERS:
                    raise UserError(f"{where}: unknown placeholder {{{name}}} (known: "
                                    f"{', '.join(sorted(PLACEHOLDERS))})")
        program = command[0].replace("{python}", sys.executable)
        cwd = entry.get("cwd")
        if cwd is not None and not Path(cwd).is_dir():
            raise UserError(f"{where}: cwd {cwd}: no such folder")
        found = shutil.which(program) or (cwd and shutil.which(str(Path(cwd, program))))
        if "{" in program or not found:
            raise UserError(f"{where}: command {program!r} not found")
        externals[stage] = ExternalCommand(stage, list(command), entry.get("output"), cwd)
    return externals


# -- the pipeline -----------------------------------------------------------------------------------------------------

@dataclass
class TalkRun:
    """What make_talk made or reused, stage by stage."""

    out_dir: Path
    settings: TalkSettings
    folder: RunFolder
    status: dict = field(default_factory=dict)  # stage -> "made" or "reused"
    notes: list = field(default_factory=list)
    llm: object = None
    pipe: object = None

    def note(self, line):
        self.notes.append(line)

    def frame_count(self):
        """ceil(voice seconds x fps): the video is never shorter than the voice, and longer by under a frame."""
        import math

        from glm_tune.voice import duration

        return max(1, math.ceil(round(duration(self.folder.path("voice.wav")) * self.settings.fps, 6)))

    def files(self):
        return {name: str(self.out_dir / name) for stage in STAGES for name in FILES[stage]}

    def summary(self):
        return {"files": self.files(), "stages": self.status, "notes": self.notes}


def stage_plan(settings):
    """The stages in order: each built-in one, or its external command where the config routes it."""
    return [ExternalStage(BUILT_IN[name], settings.externals[name]) if name in settings.externals
            else BUILT_IN[name] for name in STAGES]


def make_talk(settings, out_dir, redo=None, llm=None, pipe=None, log=None):
    """Every stage into `out_dir`, each reused when it can be (see the module docstring); returns a TalkRun.

    redo: a stage name, made again with every stage that reads it. llm, pipe: the ChatGLM and SD pipeline to use (a
    server passes those it keeps loaded); by default loaded from `settings`, and only when a stage needs them.
    log: called with one line per stage (its first file; made, reused or external) and with the notes."""
    settings.check()
    if redo is not None and redo not in STAGES:
        raise UserError(f"--redo {redo}: choose one of {', '.join(STAGES)}")
    out_dir = prepare_out_dir(out_dir)
    log = log or (lambda line: None)
    with hold_output_lock(out_dir, "--out"):
        run = TalkRun(out_dir, settings, RunFolder(out_dir, FILES), llm=llm, pipe=pipe)
        for stage in stage_plan(settings):
            forced = stage.name == redo or any(run.status.get(name) == "made" for name in stage.reads)
            inputs = stage.inputs(run)
            path = run.folder.path(stage.outputs[0])
            if not forced and run.folder.reusable(stage.name, inputs):
                run.status[stage.name] = "reused"
                log(f"{stage.name}: {path} (reused)")
                continue
            notes = len(run.notes)
            detail = stage.make(run)
            run.folder.made(stage.name, inputs)
            run.status[stage.name] = "made"
            log(f"{stage.name}: {path} (made{': ' + detail if detail else ''})")
            for line in run.notes[notes:]:
                log(line)
    return run
