"""Prepacked linear layers for CPU inference (glm_tune.runtime.pack_linears_for_cpu_inference, issue 16): where the
CPU has native bf16 they replace every plain bf16 nn.Linear and give bit-identical logits and greedy tokens; fp32
layers from FP32_PACK_MIN_ELEMENTS weights up (forced here at tiny sizes) run oneDNN's kernel instead of MKL's and
agree within fp32 rounding, with the same greedy tokens; elsewhere (a CPU without native bf16 for bf16 weights, small
fp32 layers) the model is left as it is. Layers inside PEFT adapters stay, and so does a head tied to the embeddings."""

import pytest
import torch

from glm_tune import runtime
from glm_tune.lora import add_lora
from glm_tune.runtime import PackedLinear, can_pack_linears, pack_linears_for_cpu_inference
from test_generation import NEW, PROMPTS, greedy, left_pad, make_model

native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.skipif(not native_bf16, reason="needs a CPU with native bf16 (AMX / AVX512-BF16); the other branch is "
                                            "test_nothing_is_packed_without_bf16_weights_or_native_bf16")
def test_packed_bf16_model_gives_bit_identical_logits_and_tokens():
    model = make_model(seed=3).to(torch.bfloat16)
    packed = make_model(seed=3).to(torch.bfloat16)
    n = pack_linears_for_cpu_inference(packed)
    assert n == 3 * 4 + 1 and isinstance(packed.lm_head, PackedLinear)  # 4 per block, and the LM head
    ids, mask = left_pad(PROMPTS)
    with torch.inference_mode():
        assert torch.equal(packed(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    tokens = greedy(packed, ids, mask)
    assert tokens.shape == (3, NEW) and torch.equal(tokens, greedy(model, ids, mask))


@pytest.mark.skipif(not native_bf16, reason="needs a CPU with native bf16")
def test_lora_layers_are_left_to_peft_and_the_rest_is_packed():
    model = add_lora(make_model(seed=4).to(torch.bfloat16), target="query_key_value").eval()
    reference = add_lora(make_model(seed=4).to(torch.bfloat16), target="query_key_value").eval()
    reference.load_state_dict(model.state_dict())
    assert pack_linears_for_cpu_inference(model) == 3 * 3 + 1  # not the 3 query_key_value layers under LoRA
    ids, mask = left_pad(PROMPTS)
    assert torch.equal(greedy(model, ids, mask), greedy(reference, ids, mask))


def test_nothing_is_packed_without_native_bf16_or_in_small_fp32_layers(monkeypatch):
    fp32 = make_model(seed=5)
    assert can_pack_linears(fp32)  # fp32 layers can be packed, but these are far below FP32_PACK_MIN_ELEMENTS
    assert pack_linears_for_cpu_inference(fp32) == 0
    assert pack_linears_for_cpu_inference(fp32, fp32_min_elements=256 * 64 + 1) == 1  # the LM head, 300 x 64
    bf16 = make_model(seed=5).to(torch.bfloat16)
    monkeypatch.setattr(runtime.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # an AVX2-only CPU
    assert pack_linears_for_cpu_inference(bf16) == 0
    assert not any(isinstance(m, PackedLinear) for m in bf16.modules())


@pytest.mark.skipif(not native_bf16, reason="needs a CPU with native bf16")
def test_a_head_tied_to_the_embeddings_stays_one_tensor():
    # ChatGLM's LM head is the word embedding table: packing it would keep a second copy (1 GB for the 6B model).
    model = make_model(seed=6, tie_word_embeddings=True).to(torch.bfloat16)
    packed = make_model(seed=6, tie_word_embeddings=True).to(torch.bfloat16)
    assert packed.lm_head.weight is packed.get_input_embeddings().weight
    assert pack_linears_for_cpu_inference(packed) == 3 * 4  # the blocks' layers, not the head
    assert type(packed.lm_head) is torch.nn.Linear and packed.lm_head.weight is packed.get_input_embeddings().weight
    ids, mask = left_pad(PROMPTS)
    with torch.inference_mode():
        assert torch.equal(packed(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    assert torch.equal(greedy(packed, ids, mask), greedy(model, ids, mask))


def test_packed_fp32_layers_agree_within_rounding_and_give_the_same_tokens():
    model = make_model(seed=7)
    packed = make_model(seed=7)
    assert pack_linears_for_cpu_inference(packed, fp32_min_elements=0) == 3 * 4 + 1
    assert all(type(m) is not torch.nn.Linear for m in packed.modules())
    assert "packed float32" in repr(packed.lm_head)
    ids, mask = left_pad(PROMPTS)
    with torch.inference_mode():
        want, got = model(ids, attention_mask=mask).logits, packed(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tokens = greedy(packed, ids, mask)
    assert tokens.shape == (3, NEW) and torch.equal(tokens, greedy(model, ids, mask))
    # one row at a time (a decode step): the path where the kernels differ most
    with torch.inference_mode():
        row = torch.randn(1, 1, 64)
        torch.testing.assert_close(packed.lm_head(row), model.lm_head(row), rtol=1e-5, atol=1e-5)


def test_fp32_lora_layers_stay_with_peft_and_the_rest_is_packed():
    model = add_lora(make_model(seed=8), target="query_key_value").eval()
    reference = add_lora(make_model(seed=8), target="query_key_value").eval()
    reference.load_state_dict(model.state_dict())
    assert pack_linears_for_cpu_inference(model, fp32_min_elements=0) == 3 * 3 + 1
    ids, mask = left_pad(PROMPTS)
    assert torch.equal(greedy(model, ids, mask), greedy(reference, ids, mask))


def test_an_fp32_head_tied_to_the_embeddings_stays_one_tensor():
    packed = make_model(seed=9, tie_word_embeddings=True)
    assert pack_linears_for_cpu_inference(packed, fp32_min_elements=0) == 3 * 4  # the blocks' layers, not the head
    assert type(packed.lm_head) is torch.nn.Linear and packed.lm_head.weight is packed.get_input_embeddings().weight
