"""Issue 16: the training step without needless casts, each change checked against the path it replaces.

- LoRA layers skip PEFT's fp32 input cast under autocast when their dropout is off
  (glm_tune.lora.skip_input_casts_under_autocast): the loss and every LoRA gradient are bit-identical to PEFT's own
  casting; with dropout the cast is kept (so also identical), and outside autocast PEFT still casts (an fp32 adapter
  on a bf16 base keeps working).
- The chunked loss's hand-written backward (ChunkCrossEntropy) equals autograd's cross entropy, for a trainable and
  a frozen LM head, and a module it must not read directly (ZeRO-3 partitioned or Accelerate-hooked) takes the
  autograd path.
"""

import pytest
import torch
import torch.nn.functional as F

import modeling_chatglm
from glm_tune.lora import add_lora
from test_chunked_loss import make_model, training_batch


def lora_model(dtype, dropout):
    model = make_model(seed=1).to(dtype)
    torch.manual_seed(2)
    return add_lora(model, rank=4, alpha=8, dropout=dropout, target="all")


def loss_and_grads(model, casts, autocast=True):
    from peft.tuners.lora import LoraLayer

    saved = {}
    for module in model.modules():
        if isinstance(module, LoraLayer) and casts:
            saved[module] = dict(module._forward_pre_hooks)
            module._forward_pre_hooks.clear()
            module.cast_input_dtype_enabled = True
    ids, mask, labels = training_batch()
    model.train()
    torch.manual_seed(3)  # the same dropout masks in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    for module, hooks in saved.items():
        module._forward_pre_hooks.update(hooks)
    return loss.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_under_autocast_without_the_input_cast_is_bit_identical(dropout):
    from peft.tuners.lora import LoraLayer

    model = lora_model(torch.bfloat16, dropout)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)  # PEFT's fp32 adapters
    loss_and_grads(model, casts=False)
    skipped = {m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, LoraLayer)}
    assert skipped == {dropout > 0}  # the cast is skipped only where it changes nothing (no dropout)
    loss, grads = loss_and_grads(model, casts=True)
    loss2, grads2 = loss_and_grads(model, casts=False)
    assert torch.equal(loss, loss2)
    assert grads.keys() == grads2.keys() and len(grads) == 2 * 4 * 2  # A and B of 4 linears in 2 layers
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name


def test_outside_autocast_peft_still_casts_the_input_of_fp32_adapters_on_a_bf16_base():
    model = lora_model(torch.bfloat16, 0.0)
    loss, grads = loss_and_grads(model, casts=False, autocast=False)  # would fail on a dtype mismatch otherwise
    assert torch.isfinite(loss) and all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # (B starts at 0)


@pytest.mark.parametrize("frozen_head", [False, True])
def test_the_hand_written_chunk_backward_equals_autograds_cross_entropy(frozen_head, monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(not frozen_head)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    used = []
    fn = modeling_chatglm.ChunkCrossEntropy
    monkeypatch.setattr(fn, "apply", lambda *a, apply=fn.apply: used.append(fn) or apply(*a))
    loss = modeling_chatglm.chunked_lm_loss(hidden, head, labels, chunk_tokens=4) * 0.5  # a non-unit upstream grad
    loss.backward()
    labelled = int((labels[:, 1:] != -100).sum())
    assert len(used) == -(-labelled // 4)  # one hand-written chunk per 4 labelled positions
    got = hidden.grad.clone(), None if frozen_head else head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    logits = head(hidden)[:, :-1].flatten(0, 1).float()
    ref = F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100) * 0.5
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[0], hidden.grad, atol=1e-6, rtol=1e-5)
    if frozen_head:
        assert head.weight.grad is None
    else:
        torch.testing.assert_close(got[1], head.weight.grad, atol=1e-6, rtol=1e-5)


def test_a_hooked_or_partitioned_lm_head_is_called_as_a_module(monkeypatch):
    head = torch.nn.Linear(16, 50, bias=False)
    assert modeling_chatglm._plain_linear(head)
    head._hf_hook = object()  # Accelerate offloading: the weight may live elsewhere until the module runs
    assert not modeling_chatglm._plain_linear(head)
    calls = []
    monkeypatch.setattr(modeling_chatglm.ChunkCrossEntropy, "apply", lambda *a: calls.append(a))
    hidden = torch.randn(1, 5, 16, requires_grad=True)
    loss = modeling_chatglm.chunked_lm_loss(hidden, head, torch.randint(0, 50, (1, 5)))
    loss.backward()
    assert not calls and hidden.grad is not None


def test_bf16_chunk_losses_agree_with_autograd_within_bf16_rounding(monkeypatch):
    """bf16 rounds the gradient at a different point in each path (before or after the upstream scale): the loss is
    equal within 1e-3 and the hidden-state gradient within 2% of its norm (bf16's epsilon is 0.8%)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(2, 40, 64, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 300, (2, 40))
    results = []
    for direct in (True, False):
        monkeypatch.setattr(modeling_chatglm, "_plain_linear", lambda module, direct=direct: direct)
        loss = modeling_chatglm.chunked_lm_loss(hidden, head, labels, chunk_tokens=16)
        loss.backward()
        results.append((loss.detach(), hidden.grad.float().clone()))
        hidden.grad = None
    (fused, g_fused), (auto, g_auto) = results
    torch.testing.assert_close(fused, auto, atol=1e-3, rtol=1e-3)
    assert (g_fused - g_auto).norm() / g_auto.norm() < 0.02


@pytest.mark.parametrize("weight_dtype,hidden_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)])
def test_the_chunk_backward_recomputes_under_the_forwards_autocast(weight_dtype, hidden_dtype):
    """Under autocast the logits are made in bf16 whatever the inputs' dtypes; backward recomputes them the same way
    (not in the inputs' dtypes, which may not even match), so the gradients are autograd's."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 500, bias=False).to(weight_dtype)
    hidden = torch.randn(4, 10, 64, dtype=hidden_dtype, requires_grad=True)
    labels = torch.randint(0, 500, (4, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = modeling_chatglm.chunked_lm_loss(hidden, head, labels, chunk_tokens=7)
    loss.backward()
    got = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(head(hidden)[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert got[0].dtype == hidden_dtype and torch.equal(got[0], hidden.grad)
    assert (got[1].float() - head.weight.grad.float()).norm() / head.weight.grad.float().norm() < 0.01
