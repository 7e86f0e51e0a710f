"""The static-cache decoder behind --compile_decoding (glm_tune.static_decode, issue 16): in fp32 it computes
generate()'s tokens exactly (greedy, seeded sampling with every processor the scripts use, left padding, rows ending
at EOS), eager and compiled; generate() routes to it only the calls it supports; the chat and inference scripts give
the same answers with it."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from glm_tune import static_decode
from glm_tune.static_decode import StaticDecoder, enable_static_decoding
from test_generation import NEW, PAD, PROMPTS, greedy, left_pad, make_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = [dict(do_sample=False), dict(do_sample=True, temperature=0.8, top_p=0.7),
            dict(do_sample=True, top_k=20, repetition_penalty=1.3, min_new_tokens=4)]


@pytest.fixture(scope="module")
def model():
    return make_model(seed=11)


def both(model, decoder, seed=0, **kwargs):
    """(generate()'s sequences, the decoder's), each after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    with torch.inference_mode():
        reference = model.generate(**kwargs)
    torch.manual_seed(seed)
    with torch.inference_mode():
        return reference, decoder.generate(**kwargs)


@pytest.mark.parametrize("settings", SAMPLING, ids=["greedy", "top_p", "top_k+penalty"])
def test_eager_static_decoding_computes_generates_tokens(model, settings):
    decoder = StaticDecoder(model, "eager")
    ids, mask = left_pad(PROMPTS)
    for rows in (slice(1, 2), slice(0, 3)):  # one row, and three left-padded rows
        reference, got = both(model, decoder, seed=3, input_ids=ids[rows], attention_mask=mask[rows],
                              max_new_tokens=NEW, **settings)
        assert reference.shape == (rows.stop - rows.start, ids.shape[1] + NEW)
        assert torch.equal(got, reference)
    assert len(set(reference[0, ids.shape[1]:].tolist())) >= 4  # a real sequence, not one repeated token


def test_rows_that_reach_eos_end_with_padding_as_in_generate(model):
    ids, mask = left_pad(PROMPTS)
    eos = int(greedy(model, ids, mask)[0, 3])  # row 0's fourth token: row 0 ends there, the others go on (or not)
    reference, got = both(model, StaticDecoder(model, "eager"), input_ids=ids, attention_mask=mask,
                          max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    assert reference[0, ids.shape[1] + 4:].eq(PAD).all()
    assert torch.equal(got, reference)
    # every row ended: both stop before max_new_tokens
    short, got = both(model, StaticDecoder(model, "eager"), input_ids=ids[:1], attention_mask=mask[:1],
                      max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    assert short.shape[1] == ids.shape[1] + 4 and torch.equal(got, short)


def test_compiled_static_decoding_computes_generates_tokens(model):
    decoder = StaticDecoder(model, "default")
    ids, mask = left_pad(PROMPTS)
    for settings in SAMPLING[:2]:
        reference, got = both(model, decoder, seed=5, input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                              **settings)
        assert torch.equal(got, reference)


def test_bf16_static_decoding_follows_generate_within_bf16_tolerance():
    """bf16: the static step attends over masked slots of a longer cache, so its sums may round differently; the
    first new token's logits agree to bf16 precision and the greedy tokens are the same on this model."""
    model = make_model(seed=12).to(torch.bfloat16)
    ids, mask = left_pad(PROMPTS)
    decoder = StaticDecoder(model, "eager")
    reference, got = both(model, decoder, input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(got, reference)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=token, attention_mask=torch.cat((mask, torch.ones_like(token)), 1), cache=out.cache)
        seen = []
        real = static_decode.decode_logits

        def spy(*args):
            seen.append(real(*args))
            return seen[-1]

        decoder.step = spy
        decoder.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    torch.testing.assert_close(seen[0], step.logits[:, -1].float(), rtol=0.02, atol=0.05)


def test_generate_routes_supported_calls_to_the_decoder_and_the_rest_to_generate(model, monkeypatch):
    plain = make_model(seed=11)
    enable_static_decoding(model, "eager")
    calls = []
    real = StaticDecoder.generate
    monkeypatch.setattr(StaticDecoder, "generate", lambda self, **kw: calls.append(kw) or real(self, **kw))
    try:
        ids, mask = left_pad(PROMPTS)
        assert torch.equal(greedy(model, ids, mask), greedy(plain, ids, mask)) and len(calls) == 1
        with torch.inference_mode():
            beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2)
            scored = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, output_scores=True,
                                    return_dict_in_generate=True)
            prefix = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, past_key_values=DynamicCache())
        assert len(calls) == 1  # beams, returned scores and a given cache went to generate() itself
        with torch.inference_mode():
            assert torch.equal(beams, plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2))
        assert scored.scores and prefix.shape == (3, ids.shape[1] + 4)
    finally:
        del model.static_decoder


def test_unknown_compile_mode_is_refused(model):
    with pytest.raises(ValueError, match="compile mode 'fast'"):
        StaticDecoder(model, "fast")
    assert enable_static_decoding(model, "off") is model and not hasattr(model, "static_decoder")


def test_chat_and_inference_scripts_answer_the_same_with_static_decoding(capsys):
    import cli_chat
    import inference

    answers = {}
    for mode in ("off", "eager"):
        out = io.StringIO()
        cli_chat.main(["--no-do_sample", "--max_length", "40", "--dtype", "fp32", "--compile_decoding", mode],
                      stdin=io.StringIO("你好\n再说一遍\nstop\n"), out=out)
        answers[mode] = out.getvalue()
    assert answers["eager"] == answers["off"] and len(answers["off"]) > 20
    for mode in ("off", "eager"):
        capsys.readouterr()
        inference.main(["--compile_decoding", mode, "--dtype", "fp32", "--max_new_tokens", "8"])
        answers[mode] = capsys.readouterr().out
    assert answers["eager"] == answers["off"] and answers["off"].count(" -> ") >= 5


def test_bench_static_decode_runs_and_checks_the_tokens():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_static_decode.py"), "--config", "small",
                             "--dtype", "fp32", "--threads", "1", "--compile", "--batch_sizes", "1", "2",
                             "--new_tokens", "6", "--rounds", "1", "--prompt_len", "8"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bs=2 static: ms per token" in result.stdout and "tokens as generate: 100%" in result.stdout
