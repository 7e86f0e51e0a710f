"""Prepacked bf16 linear layers for CPU inference (glm_tune.runtime.pack_linears_for_cpu_inference, issue 16): where
the CPU has native bf16 they replace every plain nn.Linear and give bit-identical logits and greedy tokens; elsewhere
(fp32 weights, or a CPU without native bf16) the model is left as it is. Layers inside PEFT adapters stay."""

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


def test_nothing_is_packed_without_bf16_weights_or_native_bf16(monkeypatch):
    fp32 = make_model(seed=5)
    assert not can_pack_linears(fp32) and pack_linears_for_cpu_inference(fp32) == 0
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
