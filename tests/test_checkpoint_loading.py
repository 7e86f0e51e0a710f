"""Official checkpoint folders load unchanged: both config revisions, every weight layout, our classes and AutoModel."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from configuration_chatglm import ChatGLMConfig
from glm_tune.checkpoint import WEIGHT_FORMATS
from modeling_chatglm import ChatGLMForConditionalGeneration
from tokenization_chatglm import ChatGLMTokenizer

DATA = Path(__file__).parent / "data"
SHAPE = dict(hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256)


WEIGHT_FILES = {
    "bin": r"pytorch_model\.bin",
    "sharded-bin": r"pytorch_model(-\d{5}-of-\d{5}\.bin|\.bin\.index\.json)",
    "safetensors": r"model\.safetensors",
    "sharded-safetensors": r"model(-\d{5}-of-\d{5}\.safetensors|\.safetensors\.index\.json)",
}


def weights_only_folder(src, dst, fmt):
    """A copy of a checkpoint folder holding only the weight files of one layout."""
    dst.mkdir()
    for f in src.iterdir():
        if not re.match(r"(pytorch_)?model[-.]", f.name) or re.fullmatch(WEIGHT_FILES[fmt], f.name):
            shutil.copy2(f, dst / f.name)
    return dst


@pytest.fixture(scope="module", params=["v1.1", "original"])
def all_layouts(request, make_checkpoint):
    return request.param, make_checkpoint(request.param, WEIGHT_FORMATS, **SHAPE)


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_every_weight_layout_loads_with_no_missing_or_unexpected_keys(all_layouts, fmt, tmp_path):
    revision, folder = all_layouts
    only = weights_only_folder(folder, tmp_path / fmt, fmt)
    weight_files = [f.name for f in only.iterdir() if re.fullmatch(WEIGHT_FILES[fmt], f.name)]
    assert len(weight_files) == (4 if fmt.startswith("sharded") else 1)
    model, info = ChatGLMForConditionalGeneration.from_pretrained(only, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]

    # The loaded tensors are the ones written (the single .bin is the independent source of truth).
    written = torch.load(folder / "pytorch_model.bin", weights_only=True)
    loaded = model.state_dict()
    assert set(loaded) == set(written)
    for name, tensor in written.items():
        assert torch.equal(loaded[name], tensor), name
    assert model.lm_head.weight.data_ptr() == model.transformer.word_embeddings.weight.data_ptr()


def test_sharded_index_names_every_official_parameter(all_layouts):
    _, folder = all_layouts
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    names = set(index["weight_map"])
    layer0 = {n.removeprefix("transformer.layers.0.") for n in names if n.startswith("transformer.layers.0.")}
    assert layer0 == {
        "input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
        "post_attention_layernorm.bias", "attention.query_key_value.weight", "attention.query_key_value.bias",
        "attention.dense.weight", "attention.dense.bias", "attention.rotary_emb.inv_freq",
        "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
    }
    assert {"transformer.word_embeddings.weight", "lm_head.weight", "transformer.final_layernorm.weight",
            "transformer.final_layernorm.bias"} <= names
    assert len(set(index["weight_map"].values())) == 3
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in torch.load(folder / "pytorch_model.bin", weights_only=True).values()
    )


def test_automodel_with_remote_code_equals_our_class(all_layouts):
    revision, folder = all_layouts
    remote = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(remote).__module__.startswith("transformers_modules.")  # really loaded from the folder's files
    ours = ChatGLMForConditionalGeneration.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    batch = tokenizer(["你好，世界", "def f(x):\n    return x"], return_tensors="pt", padding=True)
    assert torch.equal(remote(**batch).logits, ours(**batch).logits)


@pytest.mark.parametrize("revision,offset", [("v1.1", 0), ("original", 20000)])
def test_config_ids_agree_with_tokenizer_in_both_vocab_layouts(make_checkpoint, revision, offset):
    folder = make_checkpoint(revision, ("sharded-bin",), **SHAPE)
    config = ChatGLMConfig.from_pretrained(folder)
    tokenizer = ChatGLMTokenizer.from_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    assert ("mask_token_id" in raw) == (revision == "v1.1")  # the original file leaves [MASK]/[gMASK] implicit
    assert config.bos_token_id == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("<sop>")
    assert config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<eop>")
    assert config.mask_token_id == tokenizer.mask_token_id == tokenizer.convert_tokens_to_ids("[MASK]")
    assert config.gmask_token_id == tokenizer.gmask_token_id == tokenizer.convert_tokens_to_ids("[gMASK]")
    assert config.pad_token_id == tokenizer.pad_token_id == 3 + offset
    assert tokenizer.vocab_size <= config.vocab_size < tokenizer.vocab_size + 64


@pytest.mark.parametrize("revision,offset,file_pieces,config_vocab", [("v1.1", 0, 4000, 4032),
                                                                     ("original", 20000, 3656, 24000)])
def test_ice_text_model_is_written_as_the_real_file_of_each_revision(make_checkpoint, revision, offset, file_pieces,
                                                                      config_vocab):
    # The real first-release file holds only its 130000 base pieces and the tokenizer appends the 344 ChatGLM
    # pieces ([MASK] [gMASK] ... <dBLOCK>, <|tab|>, <|blank_2..80|>, <0x00..0xFF>); the v1.1 file ends with them.
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    from glm_tune.loading import check_tokenizer_matches

    folder = make_checkpoint(revision, ("sharded-bin",), **SHAPE)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString((folder / "ice_text.model").read_bytes())
    pieces = [p.piece for p in proto.pieces]
    assert len(pieces) == file_pieces
    assert ("[gMASK]" in pieces) == ("<sop>" in pieces) == ("<0x00>" in pieces) == (revision == "v1.1")
    base = 4000 - 344
    tokenizer = ChatGLMTokenizer.from_pretrained(folder)
    config = ChatGLMConfig.from_pretrained(folder)
    assert tokenizer("你好")["input_ids"][-2:] == [offset + base + 1, offset + base + 4]  # [gMASK] <sop>
    assert (config.gmask_token_id, config.bos_token_id, config.eos_token_id) == (
        offset + base + 1, offset + base + 4, offset + base + 5)
    assert tokenizer.vocab_size == offset + 4000 and config.vocab_size == config_vocab
    check_tokenizer_matches(config, tokenizer, folder)
    output = tokenizer(["你好", "a longer prompt"], padding=True)["input_ids"][0] + tokenizer.encode(
        "你好！", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer.decode(output) == "你好你好！"


@pytest.mark.parametrize("revision", ["v1.1", "original"])
def test_official_config_files_read_unchanged(revision):
    folder = DATA / f"chatglm-6b-{revision}"
    raw = json.loads((folder / "config.json").read_text())
    config = ChatGLMConfig.from_pretrained(folder)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "vocab_size", "hidden_size", "num_layers"):
        assert getattr(config, key) == raw[key]
    # [MASK] and [gMASK] sit 4 and 3 places before <sop> in both official vocabularies
    assert config.mask_token_id == raw.get("mask_token_id", raw["bos_token_id"] - 4)
    assert config.gmask_token_id == raw.get("gmask_token_id", raw["bos_token_id"] - 3)
    assert config.num_hidden_layers == 28 and config.head_dim == 128
    assert config.dtype == torch.float16


def test_full_6b_shape_has_official_parameter_count():
    config = ChatGLMConfig.from_pretrained(DATA / "chatglm-6b-v1.1")
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    n = sum(p.numel() for p in model.parameters())  # lm_head is tied to the embeddings
    per_layer = 4 * 4096 + (4096 * 3 * 4096 + 3 * 4096) + (4096 * 4096 + 4096) + 2 * (4096 * 16384) + 16384 + 4096
    assert n == 130528 * 4096 + 28 * per_layer + 2 * 4096
    assert round(n / 1e9, 2) == 6.17


def test_quantized_configs_are_refused_with_a_clear_message():
    config = ChatGLMConfig.from_pretrained(DATA / "chatglm-6b-v1.1", quantization_bit=4, num_layers=1,
                                           hidden_size=64, num_attention_heads=4, inner_hidden_size=128,
                                           vocab_size=1000)
    with pytest.raises(ValueError, match="quantization_bit=4"):
        ChatGLMForConditionalGeneration(config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading_keeps_rope_exact_and_logits_close(make_checkpoint, dtype):
    folder = make_checkpoint("v1.1", ("sharded-bin",), **SHAPE)
    full = ChatGLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    half = ChatGLMForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    assert half.transformer.word_embeddings.weight.dtype == dtype
    tokenizer = ChatGLMTokenizer.from_pretrained(folder)
    batch = tokenizer(["今天天气很好，我们去公园散步吧。"], return_tensors="pt")
    ref, got = full(**batch).logits, half(**batch).logits.float()
    # Random weights give logits of size ~1: bf16 keeps ~3 significant digits through 2 layers.
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_device_map_with_disk_offload_gives_the_unsplit_models_tokens(make_checkpoint, tmp_path):
    from accelerate import infer_auto_device_map

    folder = make_checkpoint("v1.1", ("safetensors",), hidden_size=64, num_layers=4, num_attention_heads=4,
                             inner_hidden_size=256)
    full = ChatGLMForConditionalGeneration.from_pretrained(folder)
    # _no_split_modules keeps each GLMBlock whole when accelerate plans a split
    plan = infer_auto_device_map(full, max_memory={"cpu": 1_400_000, "disk": 10**10},
                                 no_split_module_classes=full._no_split_modules)
    assert set(plan.values()) == {"cpu", "disk"}
    assert all(not k.startswith("transformer.layers.") or k.count(".") == 2 for k in plan), plan
    offloaded = ChatGLMForConditionalGeneration.from_pretrained(folder, device_map=plan,
                                                                offload_folder=str(tmp_path / "offload"))
    tokenizer = ChatGLMTokenizer.from_pretrained(folder)
    batch = tokenizer(["你好，世界", "hello there"], return_tensors="pt", padding=True)
    assert torch.equal(offloaded(**batch).logits, full(**batch).logits)
    greedy = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(offloaded.generate(**batch, **greedy), full.generate(**batch, **greedy))
