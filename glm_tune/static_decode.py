"""Decoding with a static KV cache, optionally under torch.compile: `--compile_decoding` in cli_chat.py,
inference.py and the web pages (issue 16: offer it where it wins).

generate() grows the model's cache, so every decode step has new shapes. Here the cache is a fixed number of slots
(prompt + new tokens, rounded up to SLOT_MULTIPLE) written in place, and a boolean mask over the slots says which are
filled, so every step of one request has the same shapes and torch.compile(fullgraph=True) traces the step once.
The step runs the model's own blocks (GLMBlock.forward); positions come from the model's own continue_positions.
Measured with bench/bench_static_decode.py on a 2-core AMX CPU (mid shape, bf16, 2026-12-03, three runs): per new
token, "max-autotune" with frozen weights took 1.12-1.15x less time than generate() at batch 1 and 0.80-0.88x (more
time) at batch 8; the default mode 1.12x and 0.77x. Most of a decode step there is the linear layers' one-row
products (oneDNN kernels compiling does not replace). In fp32 the tokens are generate()'s exactly (tested, greedy and
seeded sampling).

StaticDecoder.generate takes the arguments the project's callers give generate() (greedy or sampling with
temperature / top-k / top-p, repetition penalty, min_new_tokens, EOS, padding on the left, a streamer, stopping
criteria) and computes what generate() computes with them; a call with anything else (beams, returned scores, a
P-Tuning prefix, a model split over devices) goes to generate() itself (arguments() says which).
"""

import torch
from transformers import DynamicCache, LogitsProcessorList, StoppingCriteriaList

COMPILE_MODES = ("off", "eager", "default", "max-autotune")
SLOT_MULTIPLE = 128  # cache sizes are rounded up to this, so that requests of similar length share a compiled step
# generate() arguments StaticDecoder.generate understands; any other one sends the call to generate() itself
ACCEPTED = {"input_ids", "attention_mask", "max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature",
            "top_p", "top_k", "repetition_penalty", "eos_token_id", "pad_token_id", "streamer", "stopping_criteria",
            "num_beams", "use_cache", "logits_processor", "position_ids", "past_key_values", "cache"}
NOT_SETTINGS = {"input_ids", "attention_mask", "streamer", "stopping_criteria", "logits_processor", "position_ids",
                "past_key_values", "cache"}


class StaticKV:
    """The part of a cache SelfAttention uses (update(k, v, layer) -> every key and value so far), with fixed shapes:
    per layer a [batch, heads, slots, head_dim] buffer; a step writes its token at slot `pos` (a [1] tensor)."""

    def __init__(self, config, batch, slots, dtype, device):
        shape = (config.num_layers, batch, config.num_attention_heads, slots, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.pos = None

    def update(self, k, v, layer_idx):
        self.keys[layer_idx].index_copy_(2, self.pos, k)
        self.values[layer_idx].index_copy_(2, self.pos, v)
        return self.keys[layer_idx], self.values[layer_idx]


def decode_logits(model, ids, position_ids, cache, pos, key_real):
    """fp32 logits [batch, vocab] of the tokens ids [batch, 1] written at slot `pos`; a query sees the slots <= pos
    that hold real tokens (key_real [batch, slots])."""
    cache.pos = pos
    transformer = model.transformer
    x = transformer.word_embeddings(ids)
    rope = transformer.rotary_emb(position_ids, x.dtype)
    visible = (torch.arange(key_real.shape[-1], device=ids.device) <= pos) & key_real
    for layer in transformer.layers:
        x = layer(x, rope, visible[:, None, None, :], None, None, cache=cache)
    # the LM head as a module call (not output_logits' matmul with the transposed weight): frozen, the compiler packs
    # its weight like the others' (the head is the largest single read of a decode step)
    return model.lm_head(transformer.final_layernorm(x)[:, -1]).float()


class StaticDecoder:
    """generate() for `model` with a static cache; `mode`: "eager" (no compilation), or a torch.compile mode
    ("default", "max-autotune"), compiled with frozen weights when `freeze` (the model must not change afterwards)."""

    def __init__(self, model, mode="max-autotune", freeze=True):
        if mode not in COMPILE_MODES[1:]:
            raise ValueError(f"compile mode {mode!r}: one of {', '.join(COMPILE_MODES[1:])}")
        self.model, self.mode = model, mode
        if mode == "eager":
            self.step = decode_logits
        else:
            options = {"freezing": freeze, "max_autotune": mode == "max-autotune"}
            self.step = torch.compile(decode_logits, fullgraph=True, dynamic=False, options=options)

    def arguments(self, args, kwargs):
        """generate(*args, **kwargs)'s arguments by name if this decoder computes that call, else None (the call then
        goes to generate() itself)."""
        model, kwargs = self.model, dict(kwargs)
        if "inputs" in kwargs and "input_ids" not in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        if len(args) == 1 and "input_ids" not in kwargs:
            kwargs["input_ids"], args = args[0], ()
        supported = (not args and set(kwargs) <= ACCEPTED and kwargs.get("input_ids") is not None
                     and kwargs.get("num_beams") in (None, 1) and kwargs.get("use_cache") in (None, True)
                     and not kwargs.get("logits_processor") and kwargs.get("position_ids") is None
                     and kwargs.get("past_key_values") is None and kwargs.get("cache") is None
                     and not model.transformer.pre_seq_len and not getattr(model, "hf_device_map", None)
                     and not model.training)
        return kwargs if supported else None

    def settings(self, kwargs, prompt_len):
        """(generation config, logits processors) as generate() derives them from these arguments and the model's
        generation_config (GenerationMixin's own helpers, so the defaults and the processors' order are its own)."""
        model = self.model
        options = {k: v for k, v in kwargs.items() if k not in NOT_SETTINGS}
        config, _ = model._prepare_generation_config(None, **options)
        procs = model._get_logits_processor(generation_config=config, input_ids_seq_length=prompt_len,
                                            logits_processor=LogitsProcessorList(), device=kwargs["input_ids"].device)
        return config, procs

    @torch.no_grad()
    def generate(self, **kwargs):
        """generate()'s sequences [batch, prompt + new]: rows that ended early are filled with the pad token."""
        model, config = self.model, self.model.config
        input_ids = kwargs["input_ids"]
        batch, prompt_len = input_ids.shape
        settings, procs = self.settings(kwargs, prompt_len)
        max_new = settings.max_new_tokens if settings.max_new_tokens is not None else settings.max_length - prompt_len
        eos = settings.eos_token_id
        eos = torch.tensor([] if eos is None else eos, device=input_ids.device, dtype=torch.long).flatten()
        pad = settings.pad_token_id if settings.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        stopping = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
        streamer, sample = kwargs.get("streamer"), settings.do_sample
        if streamer is not None:
            streamer.put(input_ids.cpu())
        if max_new <= 0:
            if streamer is not None:
                streamer.end()
            return input_ids

        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        out = model(input_ids=input_ids, attention_mask=mask, cache=DynamicCache(config=config), use_cache=True,
                    logits_to_keep=1)
        slots = -(-(prompt_len + max_new) // SLOT_MULTIPLE) * SLOT_MULTIPLE
        weight_dtype = out.cache.layers[0].keys.dtype
        cache = StaticKV(config, batch, slots, weight_dtype, input_ids.device)
        for i, layer in enumerate(out.cache.layers):
            cache.keys[i, :, :, :prompt_len] = layer.keys
            cache.values[i, :, :, :prompt_len] = layer.values
        key_real = torch.ones(batch, slots, dtype=torch.bool, device=input_ids.device)
        key_real[:, :prompt_len] = mask.bool()
        state, scores = out.cache.glm_positions, out.logits[:, -1].float()
        del out

        from modeling_chatglm import continue_positions

        unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        sequences = input_ids
        for step in range(max_new):
            scores = procs(sequences, scores)
            if sample:
                token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                token = scores.argmax(-1)
            token = torch.where(unfinished, token, pad)
            sequences = torch.cat((sequences, token[:, None]), dim=-1)
            if streamer is not None:
                streamer.put(token.cpu())
            unfinished &= ~torch.isin(token, eos)
            if len(stopping):
                unfinished &= ~torch.as_tensor(stopping(sequences, scores), device=unfinished.device)
            if step == max_new - 1 or not bool(unfinished.any()):
                break
            positions, state = continue_positions(token[:, None], config, None, state)
            pos = torch.tensor([prompt_len + step], device=input_ids.device)
            scores = self.step(model, token[:, None], positions, cache, pos, key_real)
        if streamer is not None:
            streamer.end()
        return sequences


def enable_static_decoding(model, mode):
    """Route `model`'s generate() calls that StaticDecoder supports through one (mode: see COMPILE_MODES; "off" does
    nothing). For generation-only models: compiled modes freeze the weights."""
    if mode in (None, "off"):
        return model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT: the ChatGLM model
    base.static_decoder = StaticDecoder(base, mode)
    return model
