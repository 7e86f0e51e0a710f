"""The voice stage (glm_tune/voice.py): espeak-ng speaks Chinese and English into a mono 16-bit WAV, offline; the
median F0 is within 3% on harmonic tones in noise (150, 220 Hz) and rises with the engine's pitch; voice matching
brings the output's median F0 within 15% of a reference's (synthesized ones, a male and a female one, and a 180 Hz
harmonic tone) where the default voice is further off; the loudness envelope has one value per video frame and follows
bursts; what is not a WAV, and empty text, are one-line UserErrors.
"""

import math
import wave

import numpy as np
import pytest

from glm_tune import voice
from glm_tune.errors import UserError
from glm_tune.voice import (VoiceSettings, detect_language, duration, loudness_envelope, match_voice, median_f0,
                            read_wav, syllable_rate, synthesize)

ZH_SHORT = "你好，世界。"
ZH_LONG = "你好，世界。今天天气很好，我们一起去公园散步吧。"
EN_SHORT = "Hello world."
EN_LONG = "Hello world. The weather is nice today, let us walk in the park."
SR = 22050


def harmonic_tone(f0, seconds=2.0, sample_rate=SR, noise=0.02, seed=0):
    """Five harmonics falling as 1/k, peak 0.3, plus white noise: a voiced vowel's spectrum, crudely."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    tone = sum(np.sin(2 * np.pi * f0 * k * t + k) / k for k in range(1, 6))
    tone = 0.3 * tone / np.abs(tone).max()
    return (tone + noise * np.random.default_rng(seed).standard_normal(len(t))).astype(np.float32)


def write_pcm16(path, samples, sample_rate=SR, channels=1):
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.mark.parametrize("language, short, long", [("zh", ZH_SHORT, ZH_LONG), ("en", EN_SHORT, EN_LONG)])
def test_synthesis_writes_a_mono_16_bit_wav_that_grows_with_the_text(tmp_path, language, short, long):
    assert detect_language(short) == detect_language(long) == language
    lengths = []
    for name, text in (("short", short), ("long", long)):
        path = synthesize(text, tmp_path / f"{name}.wav")
        with wave.open(str(path), "rb") as wav:
            assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 22050)
        samples, rate = read_wav(path)
        assert rate == 22050 and len(samples) / rate == pytest.approx(duration(path))
        assert np.sqrt(np.mean(samples ** 2)) > 0.02  # speech, not silence
        lengths.append(duration(path))
    assert 0.4 < lengths[0] and lengths[1] > 2 * lengths[0]
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside the WAVs


def test_language_detection_counts_han_characters_against_latin_letters():
    assert detect_language("用ChatGLM生成一段讲解视频") == "zh"
    assert detect_language("Fine-tune ChatGLM with LoRA, 很好") == "en"
    assert detect_language("12345") == "en"


def test_chinese_is_spoken_by_the_mandarin_voice_not_spelled_out_in_english(tmp_path):
    """The English voice reads Han characters as "Chinese letter ..." : several times longer than Mandarin."""
    zh = synthesize(ZH_SHORT, tmp_path / "zh.wav")
    spelled = synthesize(ZH_SHORT, tmp_path / "spelled.wav", VoiceSettings(language="en"))
    assert duration(spelled) > 1.8 * duration(zh)


@pytest.mark.parametrize("f0", [150.0, 220.0])
def test_median_f0_of_a_harmonic_tone_in_noise_is_within_3_percent(f0):
    assert median_f0(harmonic_tone(f0), SR) == pytest.approx(f0, rel=0.03)


def test_median_f0_rises_with_the_engines_pitch_setting(tmp_path):
    low = read_wav(synthesize(EN_LONG, tmp_path / "low.wav", VoiceSettings(pitch=20)))
    high = read_wav(synthesize(EN_LONG, tmp_path / "high.wav", VoiceSettings(pitch=80)))
    assert median_f0(*high) > 1.2 * median_f0(*low)  # measured ~76 vs ~140 Hz


def test_syllable_rate_follows_the_engines_speed(tmp_path):
    slow = read_wav(synthesize(ZH_LONG, tmp_path / "slow.wav", VoiceSettings(rate_wpm=120)))
    fast = read_wav(synthesize(ZH_LONG, tmp_path / "fast.wav", VoiceSettings(rate_wpm=260)))
    assert 1.5 < syllable_rate(*slow) < 3.5 and syllable_rate(*fast) > 1.7 * syllable_rate(*slow)  # ~2.4 and ~5.7


@pytest.mark.parametrize("make_reference", ["deeper_slower_male", "female", "tone_180hz"])
def test_voice_matching_brings_the_median_f0_within_15_percent_of_the_reference(tmp_path, make_reference):
    reference = tmp_path / "reference.wav"
    if make_reference == "deeper_slower_male":  # different text from the one matched: only F0 and rate carry over
        synthesize("春天来了，花都开了，小鸟在树上唱歌。", reference, VoiceSettings(pitch=85, rate_wpm=130))
    elif make_reference == "female":
        synthesize("Spring has come, the flowers are open and birds sing.", reference,
                   VoiceSettings(variant="f2", pitch=70, rate_wpm=220))
    else:  # four 0.25 s "syllables" a second at 180 Hz
        gate = (np.arange(int(3 * SR)) % (SR // 4)) < SR // 8
        write_pcm16(reference, harmonic_tone(180.0, seconds=3) * gate, channels=1)
    text = ZH_LONG if make_reference != "female" else EN_LONG

    settings, report = match_voice(reference, text)

    assert report["f0_error"] == pytest.approx(abs(report["output_f0"] / report["reference_f0"] - 1))
    assert report["f0_error"] < 0.15  # measured under 1% for all three
    assert report["default_f0_error"] > 0.25 > report["f0_error"]  # unmatched, the default voice is far off
    assert report["rate_error"] < 0.25
    # The settings reproduce the measured output. match_voice measures the text's first CALIBRATION_CHARS in this
    # process, whose eSpeak carries state from earlier utterances (other tests' included); synthesize() speaks the
    # whole text in a fresh process. Measured up to 1.2% apart (CI, 2026-12-03), so within 2%, and within 15% of the
    # reference like the measurement itself.
    out_f0 = median_f0(*read_wav(synthesize(text, tmp_path / "voice.wav", settings)))
    assert out_f0 == pytest.approx(report["output_f0"], rel=0.02)
    assert abs(out_f0 / report["reference_f0"] - 1) < 0.15


def test_loudness_envelope_has_one_value_per_video_frame_and_follows_bursts():
    fps = 25
    seconds = 2.03  # not a whole number of frames: the last, partial frame counts
    n = int(seconds * SR)
    assert len(loudness_envelope(np.zeros(n, np.float32), SR, fps)) == math.ceil(n / SR * fps) == 51
    assert not loudness_envelope(np.zeros(n, np.float32), SR, fps).any()  # silence stays closed

    # bursts of 200 ms every 400 ms, starting at 0: frames 0-4 loud, 5-9 quiet, ...
    t = np.arange(n)
    signal = np.where((t % int(0.4 * SR)) < int(0.2 * SR), harmonic_tone(150.0, seconds, noise=0), 0.0)
    envelope = loudness_envelope(signal + 0.001 * np.random.default_rng(1).standard_normal(n), SR, fps)
    assert envelope.min() >= 0 and envelope.max() == pytest.approx(1.0)
    frame_loud = ((np.arange(len(envelope)) * 40) % 400) < 200  # each frame's start, in ms
    assert envelope[frame_loud].min() > 0.8 and envelope[~frame_loud].max() < 0.05


def test_read_wav_turns_24_bit_stereo_into_float_mono(tmp_path):
    left, right = 0.5, -0.25
    frame = b"".join(int(v * 2 ** 23).to_bytes(3, "little", signed=True) for v in (left, right))
    with wave.open(str(tmp_path / "s24.wav"), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(3)
        out.setframerate(16000)
        out.writeframes(frame * 160)
    samples, rate = read_wav(tmp_path / "s24.wav")
    assert rate == 16000 and samples.shape == (160,) and samples.dtype == np.float32
    assert np.allclose(samples, (left + right) / 2)


@pytest.mark.parametrize("content", [b"this is a text file, not a recording\n", b"",
                                     b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 8,  # an MP3-ish blob
                                     b"RIFF\x24\x00\x00\x00WAVEfmt ",  # a WAV header cut short
                                     b"RIFF....WAVEnot really"])  # a malformed header: wave raises RuntimeError
def test_a_voice_reference_that_is_not_audio_is_one_clear_line(tmp_path, content):
    path = tmp_path / "reference.wav"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        match_voice(path, ZH_SHORT)
    message = str(err.value)
    assert message.startswith(f"--voice_ref {path}: not a WAV audio file (") and "\n" not in message


def test_a_silent_reference_and_empty_text_are_user_errors(tmp_path):
    write_pcm16(tmp_path / "silence.wav", np.zeros(SR, np.float32))
    with pytest.raises(UserError, match=r"^--voice_ref .*silence.wav: no voiced sound"):
        match_voice(tmp_path / "silence.wav", ZH_SHORT)
    with pytest.raises(UserError, match=r"^--script: empty"):
        synthesize("  \n", tmp_path / "voice.wav")
    with pytest.raises(UserError, match=r"^--voice_ref .*missing.wav: no such file"):
        read_wav(tmp_path / "missing.wav")
    assert not (tmp_path / "voice.wav").exists()


def test_an_unknown_voice_variant_and_an_engine_failure_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"^--voice_variant: 'no_such_variant' is not an espeak-ng voice variant"):
        synthesize(EN_SHORT, tmp_path / "voice.wav", VoiceSettings(variant="no_such_variant"))
    with pytest.raises(UserError, match=r"^text-to-speech: espeak-ng failed at voice \(voice zz_none, error code"):
        voice._engine().synth(EN_SHORT, "zz_none", 175, 50)
    assert duration(synthesize(EN_SHORT, tmp_path / "voice.wav")) > 0.4  # and the engine goes on working


def test_the_same_text_and_settings_give_the_same_file_whatever_was_spoken_before(tmp_path):
    """eSpeak NG drifts from one utterance to the next inside a process; synthesize() speaks in a fresh one."""
    first = synthesize(ZH_SHORT, tmp_path / "first.wav")
    synthesize(ZH_SHORT, tmp_path / "other.wav", VoiceSettings(variant="f3", pitch=80, rate_wpm=220))
    match_voice(first, ZH_SHORT)  # many utterances in this process
    again = synthesize(ZH_SHORT, tmp_path / "again.wav")
    assert first.read_bytes() == again.read_bytes()
