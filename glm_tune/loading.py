"""Loading a ChatGLM checkpoint folder (official or generated) and, optionally, a LoRA adapter onto it."""

from pathlib import Path

from glm_tune.errors import UserError
from glm_tune.runtime import parse_dtype
from modeling_chatglm import ChatGLMForConditionalGeneration
from tokenization_chatglm import ChatGLMTokenizer


def resolve_model_path(model_name_or_path):
    """None means the embedded small model (built on first use); a folder must hold a ChatGLM checkpoint."""
    if model_name_or_path is None:
        from glm_tune.checkpoint import small_checkpoint

        return small_checkpoint()
    folder = Path(model_name_or_path)
    if not folder.is_dir():
        raise UserError(f"--model_name_or_path {model_name_or_path}: no such folder (weights cannot be downloaded "
                        "here; point it at a local ChatGLM-6B checkpoint folder)")
    if not (folder / "config.json").exists() or not (folder / "ice_text.model").exists():
        raise UserError(f"--model_name_or_path {model_name_or_path}: not a ChatGLM folder (needs config.json and "
                        "ice_text.model)")
    return folder


def load_tokenizer(model_name_or_path=None):
    # Always our tokenizer class: the official folder's tokenization_chatglm.py does not run on transformers 5.
    return ChatGLMTokenizer.from_pretrained(str(resolve_model_path(model_name_or_path)))


def load_model(model_name_or_path=None, dtype="auto", device_map=None):
    """Our model class on the folder's weights, checked against the folder's tokenizer."""
    folder = resolve_model_path(model_name_or_path)
    dtype = parse_dtype(dtype) if isinstance(dtype, (str, type(None))) else dtype
    model = ChatGLMForConditionalGeneration.from_pretrained(str(folder), dtype=dtype, device_map=device_map)
    check_tokenizer_matches(model.config, load_tokenizer(folder), folder)
    return model


def check_tokenizer_matches(config, tokenizer, where):
    """Token ids must agree between config.json and ice_text.model, or generation never stops (a known seed bug)."""
    for name in ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id"):
        ours, theirs = getattr(config, name), getattr(tokenizer, name)
        if ours is not None and ours != theirs:
            raise UserError(f"{where}/config.json: {name} is {ours} but the tokenizer's is {theirs} (mismatched "
                            "config.json and ice_text.model)")
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{where}/config.json: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size}")


def load_model_and_tokenizer(model_name_or_path=None, lora_path=None, dtype="auto", device_map=None):
    """The base model (plus adapter, if given) in eval mode, and its tokenizer."""
    from glm_tune.lora import apply_adapter

    model = load_model(model_name_or_path, dtype, device_map)
    if lora_path:
        model = apply_adapter(model, lora_path)
    return model.eval(), load_tokenizer(model_name_or_path)
