"""Issue 16: the training step without needless casts, each change checked against the path it replaces.

- LoRA layers run PEFT's forward fused (glm_tune.lora.fuse_lora_layers / LoraDelta): on an fp32 model the loss and
  every LoRA gradient equal PEFT's own forward within fp32 rounding; on a bf16 base under autocast within bf16
  rounding; fp32 adapters on a bf16 base outside autocast keep PEFT's forward; with dropout, output and gradients equal the formula with the same keep-mask, computed in float64;
  the mask keeps 1 - p of the elements; merged or disabled adapters and hooked weights take PEFT's own forward.
- The chunked loss's hand-written backward (ChunkCrossEntropy) equals autograd's cross entropy, for a trainable and
  a frozen LM head, and a module it must not read directly (ZeRO-3 partitioned or Accelerate-hooked) takes the
  autograd path.
- runtime.keep_freed_memory keeps a freed large tensor's memory in the heap (glibc), and can be turned off.
"""

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

import modeling_chatglm
from glm_tune import lora as glm_lora
from glm_tune.lora import LoraDelta, add_lora, dropout_keep
from test_chunked_loss import REPO, make_model, training_batch


def lora_model(dtype, dropout):
    model = make_model(seed=1).to(dtype)
    torch.manual_seed(2)
    model = add_lora(model, rank=4, alpha=8, dropout=dropout, target="all")
    with torch.no_grad():  # B starts at zero: give every adapter a non-zero delta so the forward is tested too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def lora_layers(model):
    from peft.tuners.lora import Linear

    return [m for m in model.modules() if type(m) is Linear]


def loss_and_grads(model, fused, autocast=False):
    for module in lora_layers(model):
        module.forward = types.MethodType(glm_lora._fused_forward, module) if fused else module._peft_forward
    ids, mask, labels = training_batch()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_fused_lora_equals_pefts_forward_in_fp32():
    model = lora_model(torch.float32, 0.0)
    assert len(lora_layers(model)) == 4 * 2 and all(hasattr(m, "_peft_forward") for m in lora_layers(model))
    calls = []
    real = LoraDelta.apply
    LoraDelta.apply = lambda *a: calls.append(1) or real(*a)
    try:
        loss, grads = loss_and_grads(model, fused=True)
    finally:
        LoraDelta.apply = real
    assert len(calls) == 8  # every LoRA layer went through the fused function
    ref_loss, ref_grads = loss_and_grads(model, fused=False)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 4 * 2  # A and B of 4 linears in 2 layers
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_fused_lora_under_autocast_on_a_bf16_base_agrees_with_peft_within_bf16_rounding():
    """Under autocast both run the adapter matmuls in bf16. Loss within 1%, every LoRA gradient within 3% of its norm
    (bf16's epsilon is 0.8%). The adapters stay fp32."""
    model = lora_model(torch.bfloat16, 0.0)
    loss, grads = loss_and_grads(model, fused=True, autocast=True)
    ref_loss, ref_grads = loss_and_grads(model, fused=False, autocast=True)
    torch.testing.assert_close(loss, ref_loss, atol=1e-2, rtol=1e-2)
    for name in grads:
        assert grads[name].dtype == torch.float32, name
        assert (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm() < 0.03, name


def test_fp32_adapters_on_a_bf16_base_outside_autocast_keep_pefts_fp32_math():
    model = lora_model(torch.bfloat16, 0.1)
    calls = []
    real = LoraDelta.apply
    LoraDelta.apply = lambda *a: calls.append(1) or real(*a)
    try:
        loss, grads = loss_and_grads(model, fused=True, autocast=False)
        assert not calls  # PEFT's own forward, every layer
        loss_and_grads(model, fused=True, autocast=True)
        assert len(calls) == 8  # under autocast the same layers run fused
    finally:
        LoraDelta.apply = real
    assert torch.isfinite(loss) and all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_lora_delta_with_a_keep_mask_equals_the_formula_in_float64(dtype, tol):
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40).to(dtype).requires_grad_(False)
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    a = torch.randn(4, 24, requires_grad=True)  # the adapters: fp32, as PEFT keeps them
    b = torch.randn(40, 4, requires_grad=True)
    keep = torch.rand(3, 5, 24) > 0.3
    scale = 2.0 / 0.7
    grad = torch.randn(3, 5, 40, dtype=dtype)
    out = LoraDelta.apply(base(x), x, a, b, scale, keep)
    out.backward(grad)
    got = out.detach(), x.grad, a.grad, b.grad
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, b))
    ref = F.linear(xd, base.weight.double(), base.bias.double()) + ((xd * keep) @ ad.t() @ bd.t()) * scale
    ref.backward(grad.double())
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == got[3].dtype == torch.float32
    for mine, theirs in zip(got, (ref.detach(), xd.grad, ad.grad, bd.grad)):
        assert ((mine.double() - theirs).norm() / theirs.norm()).item() < tol


def test_the_fused_forward_scales_by_the_rounded_dropout_probability(monkeypatch):
    """In training with dropout p, the fused forward multiplies by the keep-mask and by scaling / (1 - p'), p' being
    the probability the mask was drawn with."""
    model = lora_model(torch.float32, 0.25)
    layer = lora_layers(model)[0]
    x = torch.randn(2, 3, layer.in_features)
    keep = torch.rand(2, 3, layer.in_features) > 0.25
    monkeypatch.setattr(glm_lora, "dropout_keep", lambda t, p: (keep, 0.2501))
    layer.train()
    got = layer(x)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = layer.base_layer(x) + ((x * keep) @ a.t() @ b.t()) * layer.scaling["default"] / (1 - 0.2501)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    layer.eval()  # no dropout in eval: PEFT's formula without a mask
    torch.testing.assert_close(layer(x), layer._peft_forward(x), atol=1e-6, rtol=1e-5)


def test_dropout_keep_draws_one_minus_p_of_the_elements():
    x = torch.empty(1001, 999)  # an odd element count: four 16-bit fields per 64-bit draw, the last draw cut
    for p in (0.1, 0.5):
        torch.manual_seed(0)
        keep, p_used = dropout_keep(x, p)
        assert keep.shape == x.shape and keep.dtype == torch.bool
        assert p_used == round(p * 65536) / 65536 and abs(p_used - p) < 1e-5
        n = x.numel()
        sigma = (n * p * (1 - p)) ** 0.5
        assert abs(int(keep.sum()) - n * (1 - p_used)) < 5 * sigma
        # rows and columns are not correlated: every column keeps about 1 - p of its rows
        assert (keep.float().mean(0) - (1 - p)).abs().max() < 6 * (p * (1 - p) / 1001) ** 0.5
        torch.manual_seed(0)
        assert torch.equal(dropout_keep(x, p)[0], keep)  # the torch generator decides: seeded runs repeat
    assert bool(dropout_keep(x, 0.0)[0].all())


def test_merged_or_disabled_adapters_take_pefts_forward():
    model = lora_model(torch.float32, 0.0).eval()
    ids = training_batch()[0]
    base_logits = None
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=ids).logits
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapters do something
    calls = []
    for module in lora_layers(model):
        module._peft_forward = types.MethodType(lambda self, *a, real=module._peft_forward, **k:
                                                calls.append(1) or real(*a, **k), module)
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits)
    assert len(calls) == 8
    model.merge_adapter()
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
    assert len(calls) == 8


FREED = textwrap.dedent("""
    import ctypes, sys
    sys.path.insert(0, sys.argv[1])
    from glm_tune.runtime import keep_freed_memory

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    kept = keep_freed_memory()
    import torch
    t = torch.ones(50 * 2**20 // 4)  # 50 MB
    mapped = libc.mallinfo2().hblkhd  # bytes in mmap'ed blocks while it lives
    del t
    print(kept, keep_freed_memory(), mapped >= 50 * 2**20, libc.mallinfo2().fordblks >= 50 * 2**20)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's malloc only")
@pytest.mark.parametrize("setting", ["1", "0"])
def test_keep_freed_memory_keeps_a_freed_tensors_memory_in_the_heap(setting):
    env = {**os.environ, "GLM_TUNE_KEEP_FREED_MEMORY": setting}
    out = subprocess.run([sys.executable, "-c", FREED, str(REPO)], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    if setting == "1":  # not its own mmap, and still in the heap (free, reusable) after the tensor is gone
        assert out == ["True", "True", "False", "True"]
    else:  # glibc's default: a 50 MB block is mmap'ed and returned to the kernel when freed
        assert out == ["False", "False", "True", "False"]


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
    (not in the inputs' dtypes, which may not even match), so the gradients are autograd's within bf16 rounding (the
    upstream scale is applied to the [tokens, hidden] result, after the matmul, not to the bf16 logits' gradient)."""
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
    assert got[0].dtype == hidden_dtype
    assert (got[0] - hidden.grad).norm() / hidden.grad.norm() < 0.01
    assert (got[1].float() - head.weight.grad.float()).norm() / head.weight.grad.float().norm() < 0.01
