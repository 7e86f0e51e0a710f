"""PEFT's prefix tuning and prompt tuning on the model (issue 17).

Each is checked against an independent computation: PEFT's prefix tuning gives the logits and tokens of the model's own
P-Tuning v2 prefix holding the same key/value tensors; prompt tuning whose virtual tokens are set to the embeddings of
real tokens gives the logits of the base model reading those tokens. Generation with the KV cache equals generation
without it, and a few training steps lower the loss while changing only the prompt parameters."""

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

from test_generation import GMASK, NEW, PROMPTS, SOP, greedy, left_pad, make_model

VIRTUAL = 4


def prefix_tuned(seed=0):
    model = get_peft_model(make_model(seed), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL))
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def prompt_tuned(seed=0):
    model = get_peft_model(make_model(seed), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL))
    return model.eval()


def train_steps(model, steps=8):
    ids, mask = left_pad(PROMPTS)
    labels = torch.cat((torch.full_like(ids, -100), torch.randint(5, 280, (3, 4), generator=torch.Generator()
                                                                  .manual_seed(0))), dim=1)
    ids = torch.cat((ids, labels[:, -4:]), dim=1)
    mask = torch.cat((mask, torch.ones(3, 4, dtype=mask.dtype)), dim=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    return losses, changed


def test_prefix_tuning_equals_the_models_own_ptuning_prefix_with_the_same_keys_and_values():
    peft_model = prefix_tuned()
    own = make_model(0, pre_seq_len=VIRTUAL, prefix_projection=False).eval()
    missing, unexpected = own.load_state_dict(make_model(0).state_dict(), strict=False)  # the same base weights
    assert not unexpected and all(k.startswith("transformer.prefix_encoder.") for k in missing)
    with torch.no_grad():  # both lay the table out as [virtual, layers * 2 * heads * head_dim]
        own.transformer.prefix_encoder.embedding.weight.copy_(peft_model.prompt_encoder["default"].embedding.weight)
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        want = own(ids, attention_mask=mask).logits
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    tokens = greedy(peft_model, ids, mask)
    assert torch.equal(tokens, greedy(own, ids, mask))
    assert not torch.equal(tokens, greedy(make_model(0), ids, mask))  # the prefix changes the answer


def test_prefix_tuning_generates_the_same_with_and_without_the_cache_and_trains_only_the_prefix():
    model = prefix_tuned(seed=1)
    ids, mask = left_pad(PROMPTS)
    cached = greedy(model, ids, mask)
    assert cached.shape == (3, NEW)
    assert torch.equal(cached, greedy(model, ids, mask, use_cache=False))
    assert torch.equal(cached[1], greedy(model, torch.tensor([PROMPTS[1]]))[0])  # batched = alone
    losses, changed = train_steps(model)
    assert losses[-1] < losses[0] - 0.1, losses
    assert changed and all(n.startswith("prompt_encoder.") for n in changed), changed


def test_prompt_tuning_with_real_token_embeddings_equals_the_base_model_reading_those_tokens():
    model = prompt_tuned(seed=2)
    base = make_model(2)
    virtual_ids = [40, 41, 42, 43]
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(base.transformer.word_embeddings.weight[virtual_ids])
    row = PROMPTS[1]
    with torch.no_grad():
        got = model(input_ids=torch.tensor([row])).logits
        want = base(torch.tensor([virtual_ids + row])).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    tokens = greedy(model, torch.tensor([row]))
    assert torch.equal(tokens, greedy(base, torch.tensor([virtual_ids + row])))


def test_prompt_tuning_generates_the_same_with_and_without_the_cache_and_trains_only_the_prompt():
    model = prompt_tuned(seed=3)
    ids, mask = left_pad(PROMPTS)
    cached = greedy(model, ids, mask)
    assert torch.equal(cached, greedy(model, ids, mask, use_cache=False))
    losses, changed = train_steps(model)
    assert losses[-1] < losses[0] - 0.1, losses
    assert changed and all(n.startswith("prompt_encoder.") for n in changed), changed


def test_embeddings_without_ids_keep_the_glm_prompt_when_the_sop_embedding_is_there():
    model = make_model(4)
    row = torch.tensor([PROMPTS[0]])
    embeds = model.transformer.word_embeddings(row)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(row).logits, atol=1e-6, rtol=0)
    assert row[0, -1] == SOP and row[0, -2] == GMASK


def test_embeddings_without_any_sop_are_plain_causal_and_say_so(monkeypatch):
    import modeling_chatglm

    said = []
    monkeypatch.setattr(modeling_chatglm.logger, "warning_once", said.append)
    model = make_model(5)
    embeds = torch.randn(1, 6, model.config.hidden_size)
    with torch.no_grad():
        out = model(inputs_embeds=embeds).logits
        head = model(inputs_embeds=embeds[:, :3]).logits  # causal: a prefix of the row gives the same logits
    torch.testing.assert_close(out[:, :3], head, atol=1e-6, rtol=0)
    assert len(said) == 2 and "plain causal" in said[0] and "\n" not in said[0]


@pytest.mark.parametrize("make", [prefix_tuned, prompt_tuned])
def test_a_batch_with_left_padding_gives_each_row_its_own_answer(make):
    model = make(seed=6)
    ids, mask = left_pad(PROMPTS)
    batched = greedy(model, ids, mask)
    for i, row in enumerate(PROMPTS):
        assert torch.equal(batched[i], greedy(model, torch.tensor([row]))[0]), i
