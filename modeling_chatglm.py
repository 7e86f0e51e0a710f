"""ChatGLM-6B for PyTorch and transformers 5.

Loads the official checkpoints unchanged (same parameter names) and computes the same numbers as the official
remote code, which no longer runs on current transformers. The model is a GLM: a prefix-LM decoder whose prompt
(everything before `<sop>`) attends bidirectionally and whose answer is generated causally, with 2D rotary position
encoding (a position id and a block position id, each rotating one half of every attention head).

Layout of a row, v1.1 rule (used in prefill, decoding and training alike):

    tokens    a    b    c  [gMASK] <sop>  x    y
    position  0    1    2    3      3     3    3     <- from <sop> on, the index of the mask token
    block     0    0    0    0      1     2    3     <- 1, 2, 3, ... from <sop> on

Positions are counted from each row's first real token, so left padding changes nothing. The attention mask and the
positions are derived here from `input_ids` and the 2D padding mask: callers never build per-sample L x L tensors.
"""

import queue
import re
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg

try:  # loaded from a checkpoint folder by trust_remote_code
    from .configuration_chatglm import ChatGLMConfig
except ImportError:  # imported from the repository root
    from configuration_chatglm import ChatGLMConfig

logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# Positions and masks


def continue_positions(input_ids, config, real=None, state=None):
    """2D GLM positions [batch, 2, new] of `input_ids` [batch, new] that continue rows summarised by `state`, and the
    state after them. A state [batch, 4] holds per row: the real tokens so far, and the index (counted in real tokens)
    of the first [gMASK], [MASK] and <sop> among them, -1 for none yet. state=None: the rows start here.

    A decode step is a few [batch]-sized operations: nothing is re-derived over the rows' earlier tokens."""
    batch, length = input_ids.shape
    if real is None:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    if state is None:
        state = torch.tensor([0, -1, -1, -1], device=input_ids.device).expand(batch, 4)
    count, *seen = state.unbind(-1)
    rel = (count[:, None] + real.long().cumsum(-1) - 1).clamp(min=0)  # counted from the row's first real token

    def first(token_id, before):
        hits = (input_ids == token_id) & real
        here = torch.where(hits.any(-1), rel.gather(1, hits.int().argmax(-1, keepdim=True))[:, 0], -1)
        return torch.where(before >= 0, before, here)

    gmask, mask, sop = (first(t, s) for t, s in zip((config.gmask_token_id, config.mask_token_id,
                                                     config.bos_token_id), seen))
    anchor = torch.where(gmask >= 0, gmask, torch.where(mask >= 0, mask, (sop - 1).clamp(min=0)))
    answer = (sop[:, None] >= 0) & (rel >= sop[:, None])
    position = torch.where(answer, anchor[:, None], rel)
    block = torch.where(answer, rel - sop[:, None] + 1, torch.zeros_like(rel))
    state = torch.stack((count + real.long().sum(-1), gmask, mask, sop), dim=-1)
    return torch.stack((position, block), dim=1), state


def get_position_ids(input_ids, config, attention_mask=None):
    """2D GLM positions [batch, 2, length] for whole rows (v1.1 rule, see the module docstring)."""
    real = attention_mask.bool() if attention_mask is not None else None
    return continue_positions(input_ids, config, real)[0]


def prompt_lengths(input_ids, config, real, state=None):
    """Per row, how many of `input_ids`' tokens come before the row's <sop>, when that <sop> is among them (these
    attend bidirectionally); 0 when it is not (no <sop>, or one already in the cache: every new token is causal)."""
    hits = (input_ids == config.bos_token_id) & (real if real is not None else True)
    sop = torch.where(hits.any(-1), hits.int().argmax(-1), 0)
    return sop if state is None else torch.where(state[:, 3] >= 0, 0, sop)


def sdpa_attention_mask(config, inputs_embeds, input_ids=None, attention_mask=None, past_len=0, prefix_len=0,
                        prompt_len=None):
    """Boolean SDPA mask [batch, 1, new, prefix + past + new], True where a query may attend; None where SDPA needs none
    (its own causal mask is exact, or a single new token sees every key).

    `attention_mask` is the 2D padding mask over past and new tokens, or the official collators' dense mask
    [batch, 1, L, L] (True = hidden). Key j is visible to query i when it is a real token and either j <= i (causal)
    or j lies in the bidirectional prompt before `<sop>`; P-Tuning prefix keys are visible to every query.
    `prompt_len` [batch]: how many new tokens form the prompt (see prompt_lengths; default: derived from input_ids
    when nothing is cached, else 0).
    """
    batch, length, device = *inputs_embeds.shape[:2], inputs_embeds.device
    if attention_mask is not None and attention_mask.dim() == 4:
        allowed = ~attention_mask.to(device=device, dtype=torch.bool)
        return F.pad(allowed, (prefix_len, 0), value=True) if prefix_len else allowed

    if attention_mask is None:
        key_real = torch.ones(batch, past_len + length, dtype=torch.bool, device=device)
    else:
        key_real = attention_mask.to(device=device, dtype=torch.bool)
    if length == 1 and (prompt_len is None or not bool(prompt_len.any())):  # a decode step: every real key, itself
        if bool(key_real.all()):
            return None
        allowed = torch.cat((key_real[:, :-1], torch.ones_like(key_real[:, -1:])), dim=-1)
        return F.pad(allowed, (prefix_len, 0), value=True)[:, None, None] if prefix_len else allowed[:, None, None]
    if prompt_len is None:
        no_prompt = torch.zeros(batch, dtype=torch.long, device=device)
        prompt_len = prompt_lengths(input_ids, config, key_real[:, past_len:]) if past_len == 0 and input_ids \
            is not None else no_prompt
    prompt_len = prompt_len.to(device)
    if past_len == 0 and not prefix_len and bool(key_real.all()) and not bool(prompt_len.any()):
        return None  # plain causal: SDPA's is_causal

    k = torch.arange(past_len + length, device=device)
    q = torch.arange(past_len, past_len + length, device=device)
    allowed = (k[None, None, :] <= q[None, :, None]) | (k[None, None, :] < past_len + prompt_len[:, None, None])
    # A padding query may see nothing; letting every query see itself keeps softmax finite. Real outputs unchanged.
    allowed = (allowed & key_real[:, None, :]) | (k[None, None, :] == q[None, :, None])
    if prefix_len:
        allowed = F.pad(allowed, (prefix_len, 0), value=True)
    return allowed[:, None]


# ----------------------------------------------------------------------------------------------------------------------
# Rotary encoding


def rope_inv_freq(rot_dim, base=10000.0, device=None):
    # The official code stores these frequencies in float16; keep that rounding so fp32 logits match it exactly.
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim)
    return inv_freq.half().float()


def swap_quarters(x):
    """Each half of the head with its two quarters swapped: [a1 a2 | b1 b2] -> [a2 a1 | b2 b1] (one flip kernel)."""
    return x.unflatten(-1, (2, 2, x.shape[-1] // 4)).flip(-2).flatten(-3)


def apply_rotary(x, cos, signed_sin):
    """x rotated by the tables of RotaryEmbedding: x * cos + rotate_half(x) * sin for each half of the head, where
    rotate_half([a1 a2]) = [-a2 a1]; the minus sign lives in `signed_sin`, so this is a mul, a flip and an addcmul."""
    return torch.addcmul(x * cos, swap_quarters(x), signed_sin)


class RotaryEmbedding(nn.Module):
    """cos / signed sin tables for 2D rotary encoding (see apply_rotary), computed once per forward for every layer: the
    first half of a head turns with the position id, the second half with the block position id.

    The frequencies are recomputed in fp32 at each call rather than kept in a buffer: a buffer would follow
    `model.to(bfloat16)`, and bf16 frequencies are too coarse for long positions (the official code does the same)."""

    def __init__(self, config):
        super().__init__()
        self.rot_dim = config.head_dim // 2

    def forward(self, position_ids, dtype):
        inv_freq = rope_inv_freq(self.rot_dim, device=position_ids.device)
        inv_freq = torch.cat((inv_freq, inv_freq))
        # [batch, 2, length, rot_dim] -> [batch, length, head_dim]: position half, then block half
        angles = (position_ids[..., None].float() * inv_freq).transpose(1, 2).flatten(-2)
        # sin with rotate_half's sign folded in: minus on the first quarter of each half (see apply_rotary)
        signs = torch.tensor([[-1.0], [1.0]], device=angles.device)
        signed_sin = (angles.sin().unflatten(-1, (2, 2, -1)) * signs).flatten(-3)
        # broadcast over heads and over the (q, k) pair: [batch, length, 1, 1, head_dim]
        return angles.cos().to(dtype)[:, :, None, None], signed_sin.to(dtype)[:, :, None, None]


class CheckpointRotaryBuffer(nn.Module):
    """Home of the official checkpoints' per-layer `attention.rotary_emb.inv_freq`, so that they load and save without
    missing or unexpected keys. Never read: ChatGLMModel.rotary_emb computes the angles for all layers."""

    def __init__(self, head_dim):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim // 2))


# ----------------------------------------------------------------------------------------------------------------------
# Blocks


# Room a decode cache grows by when it is full: this fraction of its length plus a constant number of tokens.
CACHE_GROWTH, CACHE_SLACK = 0.5, 32


def append_to_cache(cache, layer_idx, k, v):
    """cache.update(k, v, layer_idx) for decoding without copying the whole cache at every token: a DynamicCache layer
    appended to a second time gets a buffer with room to spare (grown by CACHE_GROWTH when full), and its keys and
    values become views of the filled part, so each new token costs a write of its own keys and values. Anything else
    (a first append, offloaded or other caches, gradients on) goes through cache.update. Returns what it returns."""
    layer = cache.layers[layer_idx] if layer_idx < len(getattr(cache, "layers", ())) else None
    if (type(layer) is not DynamicLayer or getattr(cache, "offloading", False) or torch.is_grad_enabled()
            or not layer.is_initialized or layer.get_seq_length() == 0 or not getattr(layer, "glm_appended", False)):
        # the first append to this cache's layer (a prefill, or a cache rebuilt for one step) concatenates: only a
        # cache that is decoded into again gets spare room
        keys_values = cache.update(k, v, layer_idx)
        if type(layer) is DynamicLayer:
            layer.glm_appended = True
        return keys_values
    keys, values = layer.keys, layer.values
    used, new = keys.shape[-2], k.shape[-2]
    buffers = getattr(layer, "glm_buffers", None)
    if (buffers is None or buffers[0].data_ptr() != keys.data_ptr() or buffers[1].data_ptr() != values.data_ptr()
            or buffers[0].shape[:2] != keys.shape[:2] or buffers[0].shape[-2] < used + new
            or keys.stride() != buffers[0].stride() or values.stride() != buffers[1].stride()):
        room = used + new + int((used + new) * CACHE_GROWTH) + CACHE_SLACK
        buffers = tuple(t.new_empty(*t.shape[:2], room, t.shape[-1]) for t in (keys, values))
        buffers[0][..., :used, :] = keys
        buffers[1][..., :used, :] = values
        layer.glm_buffers = buffers
    buffers[0][..., used:used + new, :] = k
    buffers[1][..., used:used + new, :] = v
    layer.keys, layer.values = buffers[0][..., :used + new, :], buffers[1][..., :used + new, :]
    return layer.keys, layer.values


class SelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.rotary_emb = CheckpointRotaryBuffer(self.head_dim)
        # Official layout of the fused projection: per head, [q | k | v] consecutive.
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, rope, attn_mask=None, prefix_key=None, prefix_value=None, cache=None):
        batch, length, _ = x.shape
        qkv = self.query_key_value(x).view(batch, length, self.num_heads, 3, self.head_dim)
        qk, v = qkv.split((2, 1), dim=-2)  # split / unbind: their backward concatenates, no zero-filled buffers
        q, k = apply_rotary(qk, *rope).unbind(-2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.squeeze(-2).transpose(1, 2)  # [b, heads, len, d]
        if cache is not None:
            k, v = append_to_cache(cache, self.layer_idx, k, v)
        if prefix_key is not None:
            k = torch.cat((prefix_key.expand(batch, -1, -1, -1), k), dim=2)
            v = torch.cat((prefix_value.expand(batch, -1, -1, -1), v), dim=2)
        # Scores are q.k / sqrt(d); the official per-layer rescaling cancels out, so SDPA's default scale is exact.
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.dense(out.transpose(1, 2).reshape(batch, length, -1))


class GLU(nn.Module):
    """The official name for a plain two-layer MLP with tanh-approximated GELU."""

    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)
        # GLM's deep-norm style residual: the layer-normed input, scaled by sqrt(2 * num_layers), is the residual.
        self.alpha = (2 * config.num_layers) ** 0.5

    def forward(self, hidden_states, rope, attn_mask=None, prefix_key=None, prefix_value=None, cache=None):
        x = self.input_layernorm(hidden_states)
        h = torch.add(self.attention(x, rope, attn_mask, prefix_key, prefix_value, cache=cache), x, alpha=self.alpha)
        x = self.post_attention_layernorm(h)
        return torch.add(self.mlp(x), x, alpha=self.alpha)  # one kernel for x * alpha + mlp(x)


class PrefixEncoder(nn.Module):
    """P-Tuning v2: trainable per-layer key/value prefixes, optionally produced by a two-layer MLP."""

    def __init__(self, config):
        super().__init__()
        kv_size = config.num_layers * config.hidden_size * 2
        self.prefix_projection = config.prefix_projection
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, kv_size)
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, kv_size)

    def forward(self):
        kv = self.embedding.weight
        return self.trans(kv) if self.prefix_projection else kv


# ----------------------------------------------------------------------------------------------------------------------
# Loss

# fp32 logits per loss chunk. At the 6B vocab (130528) this is 512 tokens: large enough for an efficient LM-head matmul,
# small enough that a chunk's transients (bf16 + fp32 logits, log-softmax, their gradients: ~4x this) stay well under
# one full-sequence fp32 logits tensor (2048 tokens: 1.07 GB).
LOSS_CHUNK_BYTES = 256 * 2**20
# Inside a chunk, the forward's fp32 log-softmax runs over this many bytes of rows at a time.
LOG_SOFTMAX_ROWS_BYTES = 16 * 2**20


# On CPU, oneDNN computes a logits matmul with many rows and a small hidden size (mid-size models: 512 hidden, 32000
# vocab) up to 2x faster as column blocks of this many vocabulary entries written into one output than in one call,
# whose [rows, vocab] result does not stay in cache (measured with 2 threads: bf16 on an AMX Xeon, and fp32). The
# same dot products: the results are identical. Under 512 rows it is slower; at the 6B shape (hidden 4096, vocab
# 130528, 512 rows) it measured no faster, so hidden sizes above 2048 keep the single call.
CPU_VOCAB_BLOCK, CPU_VOCAB_BLOCK_MIN_ROWS, CPU_VOCAB_BLOCK_MAX_HIDDEN = 8192, 512, 2048

# fp32 on CPU, a few rows (decoding at batch 2..64) against a large head: MKL's [rows, hidden] @ weight.T reads the
# weight at 2.3-4 GB/s, while weight @ hidden.T (the same dot products as a tall product) reads it at 4-14 GB/s.
# Measured on a 2-core AMD EPYC (AVX2), 1 and 2 threads, vocab x hidden 32000 x 512 and 130528 x 4096: 1.3-4x as
# fast from 2 to 32 rows, 1-2x at 64, no faster at 1 row. The tied head cannot be prepacked without a second copy of
# the embedding table (runtime.pack_linears_for_cpu_inference), so this is how few-row logits avoid MKL's slow path.
CPU_TALL_ROWS, CPU_TALL_MIN_ELEMENTS = (2, 64), 4 * 2**20


def autocast_dtype(device_type):
    """The dtype autocast computes matmuls in on this device type now; None when autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def lm_logits(hidden, weight, dtype=None):
    """hidden [rows, hidden] @ weight[vocab, hidden].T with both cast to `dtype` (None: as they are; pass
    autocast_dtype() for what autocast would do); on the CPU in vocabulary blocks where that is faster
    (CPU_VOCAB_BLOCK), and for a few fp32 rows as the tall product weight @ hidden.T (CPU_TALL_ROWS).
    Not differentiable: for no-grad calls and hand-written backwards."""
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    rows = hidden.shape[0]
    cpu_no_grad = hidden.device.type == "cpu" and hidden.dtype == weight.dtype and not torch.is_grad_enabled()
    if (cpu_no_grad and hidden.dtype == torch.float32 and CPU_TALL_ROWS[0] <= rows <= CPU_TALL_ROWS[1]
            and weight.numel() >= CPU_TALL_MIN_ELEMENTS):
        return torch.mm(weight, hidden.t()).t().contiguous()
    if (not cpu_no_grad or rows < CPU_VOCAB_BLOCK_MIN_ROWS or hidden.shape[1] > CPU_VOCAB_BLOCK_MAX_HIDDEN
            or weight.shape[0] < 2 * CPU_VOCAB_BLOCK):
        return hidden @ weight.t()
    out = hidden.new_empty(rows, weight.shape[0])
    with torch.autocast("cpu", enabled=False):  # operands are cast already; out= calls take no autocast
        for start in range(0, weight.shape[0], CPU_VOCAB_BLOCK):
            block = slice(start, start + CPU_VOCAB_BLOCK)
            torch.mm(hidden, weight[block].t(), out=out[:, block])
    return out


def _chunk_loss_sum(lm_head, hidden, labels):
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, labels.to(logits.device), reduction="sum")


def _row_buffers(logits, rows, count):
    """`count` fp32 buffers of up to `rows` rows of `logits`, for the loss's row blocks."""
    shape = (min(rows, len(logits)), logits.shape[1])
    return [torch.empty(shape, dtype=torch.float32, device=logits.device) for _ in range(count)]


class ChunkCrossEntropy(torch.autograd.Function):
    """Summed cross entropy of `hidden @ weight.T` (fp32 log-softmax) with a hand-written backward that recomputes the
    logits instead of keeping them. Forward: one fused log_softmax kernel with an fp32 result, a few rows at a time,
    so the fp32 copy never has the chunk's size. Backward: the fp32 softmax from the saved log-sum-exp, minus one at
    the labels, scaled by the upstream gradient and only then rounded to the logits' dtype for the matmul (rounding
    the unscaled softmax instead made the bf16 demo learn measurably worse, twice), a few rows at a time, into the
    recomputed logits' own buffer. No zero-filled [tokens, vocab] buffer, no second log-softmax as autograd's cross
    entropy under checkpointing has. Equal to F.cross_entropy within fp32 rounding."""

    @staticmethod
    def forward(ctx, hidden, weight, labels):
        dtype = autocast_dtype(hidden.device.type)
        logits = lm_logits(hidden, weight, dtype)
        # fp32 log-probabilities a few rows at a time, in two buffers of LOG_SOFTMAX_ROWS_BYTES made once: fresh
        # transients per block left glibc's heap fragmented by the small results between them (measured: +240 MB RSS
        # for 1226 x 32000 logits); the same kernels, so the same numbers.
        rows = max(1, LOG_SOFTMAX_ROWS_BYTES // (4 * logits.shape[1]))
        fp32, logprobs = _row_buffers(logits, rows, 2)
        picked = logits.new_empty(len(labels), dtype=torch.float32)
        for start in range(0, len(labels), rows):
            n = min(rows, len(labels) - start)
            fp32[:n].copy_(logits[start:start + n])
            torch.log_softmax(fp32[:n], dim=-1, out=logprobs[:n])
            torch.gather(logprobs[:n], 1, labels[start:start + n, None], out=picked[start:start + n, None])
        lse = logits.gather(1, labels[:, None])[:, 0].float() - picked
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.compute_dtype = dtype  # backward recomputes the logits the same way
        return -picked.sum()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_logits = lm_logits(hidden, weight, ctx.compute_dtype)  # the logits, overwritten by their gradient
        rows = max(1, LOG_SOFTMAX_ROWS_BYTES // (4 * grad_logits.shape[1]))
        (buffer,) = _row_buffers(grad_logits, rows, 1)
        for start in range(0, len(labels), rows):  # a few rows at a time: the fp32 transient stays in cache
            part, wanted = slice(start, start + rows), labels[start:start + rows]
            probs = buffer[:len(wanted)]
            torch.sub(grad_logits[part], lse[part, None], out=probs).exp_()  # fp32: lse is
            probs[torch.arange(len(probs), device=labels.device), wanted] -= 1
            grad_logits[part] = probs.mul_(grad)
        dtype = grad_logits.dtype
        grad_hidden = (grad_logits @ weight.to(dtype)).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = ((grad_logits.t() @ hidden.to(dtype)).to(weight.dtype) if ctx.needs_input_grad[1]
                       else None)
        return grad_hidden, grad_weight, None


def local_weight(module):
    """Whether `module.weight` is a whole local tensor that may be read directly: not on the meta device, not
    partitioned by ZeRO-3, not offloaded by Accelerate hooks (those fill it only while the module runs)."""
    weight = getattr(module, "weight", None)
    return (weight is not None and weight.device.type != "meta" and not hasattr(weight, "ds_id")
            and not hasattr(module, "_hf_hook"))


def _plain_linear(module):
    """An nn.Linear without bias whose weight is a whole local tensor: ChunkCrossEntropy may read its weight."""
    return type(module) is nn.Linear and module.bias is None and local_weight(module) and module.weight.dim() == 2


def chunked_lm_loss(hidden_states, lm_head, labels, num_items_in_batch=None, chunk_tokens=None):
    """The shifted cross entropy of `lm_head(hidden_states)` against `labels` (-100 ignored), equal to the fp32 loss
    on full logits but computed on the labelled positions only, `chunk_tokens` at a time (default: LOSS_CHUNK_BYTES
    of fp32 logits). Each chunk is checkpointed: its logits are recomputed in backward instead of kept.

    Mean over the labelled tokens, or with `num_items_in_batch` their sum divided by it. No labelled token: nan (mean)
    or 0 (sum), as F.cross_entropy."""
    labels = labels[:, 1:].to(hidden_states.device)
    keep = labels != -100
    hidden, labels = hidden_states[:, :-1][keep], labels[keep]
    if chunk_tokens is None:
        chunk_tokens = max(1, LOSS_CHUNK_BYTES // (4 * lm_head.out_features))
    total = 0
    direct = torch.is_grad_enabled() and _plain_linear(lm_head) and len(labels) > 0
    for start in range(0, max(len(labels), 1), chunk_tokens):  # one (empty) chunk when nothing is labelled
        args = (lm_head, hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens])
        if direct:
            total = total + ChunkCrossEntropy.apply(args[1], lm_head.weight, args[2])
        elif torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, *args, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(*args)
    if num_items_in_batch is None:
        return total / len(labels)
    return total / torch.as_tensor(num_items_in_batch, device=total.device)


# ----------------------------------------------------------------------------------------------------------------------
# Models


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CheckpointRotaryBuffer):
            with torch.no_grad():
                module.inv_freq.copy_(rope_inv_freq(module.inv_freq.shape[0] * 2))


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        if config.quantization_bit:
            raise ValueError(
                f"quantization_bit={config.quantization_bit}: quantized ChatGLM checkpoints (chatglm-6b-int4/int8) "
                "store packed weights this implementation does not read; use the fp16 checkpoint"
            )
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.pre_seq_len = config.pre_seq_len
        if self.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(config)
            self.prefix_dropout = nn.Dropout(0.1)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def special_tokens_in(self, inputs_embeds):
        """Stand-in input_ids for an inputs_embeds-only call (PEFT's prompt tuning passes no ids): [gMASK], [MASK] and
        <sop> where a row's embedding equals theirs, -1 elsewhere; that is all positions and the mask need. Embeddings
        that were changed after the lookup hold none: the rows are then plain causal text (said once)."""
        ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        table = self.word_embeddings.weight
        if table.dim() == 2 and table.shape[0] > 0:  # (empty under ZeRO-3 partitioning)
            for token in (self.config.gmask_token_id, self.config.mask_token_id, self.config.bos_token_id):
                if token is not None and token < table.shape[0]:
                    row = table[token].to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
                    ids[(inputs_embeds == row).all(-1)] = token
        if not bool((ids == self.config.bos_token_id).any()):
            logger.warning_once("ChatGLM: inputs_embeds without input_ids and without the <sop> embedding: these rows "
                                "are taken as plain causal text (pass input_ids for GLM's bidirectional prompt)")
        return ids

    def prefix_key_values(self, dtype):
        """Per-layer (key, value) prefixes, each [1, heads, pre_seq_len, head_dim]."""
        cfg = self.config
        kv = self.prefix_dropout(self.prefix_encoder().to(dtype))
        kv = kv.view(self.pre_seq_len, cfg.num_layers * 2, cfg.num_attention_heads, cfg.head_dim)
        kv = kv.permute(1, 2, 0, 3)[:, None]  # [layers*2, 1, heads, pre_seq_len, d]
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(cfg.num_layers)]

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None, use_cache=None,
        **kwargs,
    ):
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        elif input_ids is None:
            input_ids = self.special_tokens_in(inputs_embeds)
        past = cache.get_seq_length() if cache is not None else 0
        length = inputs_embeds.shape[1]
        # Where the rows stand after the cached tokens (number, [gMASK] and <sop> seen), kept on the cache by this
        # method. A cache without it that holds entries is a prefix this model did not write (PEFT's prefix tuning):
        # like P-Tuning v2's, its keys are visible to every token and take no positions; the rows start here.
        state = getattr(cache, "glm_positions", None) if cache is not None else None
        padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        real = padding[:, -length:].to(device=input_ids.device, dtype=torch.bool) if padding is not None else None
        if position_ids is None or cache is not None:
            positions, next_state = continue_positions(input_ids, self.config, real, state)
            position_ids = positions if position_ids is None else position_ids
            if cache is not None:
                cache.glm_positions = next_state
        attn_mask = sdpa_attention_mask(self.config, inputs_embeds, input_ids, attention_mask, past,
                                        self.pre_seq_len or 0, prompt_lengths(input_ids, self.config, real, state))
        rope = self.rotary_emb(position_ids.to(inputs_embeds.device), inputs_embeds.dtype)

        prefixes = self.prefix_key_values(inputs_embeds.dtype) if self.pre_seq_len else [(None, None)] * len(self.layers)
        hidden_states = inputs_embeds
        for layer, (prefix_key, prefix_value) in zip(self.layers, prefixes):
            # prefixes go positionally: reentrant gradient checkpointing only passes gradients through positional args
            hidden_states = layer(hidden_states, rope, attn_mask, prefix_key, prefix_value, cache=cache)
        hidden_states = self.final_layernorm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


def build_chat_prompt(query, history=()):
    """ChatGLM's multi-round prompt: `[Round i]\\n问：…\\n答：…` for each past turn, then the open question."""
    if not history:
        return query
    rounds = [f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history)]
    return "".join(rounds) + f"[Round {len(history)}]\n问：{query}\n答："


_CJK = "[\u4e00-\u9fff]"
_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}


def clean_response(text):
    """What the official chat() shows: trimmed, with ASCII punctuation next to Chinese characters made full-width."""
    text = text.strip()
    for ascii_mark, wide in _FULL_WIDTH.items():
        mark = re.escape(ascii_mark)
        text = re.sub(f"({_CJK}){mark}", rf"\1{wide}", text)
        text = re.sub(f"{mark}({_CJK})", rf"{wide}\1", text)
    return text


class TokenQueueStreamer(BaseStreamer):
    """generate()'s streamer when generate() runs in a thread of its own: each step's new tokens [batch] go on a queue
    that the consumer iterates. The generating thread ends the queue with end() or, if it failed, with fail(error),
    which the consumer re-raises."""

    _END = object()

    def __init__(self):
        self.queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.queue.put(value)

    def end(self):
        self.queue.put(self._END)

    def fail(self, error):
        self.queue.put(error)

    def __iter__(self):
        while (item := self.queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item


class StopOnEvent(StoppingCriteria):
    """Ends generate() at its next step once `event` is set (the consumer of a stream stopped reading)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def pick_cache(cache, past_key_values):
    """`past_key_values` is the older name of `cache`, still the one PEFT passes (so no deprecation warning).
    generate() passes the cache under both names, and PEFT's
    prefix tuning puts its prefix under the old one at the first step, next to generate()'s empty cache: of two
    different caches, the one holding entries is used."""
    if past_key_values is None or past_key_values is cache:
        return cache
    if cache is None:
        return past_key_values
    filled = [c for c in (cache, past_key_values) if c.get_seq_length()]
    if len(filled) > 1:
        raise ValueError("cache and past_key_values are two different caches, both holding entries: pass one")
    return filled[0] if filled else cache


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    # A base checkpoint never holds a P-Tuning prefix; it comes from --ptuning_checkpoint or training.
    _keys_to_ignore_on_load_missing = [r"transformer\.prefix_encoder\."]
    accepts_loss_kwargs = True  # forward honours num_items_in_batch (Trainer then does not divide by accumulation)

    def __init__(self, config):
        super().__init__(config)
        self.loss_type = "ForCausalLM"  # labels shift inside forward: Trainer counts num_items_in_batch on labels[:, 1:]
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.pre_seq_len:  # P-Tuning v2 trains the prefix only
            for name, param in self.named_parameters():
                param.requires_grad_(name.startswith("transformer.prefix_encoder."))
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        return_dict=None,
        return_logits=None,
        **kwargs,
    ):
        """With `labels`, the loss is the shifted token cross entropy in fp32. `return_logits` (default: no labels, or
        gradients disabled) says whether `logits` are computed too; a training step (labels, gradients on) gets
        `logits=None` and a loss computed in chunks over the labelled positions only (chunked_lm_loss), so the full
        [tokens, vocab] fp32 logits and their gradient never exist. Pass `return_logits=True` to get both."""
        cache = pick_cache(cache, kwargs.pop("past_key_values", None))
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        if return_logits is None:
            return_logits = labels is None or not torch.is_grad_enabled()
        logits = self.output_logits(hidden_states) if return_logits else None

        # Loss in fp32 whatever the weights' dtype (the seed's CastOutputToFloat). With `num_items_in_batch` (the
        # labelled tokens of a whole accumulation window, over every process) it is the window's token sum divided by
        # that count, so accumulated and data-parallel gradients equal one big batch's.
        loss = None
        num_items_in_batch = kwargs.get("num_items_in_batch")
        if labels is not None and logits is None:
            loss = chunked_lm_loss(hidden_states, self.lm_head, labels, num_items_in_batch)
        elif labels is not None:
            labels = labels.to(logits.device)
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                reduction="mean" if num_items_in_batch is None else "sum",
            )
            if num_items_in_batch is not None:
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)

    def output_logits(self, hidden_states):
        """The LM head's logits of `hidden_states`; without gradients, in vocabulary blocks where that is faster."""
        if not torch.is_grad_enabled() and _plain_linear(self.lm_head):
            flat = lm_logits(hidden_states.flatten(0, -2), self.lm_head.weight, autocast_dtype(hidden_states.device.type))
            return flat.view(*hidden_states.shape[:-1], -1)
        return self.lm_head(hidden_states)

    # -- generation ------------------------------------------------------------------------------------------------

    def generate(self, *args, **kwargs):
        """GenerationMixin.generate, or, after glm_tune.static_decode.enable_static_decoding(model), its static-cache
        (optionally compiled) decoder for the calls that one supports."""
        decoder = getattr(self, "static_decoder", None)
        arguments = decoder.arguments(args, kwargs) if decoder is not None else None
        if arguments is not None:
            return decoder.generate(**arguments)
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # GLM positions cannot be extended by "+1" as generate() does for 1D ones. forward() derives them: from the
        # whole rows at the first step, then from the state it keeps on the cache (a few [batch]-sized operations per
        # new token). None here also keeps PEFT's prompt learning from shifting them.
        kwargs.pop("position_ids", None)
        inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        inputs["position_ids"] = None
        # Also under the name PEFT's prompt learning reads and replaces (forward() takes the cache that holds entries).
        inputs["past_key_values"] = inputs.get("cache")
        return inputs

    def _stream_tokens(self, **generate_kwargs):
        """generate(**generate_kwargs) in a thread of its own; yields each step's new tokens [batch] as they come.

        An exception in generate() is raised here. Closing this generator early (breaking out of the loop) stops
        generate() at its next step; either way the thread is joined before this generator finishes."""
        streamer, stop = TokenQueueStreamer(), threading.Event()
        stopping = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
        stopping.append(StopOnEvent(stop))

        def run():
            try:
                with torch.inference_mode():
                    self.generate(**generate_kwargs, streamer=streamer, stopping_criteria=stopping)
            except BaseException as error:  # handed to the consumer, which re-raises it
                streamer.fail(error)

        thread = threading.Thread(target=run, name="chatglm-generate", daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            stop.set()
            thread.join()

    def stream_generate(self, input_ids, attention_mask=None, max_new_tokens=256, do_sample=True, temperature=0.95,
                        top_p=0.7, top_k=0, repetition_penalty=1.0, eos_token_id=None, **generate_kwargs):
        """Yields the growing sequences [batch, length] after every new token: generate() with a streamer, so the
        tokens are generate()'s own (KV cache, sampling, EOS handling)."""
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
        sequences = input_ids
        for tokens in self._stream_tokens(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, **sampling, **generate_kwargs,
        ):
            sequences = torch.cat((sequences, tokens[:, None].to(sequences.device)), dim=-1)
            yield sequences

    def _chat_generate_kwargs(self, tokenizer, query, history, max_length, do_sample, top_p, temperature, **kwargs):
        """generate()'s arguments for one chat turn; chat() and stream_chat() share them, so their answers agree."""
        inputs = tokenizer([build_chat_prompt(query, history)], return_tensors="pt").to(self.device)
        sampling = dict(top_p=top_p, temperature=temperature) if do_sample else {}
        max_new_tokens = max(1, max_length - inputs["input_ids"].shape[1])
        return dict(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, **sampling, **kwargs)

    @torch.inference_mode()
    def chat(self, tokenizer, query, history=None, max_length=2048, num_beams=1, do_sample=True, top_p=0.7,
             temperature=0.95, **kwargs):
        """One answer to `query` given `history` [(query, answer), ...]; returns (answer, history + this turn)."""
        history = list(history or [])
        generate_kwargs = self._chat_generate_kwargs(tokenizer, query, history, max_length, do_sample, top_p,
                                                     temperature, num_beams=num_beams, **kwargs)
        output = self.generate(**generate_kwargs)
        answer_ids = output[0, generate_kwargs["input_ids"].shape[1]:]
        response = clean_response(tokenizer.decode(answer_ids, skip_special_tokens=True))
        return response, history + [(query, response)]

    def stream_chat(self, tokenizer, query, history=None, max_length=2048, do_sample=True, top_p=0.7,
                    temperature=0.95, **kwargs):
        """Like chat(), yielding (partial answer, history with the partial turn) after every new token."""
        history = list(history or [])
        generate_kwargs = self._chat_generate_kwargs(tokenizer, query, history, max_length, do_sample, top_p,
                                                     temperature, **kwargs)
        answer_ids = []
        for tokens in self._stream_tokens(**generate_kwargs):
            answer_ids.append(int(tokens[0]))
            response = clean_response(tokenizer.decode(answer_ids, skip_special_tokens=True))
            yield response, history + [(query, response)]


__all__ = ["ChatGLMModel", "ChatGLMForConditionalGeneration", "ChatGLMPreTrainedModel", "build_chat_prompt"]
