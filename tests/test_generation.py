"""Generation and training-time behaviour of the fast model, each checked against an independent computation:
cached vs uncached, batched (left-padded) vs single, streamed vs generate(), checkpointed vs plain gradients,
derived masks vs the official dense mask, fp32 vs half precision."""

import threading
import time

import pytest
import torch

from configuration_chatglm import ChatGLMConfig
from modeling_chatglm import (ChatGLMForConditionalGeneration, build_chat_prompt, continue_positions,
                              get_position_ids)
from tokenization_chatglm import ChatGLMTokenizer

VOCAB, MASK, GMASK, SOP, EOP, PAD = 300, 290, 291, 294, 295, 3


def make_model(seed=0, **overrides):
    """A small untied model with weights wide enough that greedy decoding does not collapse to one token."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_layers=3, num_attention_heads=4, inner_hidden_size=256,
               bos_token_id=SOP, eos_token_id=EOP, pad_token_id=PAD, mask_token_id=MASK, gmask_token_id=GMASK,
               tie_word_embeddings=False)
    model = ChatGLMForConditionalGeneration(ChatGLMConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" not in name:
                p.normal_(0, 0.1)
    return model


def prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 280, (n,), generator=g).tolist() + [GMASK, SOP]


def left_pad(rows):
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


PROMPTS = [prompt(5, 1), prompt(11, 2), prompt(8, 3)]
NEW = 12


@pytest.fixture(scope="module")
def model():
    return make_model()


def greedy(model, ids, mask=None, **kw):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kw)
    return out[:, ids.shape[1]:]


def test_positions_follow_the_v11_rule_from_each_rows_first_real_token(model):
    ids, mask = left_pad([[10, 11, GMASK, SOP, 20, 21], [12, GMASK, SOP]])
    pos = get_position_ids(ids, model.config, mask)
    assert pos[0].tolist() == [[0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3]]
    assert pos[1, :, 3:].tolist() == [[0, 1, 1], [0, 0, 1]]
    # [MASK] in the middle (no [gMASK]) freezes positions at the [MASK]; no <sop> means plain positions
    pos = get_position_ids(torch.tensor([[10, MASK, 11, SOP, 20], [10, 11, 12, 13, 14]]), model.config)
    assert pos[0].tolist() == [[0, 1, 2, 1, 1], [0, 0, 0, 1, 2]]
    assert pos[1].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_positions_continued_chunk_by_chunk_equal_those_of_whole_rows(model, split):
    rows = [[10, 11, GMASK, SOP, 20, 21, 22], [12, MASK, 13, SOP, 23], [14, 15, 16], [SOP, 24, 25, 26]]
    ids, mask = left_pad(rows)
    whole = get_position_ids(ids, model.config, mask)
    state, parts = None, []
    for start in range(0, ids.shape[1], split):
        part, state = continue_positions(ids[:, start:start + split], model.config,
                                         mask[:, start:start + split].bool(), state)
        parts.append(part)
    real = mask.bool()[:, None].expand_as(whole)
    assert torch.equal(torch.cat(parts, dim=-1)[real], whole[real])
    assert state[:, 0].tolist() == [len(r) for r in rows]


def test_decoding_without_position_ids_continues_from_the_cache(model):
    ids, mask = left_pad(PROMPTS)
    out = model(ids, attention_mask=mask, use_cache=True)
    rows, tokens = ids, []
    for _ in range(4):
        token = out.logits[:, -1:].argmax(-1)
        rows, mask = torch.cat((rows, token), 1), torch.cat((mask, torch.ones_like(token)), 1)
        out = model(token, attention_mask=mask, cache=out.cache, use_cache=True)  # no position_ids
        tokens.append(token)
    assert torch.equal(torch.cat(tokens, 1), greedy(model, ids, mask[:, :ids.shape[1]])[:, :4])
    torch.testing.assert_close(out.logits[:, -1], model(rows, attention_mask=mask).logits[:, -1], atol=1e-5, rtol=0)


def test_cached_and_uncached_greedy_generation_give_the_same_tokens(model):
    ids = torch.tensor([PROMPTS[1]])
    cached, uncached = greedy(model, ids), greedy(model, ids, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0].tolist())) >= 4  # a real sequence, not one repeated token


def test_the_growing_decode_cache_gives_uncached_tokens_across_regrowths(model, monkeypatch):
    import modeling_chatglm

    monkeypatch.setattr(modeling_chatglm, "CACHE_GROWTH", 0.05)  # regrow every few tokens
    monkeypatch.setattr(modeling_chatglm, "CACHE_SLACK", 1)
    grown = []
    real = modeling_chatglm.append_to_cache

    def spy(cache, layer_idx, k, v):
        before = getattr(cache.layers[layer_idx], "glm_buffers", None) if cache.layers else None
        out = real(cache, layer_idx, k, v)
        after = getattr(cache.layers[layer_idx], "glm_buffers", None)
        grown.append(after is not None and after is not before)
        assert after is None or out[0].data_ptr() == after[0].data_ptr()  # keys are a view of the buffer
        return out

    monkeypatch.setattr(modeling_chatglm, "append_to_cache", spy)
    ids, mask = left_pad(PROMPTS)
    with torch.inference_mode():
        cached = greedy(model, ids, mask)
    assert sum(grown) >= 3 * model.config.num_layers  # several regrowths per layer
    assert torch.equal(cached, greedy(model, ids, mask, use_cache=False))


def test_each_step_of_the_cache_equals_a_full_forward(model):
    ids = torch.tensor([PROMPTS[0] + [7, 8, 9, 10]])
    full = model(ids).logits
    prefix = len(PROMPTS[0])
    out = model(ids[:, :prefix], use_cache=True)
    steps = [out.logits[:, -1]]
    for t in range(prefix, ids.shape[1]):
        pos = get_position_ids(ids[:, : t + 1], model.config)[..., -1:]
        out = model(ids[:, t : t + 1], position_ids=pos, cache=out.cache, use_cache=True)
        steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, prefix - 1 :], atol=1e-5, rtol=0)


def test_left_padded_batch_gives_each_prompt_the_tokens_it_gets_alone(model):
    ids, mask = left_pad(PROMPTS)
    batched = greedy(model, ids, mask)
    for row, p in zip(batched, PROMPTS):
        assert torch.equal(row, greedy(model, torch.tensor([p]))[0])


def test_left_padded_prefill_logits_equal_single_row_logits(model):
    ids, mask = left_pad(PROMPTS)
    logits = model(ids, attention_mask=mask).logits
    for i, p in enumerate(PROMPTS):
        alone = model(torch.tensor([p])).logits[0]
        torch.testing.assert_close(logits[i, -len(p):], alone, atol=1e-5, rtol=0)


def test_beam_search_batched_and_uncached_match_single_cached(model):
    ids, mask = left_pad(PROMPTS[:2])
    batched = greedy(model, ids, mask, num_beams=3)
    for row, p in zip(batched, PROMPTS[:2]):
        single = greedy(model, torch.tensor([p]), num_beams=3)[0]
        assert torch.equal(row, single)
        assert torch.equal(single, greedy(model, torch.tensor([p]), num_beams=3, use_cache=False)[0])


def test_sampling_is_reproducible_under_a_seed(model):
    ids = torch.tensor([PROMPTS[2]])
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(ids, max_new_tokens=NEW, do_sample=True, top_p=0.9, temperature=1.0))
    assert torch.equal(*runs)


def test_stream_generate_matches_generate_and_stops_at_eos(model):
    ids, mask = left_pad(PROMPTS)
    steps = list(model.stream_generate(ids, mask, max_new_tokens=NEW, do_sample=False, eos_token_id=-1))
    assert len(steps) == NEW
    assert all(torch.equal(a, b[:, :-1]) for a, b in zip(steps, steps[1:]))  # each step appends one column
    assert torch.equal(steps[-1][:, ids.shape[1]:], greedy(model, ids, mask))
    # make the third generated token of row 0 the EOS: streaming stops there for that row
    eos = int(steps[-1][0, ids.shape[1] + 2])
    stopped = list(model.stream_generate(ids[:1], mask[:1], max_new_tokens=NEW, do_sample=False, eos_token_id=eos))
    assert stopped[-1].shape[1] == ids.shape[1] + 3 and int(stopped[-1][0, -1]) == eos


def test_stream_generate_samples_the_tokens_generate_samples_under_a_seed(model):
    ids = torch.tensor([PROMPTS[2]])
    sampling = dict(max_new_tokens=NEW, do_sample=True, top_p=0.9, temperature=1.3, top_k=0, eos_token_id=-1)
    torch.manual_seed(7)
    streamed = list(model.stream_generate(ids, **sampling))[-1]
    torch.manual_seed(7)
    assert torch.equal(streamed, model.generate(ids, **sampling))


def generating_threads():
    return [t for t in threading.enumerate() if t.name == "chatglm-generate"]


def test_an_error_while_streaming_is_raised_to_the_reader_and_the_thread_is_joined(model):
    calls = []

    def fail_on_third_forward(module, args, kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise RuntimeError("forward failed on step 3")

    handle = model.transformer.register_forward_pre_hook(fail_on_third_forward, with_kwargs=True)
    try:
        steps = []
        with pytest.raises(RuntimeError, match="forward failed on step 3"):
            for step in model.stream_generate(torch.tensor([PROMPTS[0]]), max_new_tokens=NEW, do_sample=False):
                steps.append(step)
    finally:
        handle.remove()
    assert len(steps) == 2 and calls == ["chatglm-generate"] * 3  # the two finished steps arrived first
    assert not generating_threads()


def test_closing_a_stream_early_stops_generation_and_joins_the_thread(model):
    forwards = []

    def slow_step(module, args, kwargs):  # 20 ms a step: 200 steps would take 4 s
        forwards.append(1)
        time.sleep(0.02)

    handle = model.transformer.register_forward_pre_hook(slow_step, with_kwargs=True)
    try:
        stream = model.stream_generate(torch.tensor([PROMPTS[0]]), max_new_tokens=200, do_sample=False,
                                       eos_token_id=-1)
        start = time.perf_counter()
        assert next(stream).shape[1] == len(PROMPTS[0]) + 1
        next(stream)
        stream.close()
        elapsed = time.perf_counter() - start
    finally:
        handle.remove()
    assert not generating_threads()
    assert len(forwards) < 50 and elapsed < 2  # generate() stopped at its next step, not after 200


def test_past_key_values_is_the_older_name_of_cache(model):
    ids = torch.tensor([PROMPTS[0] + [7]])
    prefix = len(PROMPTS[0])
    out = model(ids[:, :prefix], use_cache=True)
    pos = get_position_ids(ids, model.config)[..., -1:]
    old_name = model(ids[:, prefix:], position_ids=pos, past_key_values=out.cache, use_cache=True)
    assert old_name.cache is out.cache and out.cache.get_seq_length() == prefix + 1
    torch.testing.assert_close(old_name.logits[:, -1], model(ids).logits[:, -1], atol=1e-5, rtol=0)


def test_logits_to_keep_returns_the_last_positions(model):
    ids = torch.tensor([PROMPTS[1]])
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, model(ids).logits[:, -1:], atol=1e-6, rtol=0)


def test_official_dense_mask_input_equals_the_derived_mask(model):
    ids = torch.tensor([PROMPTS[0] + [7, 8]])
    n, sop = ids.shape[1], PROMPTS[0].index(SOP)
    hidden = torch.ones(n, n).tril()
    hidden[:, :sop] = 1
    dense = (hidden < 0.5)[None, None]  # the seed's collator: True = may not attend
    torch.testing.assert_close(model(ids, attention_mask=dense).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_identical_gradients():
    ids = torch.tensor([PROMPTS[1] + [7, 8, 9]])
    labels = ids.clone()
    labels[:, : len(PROMPTS[1])] = -100
    grads = []
    for checkpointing in (False, True):
        model = make_model(seed=5).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0, msg=name)


def test_ptuning_prefix_trains_only_the_prefix_and_generates_consistently():
    model = make_model(seed=3, pre_seq_len=4, prefix_projection=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    ids, mask = left_pad(PROMPTS[:2])
    batched = greedy(model, ids, mask)
    assert torch.equal(batched, greedy(model, ids, mask, use_cache=False))
    assert torch.equal(batched[1], greedy(model, torch.tensor([PROMPTS[1]]))[0])
    assert not torch.equal(batched, greedy(make_model(seed=3), ids, mask))  # the prefix does something


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_forward_stays_within_tolerance_of_fp32(dtype, tol):
    model = make_model(seed=7)
    ids, mask = left_pad(PROMPTS)
    ref = model(ids, attention_mask=mask).logits
    got = model.to(dtype)(ids, attention_mask=mask).logits.float()
    real = mask.bool()
    # relative to the logit scale: bf16 has 8 mantissa bits, fp16 has 11
    assert (got - ref)[real].abs().max() <= tol * ref[real].abs().max()


@pytest.fixture(scope="module")
def chat_model(make_checkpoint):
    folder = make_checkpoint("v1.1", ("safetensors",), hidden_size=64, num_layers=2, num_attention_heads=4,
                             inner_hidden_size=128)
    model = ChatGLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.manual_seed(0)
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))  # untie: varied tokens
    return model, ChatGLMTokenizer.from_pretrained(folder)


def test_chat_prompt_format():
    assert build_chat_prompt("你好") == "你好"
    assert build_chat_prompt("再见", [("你好", "你好！")]) == "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：再见\n答："


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_stream_chat_grows_prefixes_of_the_answer_and_ends_with_chats_answer(chat_model, do_sample):
    model, tokenizer = chat_model
    history = [("你好", "你好！有什么可以帮你？")]
    settings = dict(do_sample=do_sample, max_length=64, top_p=0.9, temperature=1.0)
    torch.manual_seed(11)
    answer, new_history = model.chat(tokenizer, "介绍一下你自己", history, **settings)
    torch.manual_seed(11)
    streamed = list(model.stream_chat(tokenizer, "介绍一下你自己", history, **settings))
    assert answer and streamed[-1] == (answer, new_history)
    assert new_history == history + [("介绍一下你自己", answer)]
    assert len(streamed) > 1 and all(answer.startswith(part.rstrip()) for part, _ in streamed)
    assert all(turns == history + [("介绍一下你自己", part)] for part, turns in streamed)
