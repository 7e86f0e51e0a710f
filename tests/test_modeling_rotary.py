"""The rotary encoding has one owner: ChatGLMModel.rotary_emb computes cos / sin once per forward for every layer.

Its rotation is checked against the float64 reference (tests/reference_chatglm.py), and the official checkpoints'
per-layer `attention.rotary_emb.inv_freq` buffers are shown to be loaded (no missing or unexpected keys, the written
values) yet never read."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import reference_chatglm as ref
from configuration_chatglm import ChatGLMConfig
from modeling_chatglm import ChatGLMForConditionalGeneration, RotaryEmbedding, apply_rotary, get_position_ids
from tokenization_chatglm import ChatGLMTokenizer

MASK, GMASK, SOP, EOP, PAD = 290, 291, 294, 295, 3
SHAPE = dict(hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=128)
ROTATION_ATOL = 1e-5  # fp32 cos / sin of angles up to ~40 rad, on inputs of size ~1


def small_config(**overrides):
    return ChatGLMConfig(vocab_size=300, bos_token_id=SOP, eos_token_id=EOP, pad_token_id=PAD, mask_token_id=MASK,
                         gmask_token_id=GMASK, **{**SHAPE, **overrides})


def reference_rotation(x, position, block):
    """x [L, heads, d] rotated by the reference: first half with the position ids, second half with the blocks."""
    half = x.shape[-1] // 2
    inv_freq = ref.rotary_inv_freq(half, torch.float64)
    return torch.cat((ref.rope(x[..., :half], position, inv_freq), ref.rope(x[..., half:], block, inv_freq)), -1)


ROWS = {
    "gmask_prompt_then_answer": list(range(10, 40)) + [GMASK, SOP] + list(range(50, 58)),
    "mask_mid_prompt": [10, 11, MASK, 12, 13, SOP, 20, 21, 22],
    "no_sop": list(range(10, 50)),
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_the_models_rotary_module_rotates_q_and_k_like_the_float64_reference(row):
    config = small_config()
    rotary = ChatGLMForConditionalGeneration(config).transformer.rotary_emb
    ids = ROWS[row]
    position, block, _ = ref.position_and_block_ids(ids, ref.config_dict(config))
    positions = get_position_ids(torch.tensor([ids]), config)
    assert positions[0].tolist() == [position, block]

    cos, sin = rotary(positions, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(ids), config.num_attention_heads, 2, config.head_dim, generator=g)
    got = apply_rotary(x[None], cos, sin)[0].double()  # [L, heads, (q, k), d]
    for i in range(2):
        want = reference_rotation(x[:, :, i].double(), position, block)
        assert (got[:, :, i] - want).abs().max().item() <= ROTATION_ATOL
    # the comparison can fail: the halves swapped (block ids on the first half) are far outside the tolerance
    swapped = reference_rotation(x[:, :, 0].double(), block, position)
    assert (got[:, :, 0] - swapped).abs().max().item() > 100 * ROTATION_ATOL


def test_rotary_tables_keep_fp16_rounded_frequencies_in_fp32_after_a_cast_to_bfloat16():
    model = ChatGLMForConditionalGeneration(small_config()).to(torch.bfloat16)
    positions = torch.tensor([[[0, 1000, 2047], [0, 0, 1]]])
    cos, signed_sin = model.transformer.rotary_emb(positions, torch.float32)
    half = model.config.head_dim // 2
    inv_freq = ref.rotary_inv_freq(half, torch.float64)
    want = torch.cat((torch.cat((inv_freq, inv_freq)) * 2047, torch.cat((inv_freq, inv_freq)) * 1))
    signs = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64).repeat_interleave(half // 2)  # rotate_half's
    torch.testing.assert_close(cos[0, 2, 0, 0].double(), want.cos(), atol=1e-3, rtol=0)
    torch.testing.assert_close(signed_sin[0, 2, 0, 0].double(), want.sin() * signs, atol=1e-3, rtol=0)


def test_official_per_layer_inv_freq_buffers_load_but_one_rotary_module_does_the_work(make_checkpoint, tmp_path):
    official = make_checkpoint("v1.1", ("safetensors",), **SHAPE)
    # A copy whose per-layer inv_freq hold marker values: they must load as written and change nothing.
    folder = tmp_path / "marked"
    shutil.copytree(official, folder)
    weights = load_file(folder / "model.safetensors")
    layer_keys = [f"transformer.layers.{i}.attention.rotary_emb.inv_freq" for i in range(SHAPE["num_layers"])]
    assert all(key in weights for key in layer_keys)
    for i, key in enumerate(layer_keys):
        weights[key] = torch.arange(weights[key].numel(), dtype=weights[key].dtype) + 100 * i
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    plain = ChatGLMForConditionalGeneration.from_pretrained(official, dtype=torch.float32).eval()
    model, info = ChatGLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                                  output_loading_info=True)
    model.eval()
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    state = model.state_dict()
    assert set(weights) <= set(state)
    assert not any(key.startswith("transformer.rotary_emb") for key in state)  # the shared module adds no key
    assert all(torch.equal(state[key], weights[key]) for key in layer_keys)

    rotaries = [name for name, module in model.named_modules() if isinstance(module, RotaryEmbedding)]
    assert rotaries == ["transformer.rotary_emb"]
    calls = []
    handle = model.transformer.rotary_emb.register_forward_hook(lambda *args: calls.append(1))
    tokenizer = ChatGLMTokenizer.from_pretrained(folder)
    batch = tokenizer(["你好，世界", "今天天气很好"], return_tensors="pt", padding=True)
    try:
        logits = model(**batch).logits
    finally:
        handle.remove()
    assert len(calls) == 1  # once per forward, for all layers
    assert torch.equal(logits, plain(**batch).logits)
