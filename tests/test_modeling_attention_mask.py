"""sdpa_attention_mask: the one place ChatGLMModel's attention mask comes from.

It returns None whenever SDPA needs no mask (plain causal rows, one new token that may see everything), and otherwise
the boolean [batch, 1, new, prefix + keys] mask of the GLM rule, which must agree with the reference's rule for every
real query / key pair."""

import torch

import reference_chatglm as ref
from configuration_chatglm import ChatGLMConfig
from modeling_chatglm import sdpa_attention_mask

MASK, GMASK, SOP, EOP, PAD = 290, 291, 294, 295, 3
CONFIG = ChatGLMConfig(vocab_size=300, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=128,
                       bos_token_id=SOP, eos_token_id=EOP, pad_token_id=PAD, mask_token_id=MASK, gmask_token_id=GMASK)


def embeds(batch, length):
    return torch.zeros(batch, length, CONFIG.hidden_size)


def test_rows_without_padding_prompt_or_prefix_need_no_mask():
    ids = torch.tensor([[10, 11, 12, 13]])
    assert sdpa_attention_mask(CONFIG, embeds(1, 4), ids) is None
    assert sdpa_attention_mask(CONFIG, embeds(1, 4), ids, torch.ones(1, 4)) is None
    # decoding one token after a cache of 6, nothing padded: it sees every key
    assert sdpa_attention_mask(CONFIG, embeds(1, 1), ids[:, :1], torch.ones(1, 7), past_len=6) is None


def test_left_padded_prompts_follow_the_reference_rule_on_every_real_pair():
    rows = [[10, 11, GMASK, SOP, 20, 21], [12, GMASK, SOP, 22]]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    padding = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    allowed = sdpa_attention_mask(CONFIG, embeds(2, width), ids, padding)
    assert allowed.shape == (2, 1, width, width) and allowed.dtype == torch.bool
    cfg = ref.config_dict(CONFIG)
    for b, row in enumerate(rows):
        pad = width - len(row)
        _, _, ctx = ref.position_and_block_ids(row, cfg)
        real = allowed[b, 0, pad:, pad:]
        want = [[ref.attention_allowed(i, j, ctx) for j in range(len(row))] for i in range(len(row))]
        assert real.tolist() == want
        assert not allowed[b, 0, pad:, :pad].any()  # real queries never see padding
    # a padding query sees at least itself, which keeps its softmax finite (its output is never used)
    assert allowed[1, 0, 0, 0] and allowed[1, 0, 1, 1] and allowed.any(-1).all()


def test_decoding_after_a_padded_cache_hides_only_the_padding():
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    allowed = sdpa_attention_mask(CONFIG, embeds(2, 1), torch.tensor([[7], [8]]), padding, past_len=5)
    assert allowed.tolist() == [[[[False, False, True, True, True, True]]], [[[True] * 6]]]


def test_ptuning_prefix_keys_are_visible_to_every_query():
    ids = torch.tensor([[10, 11, GMASK, SOP, 20]])
    plain = sdpa_attention_mask(CONFIG, embeds(1, 5), ids)
    allowed = sdpa_attention_mask(CONFIG, embeds(1, 5), ids, prefix_len=3)
    assert allowed.shape == (1, 1, 5, 8)
    assert allowed[..., :3].all() and torch.equal(allowed[..., 3:], plain)
    # even a plain causal row needs a mask once prefix keys sit in front of it
    assert sdpa_attention_mask(CONFIG, embeds(1, 3), torch.tensor([[10, 11, 12]]), prefix_len=3) is not None


def test_the_official_dense_mask_is_inverted_and_extended_over_the_prefix():
    hidden = torch.ones(1, 1, 4, 4).triu(1).bool()  # official collators: True = may not attend
    assert torch.equal(sdpa_attention_mask(CONFIG, embeds(1, 4), None, hidden), ~hidden)
    with_prefix = sdpa_attention_mask(CONFIG, embeds(1, 4), None, hidden, prefix_len=2)
    assert with_prefix[..., :2].all() and torch.equal(with_prefix[..., 2:], ~hidden)
