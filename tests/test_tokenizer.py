"""Tests for tokenization_chatglm.ChatGLMTokenizer and glm_tune.tokenizer_model.

A small ice_text.model is trained once per session from the shipped corpus; every
tokenizer test runs for both vocabulary layouts (20000 image tokens first, or none).
"""

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from glm_tune.tokenizer_model import (  # noqa: E402
    CHATGLM_SPECIAL_PIECES,
    DEFAULT_CORPUS,
    WHITESPACE_PIECES,
    train_ice_text_model,
)
from tokenization_chatglm import ChatGLMTokenizer  # noqa: E402

VOCAB = 4000
USER_DEFINED = sp_pb2.ModelProto.SentencePiece.USER_DEFINED

ROUND_TRIP_TEXTS = [
    "今天天气很好，我们去公园散步吧。",
    "The quick brown fox jumps over the lazy dog.",
    "我们用 PyTorch 训练了一个 6B 参数的模型，learning rate 是 1e-4。",
    "def add(a, b):\n    # 加法\n    return a + b\n\nclass A:\n\tdef f(self):\n\t\treturn  1\n",
    "x" + "".join(" " * n + str(n) for n in range(2, 201)),
    "   leading spaces",
    "trailing spaces   ",
    " ",
    "  \n\t \n",
    "emoji 😀 here",
    "罕见字：龘",
    "mixed\r\nline endings",
    "",
]


@pytest.fixture(scope="session")
def sp_path(tmp_path_factory):
    return train_ice_text_model(tmp_path_factory.mktemp("spm") / "ice_text.model", DEFAULT_CORPUS, VOCAB)


@pytest.fixture(scope="session")
def sp(sp_path):
    return spm.SentencePieceProcessor(model_file=str(sp_path))


@pytest.fixture(scope="session", params=[0, 20000], ids=["v1.1-layout", "original-layout"])
def tok(request, sp_path):
    return ChatGLMTokenizer(str(sp_path), num_image_tokens=request.param)


def sp_ids(sp, tok, *pieces):
    return [sp.piece_to_id(p) + tok.num_image_tokens for p in pieces]


# ---------------------------------------------------------------- sentencepiece model


def test_model_layout(sp_path, sp):
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(sp_path.read_bytes())
    pieces = [p.piece for p in proto.pieces]
    assert len(pieces) == VOCAB
    assert pieces[:4] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert pieces[4 : 4 + len(WHITESPACE_PIECES)] == WHITESPACE_PIECES
    assert pieces[-8:] == ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
    assert all(p.type == USER_DEFINED for p in proto.pieces[-8:])
    assert all(p.type == USER_DEFINED for p in proto.pieces[4 : 4 + len(WHITESPACE_PIECES)])
    assert pieces.count("[gMASK]") == 1
    assert proto.trainer_spec.byte_fallback
    assert proto.normalizer_spec.name == "identity"
    assert not proto.normalizer_spec.add_dummy_prefix
    assert not proto.normalizer_spec.remove_extra_whitespaces
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    # The appended user-defined pieces are matched as single pieces by sentencepiece itself.
    assert sp.encode("a[gMASK]<sop>", out_type=str) == ["a", "[gMASK]", "<sop>"]


def test_training_is_deterministic_quiet_and_atomic(sp_path, tmp_path, capfd):
    again = train_ice_text_model(tmp_path / "sub" / "ice_text.model", [str(DEFAULT_CORPUS)], VOCAB)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert again == tmp_path / "sub" / "ice_text.model"
    assert again.read_bytes() == sp_path.read_bytes()
    assert os.listdir(tmp_path / "sub") == ["ice_text.model"]  # no temp file left behind


# ---------------------------------------------------------------- ids and vocabulary


def test_special_token_ids(tok, sp):
    n = tok.num_image_tokens
    assert tok.vocab_size == n + VOCAB == len(tok) == len(tok.get_vocab())
    specials = tok.convert_tokens_to_ids(CHATGLM_SPECIAL_PIECES)
    assert specials == sp_ids(sp, tok, *CHATGLM_SPECIAL_PIECES)
    assert specials == list(range(n + VOCAB - 8, n + VOCAB))  # the last eight pieces
    assert tok.mask_token_id == n + VOCAB - 8
    assert tok.gmask_token_id == n + VOCAB - 7
    assert tok.bos_token == "<sop>" and tok.bos_token_id == n + VOCAB - 4
    assert tok.eos_token == "<eop>" and tok.eos_token_id == n + VOCAB - 3
    assert tok.unk_token_id == n + 0
    assert tok.end_token == "</s>" and tok.end_token_id == n + 2
    assert tok.pad_token_id == n + 3
    assert set(tok.all_special_ids) == set(specials) | {n, n + 2, n + 3}


def test_vocab_consistency(tok):
    n = tok.num_image_tokens
    vocab = tok.get_vocab()
    tokens = tok.tokenize("你好，world!\n\tok  done 😀")
    ids = tok.convert_tokens_to_ids(tokens)
    assert ids == [vocab[t] for t in tokens]
    assert tok.convert_ids_to_tokens(ids) == tokens
    assert all(n <= i < n + VOCAB for i in ids)
    for i in (n, n + 3, n + 500, n + VOCAB - 1):
        assert vocab[tok.convert_ids_to_tokens(i)] == i
    if n:
        assert tok.convert_tokens_to_ids("<image_7>") == 7
        assert tok.convert_ids_to_tokens(7) == "<image_7>"
        assert vocab["<image_19999>"] == 19999
    else:
        assert "<image_7>" not in vocab
        assert tok.convert_tokens_to_ids("<image_7>") == tok.unk_token_id
    assert tok.convert_tokens_to_ids("no-such-piece-xyz") == tok.unk_token_id


# ---------------------------------------------------------------- encoding


def test_single_input_ends_with_gmask_sop(tok):
    enc = tok("你好")
    assert list(enc.keys()) == ["input_ids", "attention_mask"]
    body = tok.encode("你好", add_special_tokens=False)
    assert body and tok.gmask_token_id not in body
    assert enc["input_ids"] == body + [tok.gmask_token_id, tok.bos_token_id]
    assert enc["attention_mask"] == [1] * (len(body) + 2)
    assert tok.num_special_tokens_to_add() == 2 and tok.num_special_tokens_to_add(pair=True) == 3


def test_pair_input_adds_eop(tok):
    a = tok.encode("问题", add_special_tokens=False)
    b = tok.encode("answer", add_special_tokens=False)
    ids = tok("问题", "answer")["input_ids"]
    assert ids == a + [tok.gmask_token_id, tok.bos_token_id] + b + [tok.eos_token_id]
    mask = tok.get_special_tokens_mask(a, b)
    assert mask == [0] * len(a) + [1, 1] + [0] * len(b) + [1]
    assert tok.get_special_tokens_mask(ids, already_has_special_tokens=True) == mask


def test_truncation_keeps_specials_single(tok):
    text = "one two three four five six seven eight nine ten"
    body = tok.encode(text, add_special_tokens=False)
    assert len(body) > 6
    ids = tok(text, truncation=True, max_length=6)["input_ids"]
    assert ids == body[:4] + [tok.gmask_token_id, tok.bos_token_id]
    tok.truncation_side = "left"
    try:
        ids = tok(text, truncation=True, max_length=6)["input_ids"]
    finally:
        tok.truncation_side = "right"
    assert ids == body[-4:] + [tok.gmask_token_id, tok.bos_token_id]


@pytest.mark.parametrize("strategy", ["longest_first", "only_first", "only_second"])
def test_truncation_keeps_specials_pair(tok, strategy):
    first, second = "one two three four five six seven eight", "九十一二三四五六七八九十"
    a = tok.encode(first, add_special_tokens=False)
    b = tok.encode(second, add_special_tokens=False)
    assert len(a) > 6 and len(b) > 6
    max_length = len(a) + len(b) + 3 - 4
    ids = tok(first, second, truncation=strategy, max_length=max_length)["input_ids"]
    assert len(ids) == max_length
    g = ids.index(tok.gmask_token_id)
    assert ids[g + 1] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    kept_a, kept_b = ids[:g], ids[g + 2 : -1]
    assert kept_a == a[: len(kept_a)] and kept_b == b[: len(kept_b)]
    assert len(kept_a) + len(kept_b) == len(a) + len(b) - 4
    if strategy == "only_first":
        assert kept_b == b
    if strategy == "only_second":
        assert kept_a == a


def test_left_padding_batch(tok):
    texts = ["hi", "a much longer sentence with several more words", "中文句子"]
    single = [tok(t)["input_ids"] for t in texts]
    batch = tok(texts, padding=True)
    width = max(map(len, single))
    for ids, mask, ref in zip(batch["input_ids"], batch["attention_mask"], single):
        pad = width - len(ref)
        assert ids == [tok.pad_token_id] * pad + ref
        assert mask == [0] * pad + [1] * len(ref)
    assert any(width - len(ref) > 0 for ref in single)
    pt = tok(texts, padding="max_length", max_length=width + 3, return_tensors="pt")
    assert tuple(pt["input_ids"].shape) == (3, width + 3)
    assert pt["input_ids"][:, :3].eq(tok.pad_token_id).all()
    assert pt["attention_mask"][:, :3].eq(0).all()
    assert pt["input_ids"][0, -2:].tolist() == [tok.gmask_token_id, tok.bos_token_id]


# ---------------------------------------------------------------- decoding and whitespace


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS, ids=range(len(ROUND_TRIP_TEXTS)))
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == text + "[gMASK]<sop>"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_decode_drops_padding_and_specials(tok):
    batch = tok(["短", "a longer line of text"], padding=True)
    assert batch["input_ids"][0][0] == tok.pad_token_id
    assert tok.decode(batch["input_ids"][0]) == "短[gMASK]<sop>"
    assert tok.decode(batch["input_ids"]) == ["短[gMASK]<sop>", "a longer line of text[gMASK]<sop>"]
    ids = tok("question", "answer")["input_ids"] + [tok.end_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "questionanswer"
    assert tok.decode(ids) == "question[gMASK]<sop>answer<eop></s>"


def test_whitespace_pieces(tok):
    assert tok.tokenize("a\nb") == ["a", "<n>", "b"]
    assert "<|tab|>" in tok.tokenize("a\tb")
    assert "<|blank_2|>" in tok.tokenize("a  b")
    blanks = [t for t in tok.tokenize("a" + " " * 100 + "b") if t.startswith("<|blank_")]
    assert blanks == ["<|blank_80|>", "<|blank_20|>"]
    blanks = [t for t in tok.tokenize("a" + " " * 200 + "b") if t.startswith("<|blank_")]
    assert blanks == ["<|blank_80|>", "<|blank_80|>", "<|blank_40|>"]
    assert not any(t.startswith("<|blank_") for t in tok.tokenize("one space"))
    vocab = tok.get_vocab()
    n = tok.num_image_tokens
    assert vocab["<n>"] == n + 4 and vocab["<|tab|>"] == n + 5 and vocab["<|blank_80|>"] == n + 84


def test_byte_fallback(tok):
    tokens = tok.tokenize("😀")
    assert tokens == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.unk_token_id not in tok.encode("😀龘")


# ---------------------------------------------------------------- saving and loading


def test_save_and_from_pretrained(tok, sp_path, tmp_path):
    text = "保存 and load\n\t  ok"
    files = tok.save_pretrained(tmp_path)
    assert (tmp_path / "ice_text.model").read_bytes() == sp_path.read_bytes()
    assert str(tmp_path / "ice_text.model") in map(str, files)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["num_image_tokens"] == tok.num_image_tokens
    assert config["gmask_token"] == "[gMASK]" and config["end_token"] == "</s>"
    assert config["auto_map"]["AutoTokenizer"] == ["tokenization_chatglm.ChatGLMTokenizer", None]
    assert (tmp_path / "tokenization_chatglm.py").is_file()
    again = ChatGLMTokenizer.from_pretrained(tmp_path)
    assert again.num_image_tokens == tok.num_image_tokens
    assert again.padding_side == "left"
    assert again(text, "x")["input_ids"] == tok(text, "x")["input_ids"]
    assert again.all_special_ids == tok.all_special_ids
    assert again.end_token_id == tok.end_token_id and again.gmask_token_id == tok.gmask_token_id
    assert again.get_vocab() == tok.get_vocab()


def test_reload_with_other_layout(tok, sp_path, tmp_path):
    tok.save_pretrained(tmp_path)
    other = 20000 - tok.num_image_tokens
    switched = ChatGLMTokenizer.from_pretrained(tmp_path, num_image_tokens=other)
    fresh = ChatGLMTokenizer(str(sp_path), num_image_tokens=other)
    assert switched.encode("层 layout") == fresh.encode("层 layout")
    assert switched.all_special_ids == fresh.all_special_ids


def test_auto_tokenizer_remote_code(tok, sp_path, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / f"chatglm_ckpt_{tok.num_image_tokens}"
    folder.mkdir()
    shutil.copyfile(sp_path, folder / "ice_text.model")
    shutil.copyfile(REPO / "tokenization_chatglm.py", folder / "tokenization_chatglm.py")
    config = {
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "num_image_tokens": tok.num_image_tokens,
        "tokenizer_class": "ChatGLMTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    auto = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    assert type(auto).__name__ == "ChatGLMTokenizer"
    texts = ["远程代码 remote code", "def f():\n    pass"]
    assert auto(texts, padding=True)["input_ids"] == tok(texts, padding=True)["input_ids"]
    assert auto.gmask_token_id == tok.gmask_token_id and auto.pad_token_id == tok.pad_token_id


def test_pickle(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("序列化 pickle") == tok.encode("序列化 pickle")
