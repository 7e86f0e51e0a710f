"""Small ChatGLM checkpoints in the official folder layout, for tests, demos and benchmarks.

Real users point `--model_name_or_path` at the official folder. Here nothing can be downloaded, so the project writes
its own folder with the same files the official one has: `config.json` (with `auto_map`), the three code files,
`ice_text.model` trained on text the repository ships, `tokenizer_config.json`, and random weights as `.bin` (single or
sharded with `pytorch_model.bin.index.json`) and/or safetensors. Both revisions are supported:

* "v1.1": 0 image tokens, config names mask/gmask ids and the P-Tuning fields (like chatglm-6b v1.1+); its
  ice_text.model ends with the 344 ChatGLM pieces (specials, tab/blank and byte pieces);
* "original": 20000 image tokens ahead of the text vocabulary, config names only bos/eos/pad (the first release); its
  ice_text.model lacks those pieces, which the tokenizer appends in memory, as the official code does.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from configuration_chatglm import ChatGLMConfig
from glm_tune.atomic import atomic_dir, write_json
from glm_tune.tokenizer_model import DEFAULT_CORPUS, train_ice_text_model
from modeling_chatglm import ChatGLMForConditionalGeneration
from tokenization_chatglm import ChatGLMTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
CODE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py")
IMAGE_TOKENS = {"v1.1": 0, "original": 20000}
AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}
# The embedded default: small enough to fine-tune on 2 CPU cores in minutes, big enough to learn a real task.
SMALL_SHAPE = dict(hidden_size=256, num_layers=4, num_attention_heads=4, inner_hidden_size=1024)
WEIGHT_FORMATS = ("bin", "sharded-bin", "safetensors", "sharded-safetensors")
# The tokenizer learns from the shipped prose and code plus the demo data set, so the demo's words are whole pieces.
TOKENIZER_CORPUS = (DEFAULT_CORPUS, REPO_ROOT / "data" / "demo" / "train.jsonl")


def _shards(state_dict, n_shards):
    names = list(state_dict)
    size = -(-len(names) // n_shards)
    return [{k: state_dict[k] for k in names[i * size : (i + 1) * size]} for i in range(n_shards)]


def write_weights(state_dict, folder, fmt, n_shards=3):
    """Write `state_dict` the way official checkpoints are stored (`fmt` in WEIGHT_FORMATS)."""
    folder = Path(folder)
    if fmt == "bin":
        torch.save(state_dict, folder / "pytorch_model.bin")
        return
    if fmt == "safetensors":
        save_file(_dedup_shared(state_dict), folder / "model.safetensors", metadata={"format": "pt"})
        return
    safetensors = fmt == "sharded-safetensors"
    tensors = _dedup_shared(state_dict) if safetensors else state_dict
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    weight_map, total = {}, 0
    for i, shard in enumerate(_shards(tensors, n_shards), start=1):
        name = f"{stem}-{i:05d}-of-{n_shards:05d}.{ext}"
        if safetensors:
            save_file(shard, folder / name, metadata={"format": "pt"})
        else:
            torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(folder / f"{stem}.{ext}.index.json" if safetensors else folder / "pytorch_model.bin.index.json", index)


def _dedup_shared(state_dict):
    # safetensors refuses tensors sharing memory (tied lm_head / embeddings): store each storage once, as
    # transformers' own save_pretrained does; loading re-ties them.
    seen, out = set(), {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor.contiguous()
    return out


def official_config(revision, tokenizer, vocab_size, dtype="float32", **shape):
    """A config.json dict with the fields of the official file of that revision."""
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = {
        "architectures": ["ChatGLMModel"],
        "auto_map": AUTO_MAP,
        **ids,
        "inner_hidden_size": shape["inner_hidden_size"],
        "hidden_size": shape["hidden_size"],
        "layernorm_epsilon": 1e-05,
        "max_sequence_length": shape.get("max_sequence_length", 2048),
        "model_type": "chatglm",
        "num_attention_heads": shape["num_attention_heads"],
        "num_layers": shape["num_layers"],
        "position_encoding_2d": True,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if revision == "v1.1":
        config.update(
            mask_token_id=tokenizer.mask_token_id,
            gmask_token_id=tokenizer.gmask_token_id,
            quantization_bit=0,
            pre_seq_len=None,
            prefix_projection=False,
        )
    return dict(sorted(config.items()))


def write_checkpoint(out_dir, revision="v1.1", formats=("sharded-bin",), seed=0, vocab_pieces=4000,
                     corpus=TOKENIZER_CORPUS, init_std=0.1, **shape):
    """Write a complete official-layout model folder; returns its path. Writes into a temp dir, then renames.

    `init_std` is the std of the random matrices. 0.1 rather than the usual 0.02: LoRA leaves the embeddings and the
    final LayerNorm frozen, and with 0.02 the logits of a small random model cannot grow sharp enough to learn anything.
    """
    if revision not in IMAGE_TOKENS:
        raise ValueError(f"revision must be one of {sorted(IMAGE_TOKENS)}, got {revision!r}")
    unknown = set(formats) - set(WEIGHT_FORMATS)
    if unknown:
        raise ValueError(f"unknown weight format(s) {sorted(unknown)}; choose from {WEIGHT_FORMATS}")
    shape = {**SMALL_SHAPE, **shape}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for name in CODE_FILES:
            shutil.copy2(REPO_ROOT / name, tmp / name)
        sp_path = train_ice_text_model(tmp / "ice_text.model", corpus, vocab_size=vocab_pieces, revision=revision)
        tokenizer = ChatGLMTokenizer(str(sp_path), num_image_tokens=IMAGE_TOKENS[revision])
        tokenizer.save_pretrained(tmp)
        vocab_size = -(-tokenizer.vocab_size // 64) * 64  # padded like the official 130528 (> pieces)
        config_dict = official_config(revision, tokenizer, vocab_size, **shape)
        write_json(tmp / "config.json", config_dict)

        config = ChatGLMConfig.from_pretrained(tmp, initializer_range=init_std)
        with torch.random.fork_rng():  # leave the caller's random state alone (training seeds must repeat)
            torch.manual_seed(seed)
            model = ChatGLMForConditionalGeneration(config).float()
        state_dict = model.state_dict()  # like the official files: lm_head and embeddings both named
        for fmt in formats:
            write_weights(state_dict, tmp, fmt)
    return out_dir


def cache_root():
    return Path(os.environ.get("GLM_TUNE_CACHE", Path.home() / ".cache" / "glm-tune"))


def small_checkpoint(revision="v1.1", formats=("sharded-bin",), **shape):
    """The embedded default model: built once into the cache, rebuilt when the code or corpus it is made from changes."""
    digest = hashlib.sha256(json.dumps([revision, sorted(formats), sorted(shape.items())]).encode())
    for path in [*(REPO_ROOT / n for n in CODE_FILES), *TOKENIZER_CORPUS, Path(__file__),
                 Path(__file__).with_name("tokenizer_model.py")]:
        digest.update(path.read_bytes())
    folder = cache_root() / f"chatglm-small-{revision}-{digest.hexdigest()[:12]}"
    if not (folder / "config.json").exists():
        write_checkpoint(folder, revision=revision, formats=formats, **shape)
    return folder
