"""The training loss computed in chunks over the labelled positions (modeling_chatglm.chunked_lm_loss) against an
independent full-logits reference: lm_head on every hidden state, shift, one fp32 F.cross_entropy. Same loss, same
gradients, generation untouched, and a training step at 2048 x vocab 130528 needs at least one fp32 logits tensor
(1.07 GB) less memory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import modeling_chatglm
from configuration_chatglm import ChatGLMConfig
from modeling_chatglm import ChatGLMForConditionalGeneration, chunked_lm_loss

VOCAB, MASK, GMASK, SOP, EOP, PAD = 300, 290, 291, 294, 295, 3
REPO = Path(__file__).resolve().parents[1]


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=128,
               bos_token_id=SOP, eos_token_id=EOP, pad_token_id=PAD, mask_token_id=MASK, gmask_token_id=GMASK,
               tie_word_embeddings=False)
    model = ChatGLMForConditionalGeneration(ChatGLMConfig(**{**cfg, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" not in name:
                p.normal_(0, 0.1)
    return model


def training_batch():
    """Two rows `prompt [gMASK] <sop> answer <eop>`, right-padded as PrefixLMCollator; labels -100 up to <sop> and on
    padding. 9 + 6 = 15 labelled (shifted) tokens: not a multiple of the chunk sizes 2, 4 and 7."""
    g = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for prompt_len, answer_len in ((7, 8), (4, 5)):
        prompt = torch.randint(5, 280, (prompt_len,), generator=g).tolist() + [GMASK, SOP]
        answer = torch.randint(5, 280, (answer_len,), generator=g).tolist() + [EOP]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    assert int((labels[:, 1:] != -100).sum()) == 15
    return ids, mask, labels


def reference_loss(model, ids, mask, labels, num_items_in_batch=None):
    """Today's loss, independently: full fp32 logits on every position."""
    hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden).float()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="mean" if num_items_in_batch is None else "sum")
    return loss if num_items_in_batch is None else loss / num_items_in_batch


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.mark.parametrize("num_items_in_batch", [None, 40])
@pytest.mark.parametrize("chunk_tokens", [2, 4, 7, 1000])
def test_chunked_loss_equals_full_logits_loss(model, chunk_tokens, num_items_in_batch):
    ids, mask, labels = training_batch()
    with torch.no_grad():
        want = reference_loss(model, ids, mask, labels, num_items_in_batch)
        hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    got = chunked_lm_loss(hidden, model.lm_head, labels, num_items_in_batch, chunk_tokens=chunk_tokens)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # and through forward(), as a training step calls it (gradients on: the chunked path, no logits)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items_in_batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss.detach(), want, rtol=1e-6, atol=0)


def test_no_labelled_token_gives_nan_mean_and_zero_sum_as_cross_entropy(model):
    ids, mask, labels = training_batch()
    labels = torch.full_like(labels, -100)
    assert torch.isnan(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=1).loss
    loss.backward()  # still part of the graph, as F.cross_entropy's
    assert loss.item() == 0.0
    model.zero_grad(set_to_none=True)


def test_gradients_of_every_parameter_equal_the_full_logits_gradients(monkeypatch):
    monkeypatch.setattr(modeling_chatglm, "LOSS_CHUNK_BYTES", 4 * VOCAB * 4)  # chunks of 4 tokens: 4 + 4 + 4 + 3
    ids, mask, labels = training_batch()
    for num_items_in_batch in (None, 40):
        model = make_model()
        model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items_in_batch).loss.backward()
        reference = make_model()
        reference_loss(reference, ids, mask, labels, num_items_in_batch).backward()
        grads = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            # fp32 rounding only: measured <= 4.5e-7 of each tensor's largest gradient
            want = grads[name].grad
            assert (p.grad - want).abs().max() <= 1e-6 * want.abs().max(), name


def test_logits_with_labels_only_when_asked_or_without_gradients(model):
    ids, mask, labels = training_batch()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        evaluated = model(input_ids=ids, attention_mask=mask, labels=labels)  # eval: loss and logits, as before
    trained = model(input_ids=ids, attention_mask=mask, labels=labels)
    asked = model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    assert trained.logits is None
    assert torch.equal(evaluated.logits, plain) and torch.equal(asked.logits.detach(), plain)
    torch.testing.assert_close(evaluated.loss, trained.loss.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(asked.loss.detach(), trained.loss.detach(), rtol=1e-6, atol=0)
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=False).logits is None


def test_forward_without_labels_returns_full_logits_and_greedy_generation_is_unchanged(model):
    model.eval()
    ids = torch.tensor([torch.randint(5, 280, (6,), generator=torch.Generator().manual_seed(3)).tolist() + [GMASK, SOP]])
    with torch.no_grad():
        logits = model(ids).logits
        hidden = model.transformer(input_ids=ids).last_hidden_state
        assert logits.shape == (1, ids.shape[1], VOCAB)
        assert torch.equal(logits, model.lm_head(hidden))
        generated = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        rows = ids  # greedy by hand: argmax of the full-sequence logits, no cache
        for _ in range(10):
            rows = torch.cat([rows, model(rows).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, rows)


def test_bf16_chunked_loss_equals_the_bf16_full_logits_loss():
    model = make_model().to(torch.bfloat16)
    ids, mask, labels = training_batch()
    with torch.no_grad():
        want = reference_loss(model, ids, mask, labels)
        hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    for chunk_tokens in (4, 1000):
        got = chunked_lm_loss(hidden, model.lm_head, labels, chunk_tokens=chunk_tokens)
        assert got.dtype == torch.float32
        # Same bf16 logits in fp32; only the LM head's row blocking and the fp32 summation order differ (measured 8e-8).
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def _record_mm(monkeypatch, probe):
    """torch.mm still computes, and each call appends probe(args, kwargs) to the returned list."""
    calls = []
    plain_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(probe(a, k)) or plain_mm(*a, **k))
    return calls


def _force_vocab_blocks(monkeypatch):
    """lm_logits' CPU vocabulary blocks at test size: blocks of 64 of the 300 entries (the last one 44), any row count;
    and the loss's fp32 softmax passes 4 rows at a time (15 labelled rows: 4 + 4 + 4 + 3)."""
    monkeypatch.setattr(modeling_chatglm, "CPU_VOCAB_BLOCK", 64)
    monkeypatch.setattr(modeling_chatglm, "CPU_VOCAB_BLOCK_MIN_ROWS", 1)
    monkeypatch.setattr(modeling_chatglm, "LOG_SOFTMAX_ROWS_BYTES", 4 * 4 * VOCAB)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocabulary_blocked_logits_equal_one_matmul(monkeypatch, dtype):
    _force_vocab_blocks(monkeypatch)
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(40, 64, generator=g).to(dtype), torch.randn(VOCAB, 64, generator=g).to(dtype)
    with torch.no_grad():
        got, want = modeling_chatglm.lm_logits(hidden, weight), hidden @ weight.t()
        cast = modeling_chatglm.lm_logits(hidden.float(), weight.float(), dtype)  # operands cast as autocast would
    assert got.shape == (40, VOCAB) and got.dtype == dtype and torch.equal(cast, got)
    # the same dot products: fp32 equal up to summation order; bf16 within one rounding step of the result
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-6 if dtype == torch.float32 else 2**-7, atol=1e-5)
    calls = _record_mm(monkeypatch, lambda a, k: 1)
    with torch.enable_grad():  # differentiable calls keep the one matmul
        assert torch.equal(modeling_chatglm.lm_logits(hidden, weight), want)
    monkeypatch.setattr(modeling_chatglm, "CPU_VOCAB_BLOCK_MAX_HIDDEN", 63)  # as do hidden sizes above the limit
    with torch.no_grad():
        assert torch.equal(modeling_chatglm.lm_logits(hidden, weight), want)
    assert not calls


def test_few_fp32_rows_take_the_tall_product_and_equal_one_matmul(monkeypatch):
    """Decoding at batch 2..64 in fp32 on the CPU computes logits as weight @ hidden.T (forced here at test size)."""
    monkeypatch.setattr(modeling_chatglm, "CPU_TALL_MIN_ELEMENTS", 0)
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(VOCAB, 64, generator=g)
    calls = _record_mm(monkeypatch, lambda a, k: a[0] is weight)
    for rows, tall in ((1, False), (2, True), (8, True), (64, True), (65, False)):
        hidden = torch.randn(rows, 64, generator=g)
        calls.clear()
        with torch.no_grad():
            got = modeling_chatglm.lm_logits(hidden, weight)
        assert calls == ([True] if tall else []), rows
        assert got.shape == (rows, VOCAB) and got.is_contiguous()
        # the same dot products, summed in another order
        torch.testing.assert_close(got, hidden @ weight.t(), rtol=1e-6, atol=1e-5)
        calls.clear()
        with torch.no_grad():
            modeling_chatglm.lm_logits(hidden.bfloat16(), weight.bfloat16())  # bf16 keeps one matmul
            modeling_chatglm.lm_logits(hidden.bfloat16(), weight, torch.bfloat16)
        with torch.enable_grad():
            modeling_chatglm.lm_logits(hidden, weight)  # and so do differentiable calls
        assert not any(calls), rows
    monkeypatch.setattr(modeling_chatglm, "CPU_TALL_MIN_ELEMENTS", VOCAB * 64 + 1)  # a head below the size limit
    with torch.no_grad():
        modeling_chatglm.lm_logits(torch.randn(8, 64, generator=g), weight)
    assert not any(calls)


def test_batched_greedy_decoding_with_the_tall_product_gives_the_same_tokens(monkeypatch, model):
    ids = torch.tensor([[5, 6, 7, GMASK, SOP], [8, 9, 10, GMASK, SOP], [11, 12, 13, GMASK, SOP], [14, 15, 16, GMASK, SOP]])
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    monkeypatch.setattr(modeling_chatglm, "CPU_TALL_ROWS", (0, -1))  # never
    with torch.inference_mode():
        want = model.generate(ids, **kwargs)
        want_logits = model(want).logits
    monkeypatch.setattr(modeling_chatglm, "CPU_TALL_ROWS", (2, 64))
    monkeypatch.setattr(modeling_chatglm, "CPU_TALL_MIN_ELEMENTS", 0)
    calls = _record_mm(monkeypatch, lambda a, k: a[0] is model.lm_head.weight)
    with torch.inference_mode():
        got = model.generate(ids, **kwargs)
    assert sum(calls) == 10  # the prefill's last positions and every decode step: 4 rows each
    assert torch.equal(got, want)
    with torch.inference_mode():  # one forward over 4 x 15 positions: 60 rows, the tall product too
        torch.testing.assert_close(model(want).logits, want_logits, rtol=1e-5, atol=1e-5)


def test_vocabulary_blocked_loss_gradients_and_eval_logits_equal_the_references(monkeypatch):
    _force_vocab_blocks(monkeypatch)
    calls = _record_mm(monkeypatch, lambda a, k: k.get("out") is not None)
    ids, mask, labels = training_batch()
    model, reference = make_model(), make_model()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()  # blocked forward and recomputation
    assert sum(calls) == 2 * 5
    want_loss = reference_loss(reference, ids, mask, labels)
    want_loss.backward()
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert (p.grad - grads[name].grad).abs().max() <= 1e-6 * grads[name].grad.abs().max(), name
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)  # evaluation: blocked logits and loss
        hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    assert sum(calls) == 3 * 5
    torch.testing.assert_close(out.logits, model.lm_head(hidden), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, want_loss.detach(), rtol=1e-6, atol=0)


# Child side: this process's own memory figures. VmHWM (the peak), not ru_maxrss: a child's ru_maxrss includes this
# (pytest) process's RSS at the fork, which late in a full run is larger than the child's own peak.
RSS_CHILD = """
def rss(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))
"""

PEAK_CHILD = RSS_CHILD + """
import json, sys
import torch, torch.nn.functional as F
from configuration_chatglm import ChatGLMConfig
from modeling_chatglm import ChatGLMForConditionalGeneration
V, L = 130528, 2048
torch.manual_seed(0)
model = ChatGLMForConditionalGeneration(ChatGLMConfig(
    vocab_size=V, hidden_size=64, num_layers=1, num_attention_heads=4, inner_hidden_size=128,
    mask_token_id=V - 8, gmask_token_id=V - 7, bos_token_id=V - 4, eos_token_id=V - 3, pad_token_id=3))
ids = torch.randint(10, V - 10, (1, L))
labels = ids.clone()
labels[:, :8] = -100
if sys.argv[1] == "chunked":
    loss = model(input_ids=ids, labels=labels).loss
else:
    logits = model.lm_head(model.transformer(input_ids=ids).last_hidden_state).float()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    del logits
loss.backward()
print(json.dumps({"peak": rss("VmHWM"), "loss": loss.item()}))
"""


def _training_step_peak(mode):
    """Peak RSS (bytes) of a fresh process doing one forward+backward at 2048 tokens x vocab 130528."""
    proc = subprocess.run([sys.executable, "-c", PEAK_CHILD, mode], cwd=REPO, capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def test_training_step_at_2048_tokens_needs_one_fp32_logits_tensor_less_memory():
    full, chunked = _training_step_peak("full"), _training_step_peak("chunked")
    logits_bytes = 2048 * 130528 * 4
    print(f"peak RSS: full logits {full['peak'] / 1e9:.2f} GB, chunked {chunked['peak'] / 1e9:.2f} GB")
    assert abs(full["loss"] - chunked["loss"]) <= 1e-5 * full["loss"]
    assert full["peak"] - chunked["peak"] >= logits_bytes


LOSS_GROWTH_CHILD = RSS_CHILD + """
import json, torch
from modeling_chatglm import ChunkCrossEntropy
torch.manual_seed(0)
hidden = torch.randn(1226, 64, dtype=torch.bfloat16, requires_grad=True)
weight = torch.randn(32000, 64, dtype=torch.bfloat16, requires_grad=True)
labels = torch.randint(0, 32000, (1226,))
before = rss("VmRSS")
loss = ChunkCrossEntropy.apply(hidden, weight, labels)
after_forward = rss("VmHWM")
loss.backward()
print(json.dumps({"forward": after_forward - before, "step": rss("VmHWM") - before}))
"""


def test_the_loss_needs_its_logits_and_two_row_buffers_not_a_transient_per_row_block():
    """1226 x 32000 bf16 logits (78 MB) in ten row blocks: fresh fp32 transients per block grew the RSS by 240 MB
    (glibc's heap fragmented by the small results between them); reused buffers keep it at the logits plus ~32 MB.
    Backward: the recomputed logits (whose buffer takes their gradient), one row buffer and the two weight-sized
    gradients."""
    proc = subprocess.run([sys.executable, "-c", LOSS_GROWTH_CHILD], cwd=REPO, capture_output=True, text=True,
                          check=True)
    grown = json.loads(proc.stdout.splitlines()[-1])
    logits = 1226 * 32000 * 2
    buffers = 2 * modeling_chatglm.LOG_SOFTMAX_ROWS_BYTES
    print(f"RSS growth: forward {grown['forward'] / 1e6:.0f} MB, step {grown['step'] / 1e6:.0f} MB "
          f"(logits {logits / 1e6:.0f} MB)")
    slack = 32 * 2**20  # the interpreter's own small allocations; measured 125 MB for the forward (bound 146)
    assert grown["forward"] <= logits + buffers + slack
    assert grown["step"] <= 2 * logits + buffers + slack
