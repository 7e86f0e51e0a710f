"""The voice stage of APP_example/digital_human: text -> voice.wav, offline, in Chinese and English, and the audio
measurements the other stages need (median F0, syllable rate, a per-video-frame loudness envelope).

    text --> language ------> espeak-ng voice --> 16-bit samples --> voice.wav
             (detect_language)  cmn / en, rate      (synth callback)     (written atomically)
                                and pitch from
                                VoiceSettings

Engine. eSpeak NG (formant synthesis), the library and its data (the Mandarin `cmn` and English `en` voices included)
from the PyPI package espeakng-loader, called through ctypes in synchronous mode: the engine hands each chunk of samples
to a callback, nothing is played and nothing is downloaded. It sounds robotic, but it is small, needs no model weights
and leaves torch alone. The engine is one per process (global state in the C library), so calls are serialised by a
lock and every call sets its voice, rate and pitch again; the file synthesize() writes is spoken by a fresh process
(see there), so that it is the same for the same text and settings.

Voice matching (match_voice) is not cloning: the timbre stays eSpeak's. Only two numbers are fitted to a reference
recording: the median F0 (espeak's pitch parameter, 0-99, and voice variant) and the syllable rate (espeak's words per
minute). Each is fitted by measuring the engine on the text itself at a few settings, interpolating to the
reference's value, and measuring the result again; the report says how close it came. The pitch parameter spans about
60-170 Hz in the default (male) voices and 120-310 Hz in the female variant f3 (measured on Chinese and English
sentences), so the pitch is fitted in both and the closer one kept; a reference outside 60-310 Hz is matched to the
nearer end and the report's f0_error shows it.

Measurements.
  median_f0       YIN (de Cheveigne & Kawahara 2002) in numpy, some forty lines instead of a compiled dependency
                  (pyworld, parselmouth): every 10 ms the cumulative mean normalised difference of a window one longest
                  period (1 / F0_MIN) long, at lags up to that period; its first dip below YIN_THRESHOLD (else its
                  minimum), refined by a parabola. A frame is voiced when it is loud enough (VOICED_LOUDNESS of the
                  loudest frame) and its dip is below VOICED_APERIODICITY; the median over voiced frames ignores the
                  few octave errors at voice onsets. Harmonic tones of 100-300 Hz in white noise measure within 0.6%
                  down to 10 dB SNR; at 5 dB those above 200 Hz fall an octave, and near 0 dB nothing counts as
                  voiced (a UserError): a reference recording should be clean speech.
  syllable_rate   peaks of the loudness envelope (RMS every 10 ms, smoothed by a 60 ms Hann window) that stand out by
                  SYLLABLE_PROMINENCE of the loudest and lie at least MIN_SYLLABLE_GAP apart, per second of speech from
                  the first to the last sound (pauses inside count: a speaking rate, not an articulation rate).
  loudness_envelope  RMS over each video frame's own slice of samples, divided by the loudest frame's: 0 is silence,
                  1 the loudest frame; the lip-sync stage opens the mouth by it.
"""

import ctypes
import functools
import json
import math
import subprocess
import sys
import threading
import wave
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from glm_tune.atomic import atomic_path
from glm_tune.errors import UserError, first_line

LANGUAGES = ("zh", "en")
ESPEAK_VOICES = {"zh": "cmn", "en": "en"}
ENGINE_HINT = "pip install espeakng-loader (APP_example/requirements.txt; bash setup.sh installs it)"
DEFAULT_RATE_WPM = 175  # espeak-ng's defaults, what VoiceSettings' None means
DEFAULT_PITCH = 50
RATE_RANGE = (80, 450)  # words per minute espeak-ng accepts
PITCH_RANGE = (0, 99)
PITCH_PROBES = (0, 50, 99)
RATE_PROBES = (120, 175, 260)
MATCH_VARIANTS = (None, "f3")  # the default (male) voice reaches ~60-170 Hz, the female f3 ~120-310 Hz (measured)
CALIBRATION_CHARS = 120  # match_voice measures the engine on at most this much of the text: a long script adds time
#                          but no accuracy, the numbers being per second

# median_f0
F0_MIN, F0_MAX = 60.0, 500.0  # Hz: below a bass's speaking voice to above a child's
YIN_THRESHOLD = 0.1
VOICED_APERIODICITY = 0.25
VOICED_LOUDNESS = 0.05
HOP_SECONDS = 0.010

# syllable_rate
SMOOTH_SECONDS = 0.060
SYLLABLE_PROMINENCE = 0.08
MIN_SYLLABLE_GAP = 0.100  # s: nobody speaks more than 10 syllables a second
SOUND_LEVEL = 0.05  # the speech span runs from the first to the last envelope value above this share of the loudest


@dataclass
class VoiceSettings:
    """How the engine speaks. language "auto" picks zh or en from the text; rate_wpm (espeak words per minute) and
    pitch (espeak 0-99) None mean the engine's defaults; variant is an espeak-ng voice variant (None: the default,
    male; "f3": a female one, an octave higher); sample_rate is what the engine gives, not a choice."""
    language: str = "auto"
    rate_wpm: int | None = None
    pitch: int | None = None
    variant: str | None = None
    sample_rate: int = 22050


# ---------------------------------------------------------------- text -> language

# Han characters: the unified block, extension A, compatibility ideographs, extensions B-F
_HAN_BLOCKS = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x20000, 0x2FFFF))


def _is_cjk(char):
    return any(low <= ord(char) <= high for low, high in _HAN_BLOCKS)


def detect_language(text):
    """"zh" when CJK characters are at least as many as Latin letters (one Han character is a syllable, so a Chinese
    sentence with "ChatGLM" in it stays Chinese), else "en"."""
    cjk = sum(_is_cjk(ch) for ch in text)
    latin = sum(ch.isascii() and ch.isalpha() for ch in text)
    return "zh" if cjk and cjk >= latin else "en"


# ---------------------------------------------------------------- the engine

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # without it espeak-ng calls exit() when its data is missing
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH = 1, 3  # espeak_PARAMETER
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Engine:
    """The espeak-ng library, initialised once; synth() is serialised (the library keeps one global state)."""

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError as err:
            raise UserError(f"text-to-speech: the espeak-ng engine is not installed ({ENGINE_HINT})") from err
        try:
            self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
            data = espeakng_loader.get_data_path()
        except (OSError, RuntimeError) as err:
            raise UserError(f"text-to-speech: cannot load espeak-ng ({first_line(err)}; {ENGINE_HINT})") from err
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                          ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(),
                                                      _INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise UserError(f"text-to-speech: espeak-ng did not start with its data in {data} ({ENGINE_HINT})")
        self.variants = sorted(path.name for path in (Path(data) / "voices" / "!v").iterdir())
        self._chunks = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept on self: the C library holds only a raw pointer
        self.lib.espeak_SetSynthCallback(self._callback)
        self._lock = threading.Lock()

    def _collect(self, samples, count, events):
        if samples and count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, (count,)).copy())
        return 0  # 0: go on synthesising

    def synth(self, text, voice, rate_wpm, pitch):
        """The samples (int16) of `text` spoken by espeak voice `voice`."""
        data = text.encode("utf-8") + b"\0"
        with self._lock:
            self._chunks = []
            steps = [("voice", self.lib.espeak_SetVoiceByName(voice.encode())),
                     ("rate", self.lib.espeak_SetParameter(_RATE, rate_wpm, 0)),
                     ("pitch", self.lib.espeak_SetParameter(_PITCH, pitch, 0)),
                     ("synthesis", self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None,
                                                          None))]
            self.lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        for step, code in steps:
            if code != 0:  # espeak_ERROR: 0 is EE_OK
                raise UserError(f"text-to-speech: espeak-ng failed at {step} (voice {voice}, error code {code})")
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


@functools.cache
def _engine():
    return _Engine()


def _resolved(text, settings):
    """settings with language, rate and pitch filled in (auto -> detected, None -> the engine's default)."""
    settings = settings or VoiceSettings()
    language = detect_language(text) if settings.language == "auto" else settings.language
    if language not in LANGUAGES:
        raise UserError(f"--language: {language!r} is not one of auto, {', '.join(LANGUAGES)}")
    rate = DEFAULT_RATE_WPM if settings.rate_wpm is None else int(settings.rate_wpm)
    pitch = DEFAULT_PITCH if settings.pitch is None else int(settings.pitch)
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise UserError(f"--rate: {rate} words per minute is outside {RATE_RANGE[0]}-{RATE_RANGE[1]}")
    if not PITCH_RANGE[0] <= pitch <= PITCH_RANGE[1]:
        raise UserError(f"--pitch: {pitch} is outside {PITCH_RANGE[0]}-{PITCH_RANGE[1]}")
    if settings.variant is not None and settings.variant not in _engine().variants:
        # espeak-ng would speak an unknown variant in the default voice without a word: say so instead
        raise UserError(f"--voice_variant: {settings.variant!r} is not an espeak-ng voice variant (f1-f5, m1-m8, ...)")
    return replace(settings, language=language, rate_wpm=rate, pitch=pitch, sample_rate=_engine().sample_rate)


def _speak(text, settings):
    """(float32 samples in [-1, 1], sample rate) of `text` spoken with resolved `settings`."""
    voice = ESPEAK_VOICES[settings.language] + (f"+{settings.variant}" if settings.variant else "")
    samples = _engine().synth(text, voice, settings.rate_wpm, settings.pitch)
    if not samples.size or not np.any(samples):
        raise UserError(f"text-to-speech: espeak-ng gave no sound for {text[:40]!r} (voice {voice})")
    return samples.astype(np.float32) / 32768.0, settings.sample_rate


def synthesize(text, out_path, settings=None):
    """Speak `text` into `out_path`, a mono 16-bit WAV at the engine's rate, written atomically.

    eSpeak NG carries state from one utterance to the next inside a process (the same text and settings come out a
    few samples longer or shorter, and different, on every call), so the file is spoken by a fresh Python process:
    the same text and settings give the same bytes, in any process, which is what lets a pipeline tell a changed
    voice from an unchanged one. The measurements of match_voice run in this process; a few samples do not move them."""
    text = (text or "").strip()
    if not text:
        raise UserError("--script: empty text, nothing to speak")
    settings = _resolved(text, settings)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        payload = json.dumps({"text": text, "settings": asdict(settings), "out": str(tmp)}, ensure_ascii=False)
        done = subprocess.run([sys.executable, "-c", "import sys, glm_tune.voice as v; v._speak_into(sys.stdin.read())"],
                              input=payload, capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no message"]
            raise UserError(lines[-1].removeprefix("error: "))
    return out_path


def _speak_into(payload):
    """The fresh process of synthesize(): speak the JSON payload's text into its file; a UserError is its last line."""
    job = json.loads(payload)
    try:
        samples, rate = _speak(job["text"], VoiceSettings(**job["settings"]))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    _write_wav(job["out"], samples, rate)


def _write_wav(path, samples, sample_rate):
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(int(sample_rate))
        out.writeframes(pcm.tobytes())


# ---------------------------------------------------------------- WAV files

def _open_wav(path, flag):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        return wave.open(str(path), "rb")
    except (wave.Error, EOFError, OSError, ValueError, RuntimeError) as err:  # a damaged header raises any of them
        raise UserError(f"{flag} {path}: not a WAV audio file ({first_line(err)}; PCM WAV expected)") from None


def read_wav(path, flag="--voice_ref"):
    """(float32 mono samples in [-1, 1], sample rate) of a PCM WAV (8, 16, 24 or 32-bit, channels averaged)."""
    with _open_wav(path, flag) as wav:
        channels, width, rate, frames = wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()
        raw = wav.readframes(frames)
    if frames == 0 or not raw:
        raise UserError(f"{flag} {path}: a WAV with no samples")
    raw = raw[: len(raw) // (width * channels) * width * channels]  # a truncated last frame is dropped
    if width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:  # no 24-bit numpy type: widen to 32 bits, the sample in the top three bytes
        bytes3 = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        wide = np.zeros((len(bytes3), 4), np.uint8)
        wide[:, 1:] = bytes3
        samples = wide.view("<i4").ravel().astype(np.float32) / 2.0 ** 31
    elif width == 4:
        samples = np.frombuffer(raw, "<i4").astype(np.float32) / 2.0 ** 31
    else:
        raise UserError(f"{flag} {path}: not a WAV audio file ({8 * width}-bit samples; PCM WAV expected)")
    return samples.reshape(-1, channels).mean(axis=1).astype(np.float32), rate


def duration(path, flag="--audio"):
    """Seconds of audio in a WAV file (from its header)."""
    with _open_wav(path, flag) as wav:
        return wav.getnframes() / wav.getframerate()


# ---------------------------------------------------------------- measurements

def _frames(samples, length, hop):
    """Overlapping frames (rows) of `length` samples every `hop`, the signal zero-padded to fill the last one."""
    count = max(1, 1 + math.ceil((len(samples) - length) / hop))
    padded = np.zeros((count - 1) * hop + length, np.float32)
    padded[: len(samples)] = samples[: len(padded)]
    return np.lib.stride_tricks.sliding_window_view(padded, length)[::hop][:count]


def _yin(samples, sample_rate):
    """Per frame: (f0 in Hz, aperiodicity = the CMNDF at the chosen lag, RMS)."""
    tau_min, tau_max = int(sample_rate / F0_MAX), int(math.ceil(sample_rate / F0_MIN))
    window = tau_max  # the difference sums over one period of the lowest pitch
    hop = max(1, int(sample_rate * HOP_SECONDS))
    frames = _frames(np.asarray(samples, np.float32), window + tau_max, hop).astype(np.float64)
    n_fft = 1 << (2 * (window + tau_max) - 1).bit_length()
    # d(tau) = sum_j (x_j - x_{j+tau})^2 over j < window = E(0) + E(tau) - 2 r(tau), r by FFT cross-correlation
    head = np.fft.rfft(frames[:, :window], n_fft)
    whole = np.fft.rfft(frames, n_fft)
    corr = np.fft.irfft(np.conj(head) * whole, n_fft)[:, : tau_max + 1]
    squares = np.cumsum(np.pad(frames ** 2, ((0, 0), (1, 0))), axis=1)
    energy = squares[:, window: window + tau_max + 1] - squares[:, : tau_max + 1]  # E(tau), tau = 0..tau_max
    diff = np.maximum(energy[:, :1] + energy - 2 * corr, 0.0)
    # cumulative mean normalisation: d'(tau) = d(tau) * tau / sum_{k<=tau} d(k), d'(0) = 1
    taus = np.arange(tau_max + 1)
    cmndf = np.ones_like(diff)
    running = np.cumsum(diff[:, 1:], axis=1)
    cmndf[:, 1:] = diff[:, 1:] * taus[1:] / np.maximum(running, 1e-12)
    f0, aperiodicity = np.zeros(len(frames)), np.ones(len(frames))
    for i, row in enumerate(cmndf):
        search = row[tau_min: tau_max]
        below = np.flatnonzero(search < YIN_THRESHOLD)
        if below.size:  # the first dip under the threshold, followed down to its local minimum
            tau = below[0]
            while tau + 1 < len(search) and search[tau + 1] < search[tau]:
                tau += 1
        else:
            tau = int(np.argmin(search))
        tau += tau_min
        shift = 0.0
        if 0 < tau < tau_max:  # parabola through the three points round the dip: sub-sample lag
            a, b, c = row[tau - 1], row[tau], row[tau + 1]
            shift = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c > 0 else 0.0
        f0[i], aperiodicity[i] = sample_rate / (tau + shift), row[tau]
    rms = np.sqrt(np.mean(frames[:, :window] ** 2, axis=1))
    return f0, aperiodicity, rms


def median_f0(samples, sample_rate):
    """Median F0 in Hz over the voiced frames (YIN; see the module's docstring)."""
    samples = np.asarray(samples, np.float32)
    if samples.size:
        f0, aperiodicity, rms = _yin(samples, sample_rate)
        voiced = (rms >= VOICED_LOUDNESS * rms.max()) & (aperiodicity < VOICED_APERIODICITY) & (rms > 0)
        if voiced.any():
            return float(np.median(f0[voiced]))
    raise UserError(f"no voiced sound to measure a pitch on ({len(samples) / sample_rate:.2f} s of audio)")


def _smoothed_envelope(samples, sample_rate):
    """(RMS every HOP_SECONDS, smoothed by a SMOOTH_SECONDS Hann window, 0..1), frames per second."""
    hop = max(1, int(sample_rate * HOP_SECONDS))
    rms = np.sqrt(np.mean(_frames(np.asarray(samples, np.float32), 2 * hop, hop).astype(np.float64) ** 2, axis=1))
    kernel = np.hanning(max(3, int(round(SMOOTH_SECONDS / HOP_SECONDS)) + 2))[1:-1]
    smooth = np.convolve(rms, kernel / kernel.sum(), mode="same")
    peak = smooth.max()
    return (smooth / peak if peak > 0 else smooth), sample_rate / hop


def syllable_rate(samples, sample_rate):
    """Syllables per second: peaks of the smoothed loudness envelope per second of speech (module's docstring)."""
    from scipy.signal import find_peaks

    envelope, per_second = _smoothed_envelope(samples, sample_rate)
    sounding = np.flatnonzero(envelope > SOUND_LEVEL)
    if sounding.size < 2:
        raise UserError(f"no speech to measure a syllable rate on ({len(samples) / sample_rate:.2f} s of audio)")
    peaks, _ = find_peaks(envelope, prominence=SYLLABLE_PROMINENCE, height=SOUND_LEVEL,
                          distance=max(1, int(MIN_SYLLABLE_GAP * per_second)))
    span = (sounding[-1] - sounding[0] + 1) / per_second
    return float(max(len(peaks), 1) / span)


def loudness_envelope(samples, sample_rate, fps):
    """One value per video frame, ceil(duration * fps) of them: the RMS of the frame's slice of samples over the
    loudest frame's (0..1; all zeros for silence)."""
    samples = np.asarray(samples, np.float32)
    count = math.ceil(len(samples) * fps / sample_rate)
    edges = np.minimum(np.round(np.arange(count + 1) * sample_rate / fps).astype(int), len(samples))
    squares = np.concatenate([[0.0], np.cumsum(samples.astype(np.float64) ** 2)])
    widths = np.maximum(edges[1:] - edges[:-1], 1)
    rms = np.sqrt(np.maximum(squares[edges[1:]] - squares[edges[:-1]], 0.0) / widths)
    peak = rms.max() if count else 0.0
    return (rms / peak if peak > 0 else rms).astype(np.float32)


# ---------------------------------------------------------------- voice matching

def _fit(probe, probes, target, bounds):
    """The setting (an int within bounds) at which probe(setting) comes closest to `target`: probe at `probes`,
    interpolate the measured curve to the target, probe there, and once more from the refined curve. Returns the best
    (setting, measured value) seen."""
    seen = {setting: probe(setting) for setting in probes}
    for _ in range(2):
        points = sorted(seen.items(), key=lambda item: item[1])  # np.interp wants the measured values increasing
        setting = int(round(np.clip(np.interp(target, [v for _, v in points], [s for s, _ in points]), *bounds)))
        if setting in seen:
            break
        seen[setting] = probe(setting)
    return min(seen.items(), key=lambda item: abs(item[1] - target))


def match_voice(reference_path, text, settings=None):
    """"Voice matching": the pitch (and voice variant) and rate at which the engine speaking `text` has about the
    median F0 and the syllable rate of the recording at `reference_path`. Not cloning: the timbre stays the engine's.
    Returns the settings and a report: both numbers on the reference, on the matched output and on the unmatched
    default voice, and the relative errors. The engine is measured on the text's first CALIBRATION_CHARS characters."""
    text = (text or "").strip()
    if not text:
        raise UserError("--script: empty text, nothing to speak")
    reference, reference_sr = read_wav(reference_path, "--voice_ref")
    try:
        reference_f0 = median_f0(reference, reference_sr)
        reference_rate = syllable_rate(reference, reference_sr)
    except UserError as err:
        raise UserError(f"--voice_ref {reference_path}: {err}") from err
    sample = text[:CALIBRATION_CHARS]
    base = _resolved(text, settings)

    fits = []  # (F0 error, not the default voice, variant, pitch), one per variant the pitch is fitted in
    for variant in (base.variant,) if base.variant else MATCH_VARIANTS:
        voiced = replace(base, variant=variant)
        pitch, f0 = _fit(lambda p: median_f0(*_speak(sample, replace(voiced, pitch=p))), PITCH_PROBES, reference_f0,
                         PITCH_RANGE)
        fits.append((abs(f0 - reference_f0), variant is not None, variant, pitch))
    _, _, variant, pitch = min(fits)  # the default voice on a tie
    base = replace(base, variant=variant, pitch=pitch)
    rate, _ = _fit(lambda r: syllable_rate(*_speak(sample, replace(base, rate_wpm=r))), RATE_PROBES, reference_rate,
                   RATE_RANGE)
    matched = replace(base, rate_wpm=rate)

    output = _speak(sample, matched)
    default = _speak(sample, replace(matched, variant=None, pitch=DEFAULT_PITCH, rate_wpm=DEFAULT_RATE_WPM))
    output_f0, output_rate, default_f0 = median_f0(*output), syllable_rate(*output), median_f0(*default)
    report = {
        "method": "voice matching: pitch and rate fitted to the reference's median F0 and syllable rate; not cloning",
        "language": matched.language, "variant": matched.variant, "pitch": matched.pitch, "rate_wpm": matched.rate_wpm,
        "reference_f0": reference_f0, "output_f0": output_f0, "default_f0": default_f0,
        "reference_rate": reference_rate, "output_rate": output_rate, "default_rate": syllable_rate(*default),
        "f0_error": abs(output_f0 - reference_f0) / reference_f0,
        "rate_error": abs(output_rate - reference_rate) / reference_rate,
        "default_f0_error": abs(default_f0 - reference_f0) / reference_f0,
        "measured_on_chars": len(sample),
    }
    return matched, report
