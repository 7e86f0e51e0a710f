"""Batched generation over plain prompts: left padding, KV cache, answers decoded without the prompt."""

import torch

from modeling_chatglm import clean_response


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts, max_new_tokens=256, batch_size=8, **generate_kwargs):
    """Answers for `prompts`, in order. Greedy unless do_sample=True is passed; rows are padded on the left, so each
    prompt gets the same tokens as it would alone."""
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=generate_kwargs.pop("do_sample", False),
                             **generate_kwargs)
        new = out[:, batch["input_ids"].shape[1] :]
        answers += [clean_response(tokenizer.decode(row, skip_special_tokens=True)) for row in new]
    return answers
