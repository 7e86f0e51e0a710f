"""The fast ChatGLM implementation against the plain float64 reference (tests/reference_chatglm.py).

The fast model is used only as a black box through the Hugging Face API (config, model, forward with labels). Its
randomly initialised weights are re-drawn from a seeded normal (std 0.2, LayerNorm weights around 1) so that any wrong
formula moves the logits far beyond the tolerance. The reference is also checked on its own: each of its position /
mask / layout rules is perturbed in turn and must move the logits by more than 1e-2, which shows that the comparison
is able to fail.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import reference_chatglm as ref
from configuration_chatglm import ChatGLMConfig
from modeling_chatglm import ChatGLMForConditionalGeneration

LOGITS_ATOL = 1e-4
LOSS_ATOL = 1e-5
SENSITIVITY_MIN = 1e-2

# Small model; special ids inside the vocabulary.
VOCAB = 300
HIDDEN = 64
LAYERS = 3
HEADS = 4
INNER = 256
MASK, GMASK, BOS, EOS, PAD = 290, 291, 294, 295, 3
PRE_SEQ_LEN = 4
WEIGHT_STD = 0.2


def _words(n: int, seed: int) -> list[int]:
    """n ordinary (non-special) token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 280, (n,), generator=g).tolist()


_PROMPT = _words(9, 1)
_ANSWER = _words(5, 2)

# name -> (input_ids, labels). Names state the rule that the case pins down.
CASES: dict[str, tuple[list[int], list[int]]] = {}


def _case(name: str, ids: list[int], labels: list[int] | None = None) -> None:
    CASES[name] = (ids, list(ids) if labels is None else labels)


_ids_a = _PROMPT + [GMASK, BOS] + _ANSWER + [EOS]
_case("gmask_prompt_then_sop_answer__positions_freeze_at_gmask_blocks_count_from_sop", _ids_a)

_ids_b = _PROMPT[:4] + [MASK] + _PROMPT[4:] + [BOS] + _ANSWER
_case("mask_mid_prompt_without_gmask__positions_freeze_at_mask", _ids_b)

_ids_c = _PROMPT[:3] + [MASK] + _PROMPT[3:7] + [GMASK] + _PROMPT[7:] + [BOS] + _ANSWER
_case("mask_and_gmask_both_present__gmask_wins", _ids_c)

_ids_d = _words(14, 3)
_case("no_sop__plain_causal_positions_t_blocks_zero", _ids_d)

_ctx_a = _ids_a.index(BOS)
_labels_e = [-100] * (_ctx_a + 1) + _ids_a[_ctx_a + 1 :]
_case("labels_ignore_prompt_with_minus_100__loss_over_answer_only", _ids_a, _labels_e)

EQUIVALENCE_CASES = sorted(CASES)
PREFIX_CASES = {
    "ptuning_v2_prefix_4_without_projection__prefix_kv_visible_to_all_queries": False,
    "ptuning_v2_prefix_4_with_projection__mlp_prefix_encoder": True,
}


# ------------------------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------------------------
def _draw(name: str, shape, g: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=g, dtype=torch.float32) * WEIGHT_STD
    if "layernorm" in name and name.endswith(".weight"):
        return 1.0 + noise
    return noise


def _rerandomize(model: torch.nn.Module, seed: int = 1234) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            param.copy_(_draw(name, param.shape, g))


def _reference_cfg(pre_seq_len=None, prefix_projection=False) -> dict:
    return {
        "hidden_size": HIDDEN,
        "num_layers": LAYERS,
        "num_attention_heads": HEADS,
        "layernorm_epsilon": 1e-5,
        "bos_token_id": BOS,
        "mask_token_id": MASK,
        "gmask_token_id": GMASK,
        "pre_seq_len": pre_seq_len,
        "prefix_projection": prefix_projection,
    }


def _standalone_state_dict(cfg: dict, seed: int = 99) -> dict:
    """Random weights in the official layout, built without the fast model (for reference-only tests)."""
    g = torch.Generator().manual_seed(seed)
    h = cfg["hidden_size"]
    shapes = {"transformer.word_embeddings.weight": (VOCAB, h)}
    for l in range(cfg["num_layers"]):
        p = f"transformer.layers.{l}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "input_layernorm.bias": (h,),
                p + "attention.query_key_value.weight": (3 * h, h),
                p + "attention.query_key_value.bias": (3 * h,),
                p + "attention.dense.weight": (h, h),
                p + "attention.dense.bias": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "post_attention_layernorm.bias": (h,),
                p + "mlp.dense_h_to_4h.weight": (INNER, h),
                p + "mlp.dense_h_to_4h.bias": (INNER,),
                p + "mlp.dense_4h_to_h.weight": (h, INNER),
                p + "mlp.dense_4h_to_h.bias": (h,),
            }
        )
    shapes["transformer.final_layernorm.weight"] = (h,)
    shapes["transformer.final_layernorm.bias"] = (h,)
    shapes["lm_head.weight"] = (VOCAB, h)
    kv_width = cfg["num_layers"] * 2 * h
    if cfg["pre_seq_len"] is not None:
        if cfg["prefix_projection"]:
            shapes["transformer.prefix_encoder.embedding.weight"] = (cfg["pre_seq_len"], h)
            shapes["transformer.prefix_encoder.trans.0.weight"] = (h, h)
            shapes["transformer.prefix_encoder.trans.0.bias"] = (h,)
            shapes["transformer.prefix_encoder.trans.2.weight"] = (kv_width, h)
            shapes["transformer.prefix_encoder.trans.2.bias"] = (kv_width,)
        else:
            shapes["transformer.prefix_encoder.embedding.weight"] = (cfg["pre_seq_len"], kv_width)
    return {name: _draw(name, shape, g) for name, shape in sorted(shapes.items())}


# ------------------------------------------------------------------------------------------------------------------
# Fast model (black box)
# ------------------------------------------------------------------------------------------------------------------
_MODELS: dict = {}


def _fast_model(pre_seq_len=None, prefix_projection=False):
    key = (pre_seq_len, prefix_projection)
    if key not in _MODELS:
        config = ChatGLMConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_layers=LAYERS,
            num_attention_heads=HEADS,
            inner_hidden_size=INNER,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=PAD,
            mask_token_id=MASK,
            gmask_token_id=GMASK,
            pre_seq_len=pre_seq_len,
            prefix_projection=prefix_projection,
        )
        torch.manual_seed(0)
        model = ChatGLMForConditionalGeneration(config).eval()
        model.float()
        _rerandomize(model)
        _MODELS[key] = model
    return _MODELS[key]


def _compare(model, ids: list[int], labels: list[int]) -> tuple[float, float]:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    fast_logits = out.logits[0].to(torch.float64)
    cfg = ref.config_dict(model.config)
    want = ref.reference_logits(model.state_dict(), cfg, ids, dtype=torch.float64)
    want_loss = ref.reference_loss(want, labels)
    assert fast_logits.shape == want.shape, (fast_logits.shape, want.shape)
    logits_diff = (fast_logits - want).abs().max().item()
    loss_diff = abs(out.loss.item() - want_loss.item())
    print(f"max|logits diff| = {logits_diff:.3e}  |loss diff| = {loss_diff:.3e}  (loss {want_loss.item():.6f})")
    return logits_diff, loss_diff


@pytest.mark.parametrize("case", EQUIVALENCE_CASES)
def test_fast_matches_reference(case):
    ids, labels = CASES[case]
    logits_diff, loss_diff = _compare(_fast_model(), ids, labels)
    assert logits_diff <= LOGITS_ATOL, f"{case}: max |fast - reference| logits = {logits_diff:.3e}"
    assert loss_diff <= LOSS_ATOL, f"{case}: |fast - reference| loss = {loss_diff:.3e}"


@pytest.mark.parametrize("case", sorted(PREFIX_CASES))
def test_fast_matches_reference_with_ptuning_prefix(case):
    model = _fast_model(pre_seq_len=PRE_SEQ_LEN, prefix_projection=PREFIX_CASES[case])
    ids, labels = CASES["gmask_prompt_then_sop_answer__positions_freeze_at_gmask_blocks_count_from_sop"]
    logits_diff, loss_diff = _compare(model, ids, labels)
    assert logits_diff <= LOGITS_ATOL, f"{case}: max |fast - reference| logits = {logits_diff:.3e}"
    assert loss_diff <= LOSS_ATOL, f"{case}: |fast - reference| loss = {loss_diff:.3e}"


# ------------------------------------------------------------------------------------------------------------------
# The reference on its own
# ------------------------------------------------------------------------------------------------------------------
_ORIG_POSITIONS = ref.position_and_block_ids
_ORIG_SPLIT = ref.split_qkv
_ORIG_PREFIX = ref.prefix_key_values


def _positions_t_after_sop(ids, cfg):
    position, block, ctx = _ORIG_POSITIONS(ids, cfg)
    return list(range(len(ids))), block, ctx


def _blocks_zero(ids, cfg):
    position, block, ctx = _ORIG_POSITIONS(ids, cfg)
    return position, [0] * len(ids), ctx


def _mask_before_gmask(ids, cfg):
    position, block, ctx = _ORIG_POSITIONS(ids, cfg)
    mask_pos = ids.index(cfg["mask_token_id"])
    return [p if t < ctx else mask_pos for t, p in enumerate(position)], block, ctx


def _causal_everywhere(i, j, ctx):
    return j <= i


def _qkv_three_contiguous_blocks(qkv, heads, head_dim):
    L = qkv.shape[0]
    hidden = heads * head_dim
    q, k, v = qkv[:, :hidden], qkv[:, hidden : 2 * hidden], qkv[:, 2 * hidden :]
    return q.reshape(L, heads, head_dim), k.reshape(L, heads, head_dim), v.reshape(L, heads, head_dim)


def _prefix_key_value_swapped(sd, cfg, dtype, prefix_state=None):
    kv = _ORIG_PREFIX(sd, cfg, dtype, prefix_state)
    return None if kv is None else [(v, k) for k, v in kv]


# name -> (attribute of the reference module to replace, replacement, case row, prefix config)
PERTURBATIONS = {
    "positions_after_sop_count_t_instead_of_freezing_at_mask_pos": (
        "position_and_block_ids", _positions_t_after_sop, "gmask_prompt_then_sop_answer__positions_freeze_at_gmask_blocks_count_from_sop", None
    ),
    "block_positions_all_zero": (
        "position_and_block_ids", _blocks_zero, "gmask_prompt_then_sop_answer__positions_freeze_at_gmask_blocks_count_from_sop", None
    ),
    "first_mask_wins_over_gmask": (
        "position_and_block_ids", _mask_before_gmask, "mask_and_gmask_both_present__gmask_wins", None
    ),
    "causal_mask_over_prompt_instead_of_bidirectional": (
        "attention_allowed", _causal_everywhere, "gmask_prompt_then_sop_answer__positions_freeze_at_gmask_blocks_count_from_sop", None
    ),
    "qkv_split_as_three_contiguous_blocks_instead_of_per_head": (
        "split_qkv", _qkv_three_contiguous_blocks, "no_sop__plain_causal_positions_t_blocks_zero", None
    ),
    "prefix_key_and_value_swapped": (
        "prefix_key_values", _prefix_key_value_swapped, "gmask_prompt_then_sop_answer__positions_freeze_at_gmask_blocks_count_from_sop", False
    ),
}


@pytest.mark.parametrize("perturbation", sorted(PERTURBATIONS))
def test_reference_is_sensitive_to_each_rule(perturbation, monkeypatch):
    attr, replacement, case, prefix_projection = PERTURBATIONS[perturbation]
    cfg = _reference_cfg(
        pre_seq_len=None if prefix_projection is None else PRE_SEQ_LEN, prefix_projection=bool(prefix_projection)
    )
    sd = _standalone_state_dict(cfg)
    ids = CASES[case][0]
    base = ref.reference_logits(sd, cfg, ids)
    monkeypatch.setattr(ref, attr, replacement)
    changed = ref.reference_logits(sd, cfg, ids)
    diff = (base - changed).abs().max().item()
    print(f"{perturbation}: max |logits change| = {diff:.3e}")
    assert diff > SENSITIVITY_MIN, f"perturbing '{perturbation}' moved the reference logits by only {diff:.3e}"


@pytest.mark.parametrize("prefix_projection", [False, True], ids=["without_projection", "with_projection"])
def test_reference_prefix_changes_logits_but_not_positions(prefix_projection):
    cfg = _reference_cfg(pre_seq_len=PRE_SEQ_LEN, prefix_projection=prefix_projection)
    sd = _standalone_state_dict(cfg)
    ids = CASES["gmask_prompt_then_sop_answer__positions_freeze_at_gmask_blocks_count_from_sop"][0]
    with_prefix = ref.reference_logits(sd, cfg, ids)
    without = ref.reference_logits(sd, dict(cfg, pre_seq_len=None), ids)
    assert (with_prefix - without).abs().max().item() > SENSITIVITY_MIN
    # Supplying the prefix encoder output directly gives the same result as computing it from the weights.
    kv = ref.prefix_key_values(sd, cfg, torch.float64)
    flat = torch.stack([torch.stack([k, v], dim=1) for k, v in kv], dim=1).reshape(PRE_SEQ_LEN, -1)  # [P, layers, 2, heads, d]
    again = ref.reference_logits(sd, dict(cfg, pre_seq_len=None), ids, prefix_state=flat)
    assert torch.allclose(again, with_prefix, atol=1e-12, rtol=0)


def test_reference_positions_follow_v11_rules():
    cfg = _reference_cfg()
    ids = [10, 11, MASK, 12, GMASK, BOS, 20, 21]
    position, block, ctx = ref.position_and_block_ids(ids, cfg)
    assert ctx == 5
    assert position == [0, 1, 2, 3, 4, 4, 4, 4]
    assert block == [0, 0, 0, 0, 0, 1, 2, 3]
    assert ref.position_and_block_ids([10, 11, 12], cfg) == ([0, 1, 2], [0, 0, 0], 0)
    assert ref.attention_allowed(0, 4, ctx) and not ref.attention_allowed(5, 6, ctx)


def test_reference_float32_agrees_with_float64_and_loss_matches_torch():
    cfg = _reference_cfg()
    sd = _standalone_state_dict(cfg)
    ids, _ = CASES["gmask_prompt_then_sop_answer__positions_freeze_at_gmask_blocks_count_from_sop"]
    labels = CASES["labels_ignore_prompt_with_minus_100__loss_over_answer_only"][1]
    l64 = ref.reference_logits(sd, cfg, ids, dtype=torch.float64)
    l32 = ref.reference_logits(sd, cfg, ids, dtype=torch.float32)
    assert l32.dtype == torch.float32 and l64.dtype == torch.float64
    assert (l64 - l32.double()).abs().max().item() < 1e-4
    want = F.cross_entropy(l64[:-1], torch.tensor(labels[1:]), ignore_index=-100)
    got = ref.reference_loss(l64, labels)
    assert math.isclose(got.item(), want.item(), abs_tol=1e-12)
