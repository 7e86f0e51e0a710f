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


def load_model(model_name_or_path=None, dtype="auto", device_map=None, max_memory=None, offload_folder=None):
    """Our model class on the folder's weights, checked against the folder's tokenizer.

    `device_map` ("auto" or a plan) splits the model by layer over GPUs, CPU and disk within `max_memory`
    ({0: "20GiB", "cpu": "60GiB"}); layers planned on "disk" are kept in `offload_folder` and loaded as needed."""
    folder = resolve_model_path(model_name_or_path)
    dtype = parse_dtype(dtype) if isinstance(dtype, (str, type(None))) else dtype
    split = {} if device_map is None else dict(max_memory=max_memory, offload_folder=offload_folder)
    model = ChatGLMForConditionalGeneration.from_pretrained(str(folder), dtype=dtype, device_map=device_map, **split)
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


def load_model_and_tokenizer(model_name_or_path=None, lora_path=None, dtype="auto", device_map=None,
                             merge_adapter=False, max_memory=None, offload_folder=None):
    """The base model (plus adapter, if given) in eval mode, and its tokenizer.

    merge_adapter=True adds the adapter into the base weights (one plain model, no LoRA layers left): what tensor
    parallelism needs, and faster. With a `device_map` (see load_model) an adapter is always merged, in CPU memory
    before the model is split: PEFT cannot load adapter weights into layers offloaded to disk."""
    from glm_tune.lora import apply_adapter

    split_after_merge = bool(lora_path) and device_map is not None
    model = load_model(model_name_or_path, dtype, None if split_after_merge else device_map, max_memory,
                       offload_folder)
    if lora_path:
        model = apply_adapter(model, lora_path)
        if merge_adapter or split_after_merge:
            model = model.merge_and_unload()
    if split_after_merge:
        model = split_model(model, device_map, max_memory, offload_folder)
    return model.eval(), load_tokenizer(model_name_or_path)


def split_model(model, device_map="auto", max_memory=None, offload_folder=None):
    """A model in memory spread over devices the way from_pretrained(device_map="auto") plans it: balanced over the
    GPUs, whole GLMBlocks, the rest on "cpu", then on disk in `offload_folder`."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = model._no_split_modules
        max_memory = get_balanced_memory(model, max_memory, no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    return dispatch_model(model, device_map, offload_dir=offload_folder)
