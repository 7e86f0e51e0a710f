"""Plain reference implementation of the ChatGLM-6B (v1.1) forward pass.

This module is the independent check for the fast implementation in ``modeling_chatglm.py``. It is written
from the published formulas only, deliberately without any optimisation: one unpadded row at a time, no cache,
no fused kernels, explicit loops over layers and heads, hand-written LayerNorm / softmax / GELU, and the official
sequence-first layout (``[seq, heads, head_dim]``). Everything runs in ``dtype`` (float64 by default) so that it is
a precision oracle for the float32 fast path.

Public API
----------
``reference_logits(state_dict, cfg, input_ids, prefix_state=None, dtype=torch.float64) -> Tensor[L, vocab]``
``reference_loss(logits, labels) -> Tensor[]``

``cfg`` is a plain dict with the keys ``hidden_size``, ``num_layers``, ``num_attention_heads``,
``layernorm_epsilon``, ``bos_token_id``, ``mask_token_id``, ``gmask_token_id``, ``pre_seq_len``,
``prefix_projection``.

The rules that decide *where* attention looks (positions, block positions, mask, the per-head qkv layout) are
module-level functions so that a test can replace one of them and show that the reference reacts to it.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "reference_logits",
    "reference_loss",
    "position_and_block_ids",
    "attention_allowed",
    "split_qkv",
    "rotary_inv_freq",
    "config_dict",
]

ROTARY_BASE = 10000.0
MASKED_SCORE = -10000.0
GELU_TANH_COEFF = 0.7978845608028654  # sqrt(2 / pi)


# ----------------------------------------------------------------------------------------------------------------
# Small hand-written building blocks
# ----------------------------------------------------------------------------------------------------------------
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with the biased variance (as torch.nn.LayerNorm)."""
    mean = x.mean(dim=-1, keepdim=True)
    centered = x - mean
    var = (centered * centered).mean(dim=-1, keepdim=True)
    return centered / torch.sqrt(var + eps) * weight + bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b, W stored as [out, in] (torch.nn.Linear convention)."""
    y = x @ weight.transpose(0, 1)
    if bias is not None:
        y = y + bias
    return y


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(GELU_TANH_COEFF * x * (1.0 + 0.044715 * x * x)))


def softmax_last(x: torch.Tensor) -> torch.Tensor:
    shifted = x - x.max(dim=-1, keepdim=True).values
    e = torch.exp(shifted)
    return e / e.sum(dim=-1, keepdim=True)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x_a, x_b = x[..., :half], x[..., half:]
    return torch.cat((-x_b, x_a), dim=-1)


def rotary_inv_freq(rotary_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """inv_freq[j] = fp16(1 / 10000^(2j / r)), j = 0..r/2-1, computed in float32 then rounded to float16."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / (ROTARY_BASE ** exponents)
    return inv_freq.to(torch.float16).to(dtype)


def rope(x: torch.Tensor, positions: list[int], inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [L, heads, r] with one position per row: x*cos(theta) + rotate_half(x)*sin(theta)."""
    out = torch.empty_like(x)
    for t, p in enumerate(positions):
        freqs = p * inv_freq  # [r/2]
        theta = torch.cat((freqs, freqs))  # [r]
        cos, sin = torch.cos(theta), torch.sin(theta)
        out[t] = x[t] * cos + rotate_half(x[t]) * sin  # broadcast over heads
    return out


# ----------------------------------------------------------------------------------------------------------------
# The rules (replaceable by tests to prove sensitivity)
# ----------------------------------------------------------------------------------------------------------------
def position_and_block_ids(ids: list[int], cfg: dict) -> tuple[list[int], list[int], int]:
    """v1.1 2D positions for one row. Returns (position, block_position, ctx).

    ctx = index of the first <sop> (bos). Before ctx: position t, block 0. From ctx on: position mask_pos (first
    [gMASK], else first [MASK]) and block t - ctx + 1. Without <sop>: position t, block 0, ctx 0.
    """
    L = len(ids)
    bos = cfg["bos_token_id"]
    if bos not in ids:
        return list(range(L)), [0] * L, 0
    ctx = ids.index(bos)
    if cfg["gmask_token_id"] in ids:
        mask_pos = ids.index(cfg["gmask_token_id"])
    elif cfg["mask_token_id"] in ids:
        mask_pos = ids.index(cfg["mask_token_id"])
    else:
        raise ValueError("row has <sop> but neither [gMASK] nor [MASK]: ChatGLM positions are undefined")
    position = [t if t < ctx else mask_pos for t in range(L)]
    block = [0 if t < ctx else t - ctx + 1 for t in range(L)]
    return position, block, ctx


def attention_allowed(i: int, j: int, ctx: int) -> bool:
    """Query i may attend key j iff j <= i (causal) or j < ctx (bidirectional prompt before <sop>)."""
    return j <= i or j < ctx


def split_qkv(qkv: torch.Tensor, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[L, 3*hidden] -> view [L, heads, 3*d] -> q, k, v each [L, heads, d] (per-head [q_h, k_h, v_h] layout)."""
    L = qkv.shape[0]
    per_head = qkv.view(L, heads, 3 * head_dim)
    q = per_head[..., 0:head_dim]
    k = per_head[..., head_dim : 2 * head_dim]
    v = per_head[..., 2 * head_dim : 3 * head_dim]
    return q, k, v


# ----------------------------------------------------------------------------------------------------------------
# Prefix (P-Tuning v2)
# ----------------------------------------------------------------------------------------------------------------
def prefix_key_values(sd: dict, cfg: dict, dtype: torch.dtype, prefix_state: torch.Tensor | None = None):
    """Per-layer (key, value) of the prefix, each [P, heads, d]; None if no prefix.

    ``prefix_state`` (optional) is the prefix encoder output [P, num_layers*2*hidden] supplied directly; when None it
    is computed from ``transformer.prefix_encoder.*`` in the state dict.
    """
    P = cfg.get("pre_seq_len")
    if P is None and prefix_state is None:
        return None
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    d = hidden // heads
    n_layers = cfg["num_layers"]
    if prefix_state is None:
        table = sd["transformer.prefix_encoder.embedding.weight"].to(dtype)
        prefix_tokens = list(range(P))
        emb = torch.stack([table[p] for p in prefix_tokens])  # [P, width]
        if cfg.get("prefix_projection"):
            h = linear(
                emb,
                sd["transformer.prefix_encoder.trans.0.weight"].to(dtype),
                sd["transformer.prefix_encoder.trans.0.bias"].to(dtype),
            )
            h = torch.tanh(h)
            kv = linear(
                h,
                sd["transformer.prefix_encoder.trans.2.weight"].to(dtype),
                sd["transformer.prefix_encoder.trans.2.bias"].to(dtype),
            )
        else:
            kv = emb
    else:
        kv = prefix_state.to(dtype)
        P = kv.shape[0]
    if kv.shape[-1] != n_layers * 2 * hidden:
        raise ValueError(f"prefix width {kv.shape[-1]} != num_layers*2*hidden = {n_layers * 2 * hidden}")
    kv = kv.reshape(P, n_layers * 2, heads, d)
    return [(kv[:, 2 * l], kv[:, 2 * l + 1]) for l in range(n_layers)]


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------
def _attention(a, sd, prefix, l, cfg, position, block, ctx, inv_freq, dtype):
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    d = hidden // heads
    L = a.shape[0]
    p = f"transformer.layers.{l}.attention."

    qkv = linear(a, sd[p + "query_key_value.weight"].to(dtype), sd[p + "query_key_value.bias"].to(dtype))
    q, k, v = split_qkv(qkv, heads, d)

    # 2D rotary: first half of the head dim with the position id, second half with the block position id.
    half = d // 2
    q1, q2 = q[..., :half], q[..., half:]
    k1, k2 = k[..., :half], k[..., half:]
    q = torch.cat((rope(q1, position, inv_freq), rope(q2, block, inv_freq)), dim=-1)
    k = torch.cat((rope(k1, position, inv_freq), rope(k2, block, inv_freq)), dim=-1)

    # Prefix keys/values (not rotated) are prepended and visible to every query.
    n_prefix = 0
    if prefix is not None:
        pk, pv = prefix[l]
        n_prefix = pk.shape[0]
        k = torch.cat((pk, k), dim=0)
        v = torch.cat((pv, v), dim=0)

    coeff = float(l + 1)
    norm_factor = math.sqrt(d)
    context = torch.zeros(L, heads, d, dtype=dtype)
    for h in range(heads):
        q_scaled = q[:, h, :] / (norm_factor * coeff)  # [L, d]
        scores = q_scaled @ k[:, h, :].transpose(0, 1)  # [L, P + L]
        for i in range(L):
            for j in range(L):
                if not attention_allowed(i, j, ctx):
                    scores[i, n_prefix + j] = MASKED_SCORE
        scores = scores * coeff
        probs = softmax_last(scores)
        context[:, h, :] = probs @ v[:, h, :]
    context = context.reshape(L, hidden)  # heads concatenated
    return linear(context, sd[p + "dense.weight"].to(dtype), sd[p + "dense.bias"].to(dtype))


def reference_logits(
    state_dict: dict,
    cfg: dict,
    input_ids,
    prefix_state: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Logits [L, vocab] for one unpadded row ``input_ids`` (list of ints), computed in ``dtype``."""
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.tolist()
    ids = [int(t) for t in input_ids]
    sd = {k: v.detach() for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    n_layers = cfg["num_layers"]
    eps = cfg["layernorm_epsilon"]
    d = hidden // heads
    alpha = math.sqrt(2 * n_layers)

    position, block, ctx = position_and_block_ids(ids, cfg)
    inv_freq = rotary_inv_freq(d // 2, dtype)
    prefix = prefix_key_values(sd, cfg, dtype, prefix_state)

    table = sd["transformer.word_embeddings.weight"].to(dtype)
    x = torch.stack([table[t] for t in ids])  # [L, hidden], seq-first

    for l in range(n_layers):
        p = f"transformer.layers.{l}."
        a = layer_norm(x, sd[p + "input_layernorm.weight"].to(dtype), sd[p + "input_layernorm.bias"].to(dtype), eps)
        attn_out = _attention(a, sd, prefix, l, cfg, position, block, ctx, inv_freq, dtype)
        h = a * alpha + attn_out
        m = layer_norm(
            h, sd[p + "post_attention_layernorm.weight"].to(dtype), sd[p + "post_attention_layernorm.bias"].to(dtype), eps
        )
        up = linear(m, sd[p + "mlp.dense_h_to_4h.weight"].to(dtype), sd[p + "mlp.dense_h_to_4h.bias"].to(dtype))
        mlp = linear(gelu_tanh(up), sd[p + "mlp.dense_4h_to_h.weight"].to(dtype), sd[p + "mlp.dense_4h_to_h.bias"].to(dtype))
        x = m * alpha + mlp

    x = layer_norm(
        x, sd["transformer.final_layernorm.weight"].to(dtype), sd["transformer.final_layernorm.bias"].to(dtype), eps
    )
    lm_head = sd.get("lm_head.weight", sd["transformer.word_embeddings.weight"]).to(dtype)
    return x @ lm_head.transpose(0, 1)


def reference_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    """Shifted mean cross entropy: logits[t] predicts labels[t+1]; -100 is ignored."""
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    logits = logits if logits.dtype == torch.float64 else logits.to(torch.float32)
    total = logits.new_zeros(())
    count = 0
    for t in range(len(labels) - 1):
        target = labels[t + 1]
        if target == -100:
            continue
        row = logits[t]
        shifted = row - row.max()
        log_z = torch.log(torch.exp(shifted).sum()) + row.max()
        total = total - (row[target] - log_z)
        count += 1
    if count == 0:
        return logits.new_tensor(float("nan"))
    return total / count


def config_dict(config) -> dict:
    """The reference's cfg dict from any object with the ChatGLM config attributes."""
    keys = (
        "hidden_size",
        "num_layers",
        "num_attention_heads",
        "layernorm_epsilon",
        "bos_token_id",
        "mask_token_id",
        "gmask_token_id",
        "pre_seq_len",
        "prefix_projection",
    )
    return {k: getattr(config, k) for k in keys}
