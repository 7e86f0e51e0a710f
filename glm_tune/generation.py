"""Batched generation over plain prompts: left padding, KV cache, answers decoded without the prompt."""

import torch

from modeling_chatglm import clean_response


def input_device(model):
    """Where input ids must go: the embeddings' device. A model split by a device map may keep other layers (and
    its first parameter) elsewhere, even on "meta" when they are offloaded to disk."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        names = ("transformer.word_embeddings", "transformer", "")
        device = next((device_map[n] for n in names if n in device_map), "cpu")
        return torch.device("cpu" if device == "disk" else device)
    return model.get_input_embeddings().weight.device


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts, max_new_tokens=256, **generate_kwargs):
    """(answers, number of new tokens of each answer, <eop> included) for one batch of prompts.

    Greedy unless do_sample=True is passed. Rows are padded on the left, so each prompt gets the tokens it would get
    alone."""
    tokenizer.padding_side = "left"
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(input_device(model))
    rows = generate_new_tokens(model, batch, max_new_tokens, **generate_kwargs)
    return [decode_answer(tokenizer, row) for row in rows], [len(row) for row in rows]


@torch.inference_mode()
def generate_new_tokens(model, batch, max_new_tokens=256, **generate_kwargs):
    """The new tokens of every row of a left-padded `batch` (input_ids, attention_mask), each a CPU tensor cut after
    its first end token (kept). Greedy unless do_sample=True is passed."""
    generate_kwargs.setdefault("do_sample", False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, **generate_kwargs)
    new = out[:, batch["input_ids"].shape[1] :].cpu()
    # A finished row is filled up with padding; count its tokens up to and including the first end token.
    eos = torch.tensor(model.generation_config.eos_token_id).flatten()
    ended = torch.isin(new, eos)
    lengths = torch.where(ended.any(-1), ended.int().argmax(-1) + 1, new.shape[1]).tolist()
    return [row[:n] for row, n in zip(new, lengths)]


def decode_answer(tokenizer, ids):
    """An answer's text from its generated ids: special tokens dropped, trimmed as the official chat() shows it."""
    return clean_response(tokenizer.decode(ids, skip_special_tokens=True))


def generate_answers(model, tokenizer, prompts, max_new_tokens=256, batch_size=8, **generate_kwargs):
    """Answers for `prompts`, in order, `batch_size` prompts per generate() call (see generate_batch)."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch_answers, _ = generate_batch(model, tokenizer, prompts[start : start + batch_size], max_new_tokens,
                                          **generate_kwargs)
        answers += batch_answers
    return answers
