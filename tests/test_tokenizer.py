"""Tests for tokenization_chatglm.ChatGLMTokenizer and glm_tune.tokenizer_model.

A small ice_text.model of each revision is trained once per session from the shipped corpus, laid out like the
real files: the first release's holds only the base vocabulary (the real one: 130000 pieces) and its tokenizer
puts 20000 image ids first; the v1.1 file ends with the 344 pieces the official code appends (8 specials,
tab/blank pieces, 256 byte pieces) and has no image ids. Every tokenizer test runs on both.

The official behaviour is rebuilt here independently, from its description: the extended model proto (protobuf,
appended exactly as the official code does), its whitespace rewrite, and its decode.
"""

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from glm_tune.tokenizer_model import DEFAULT_CORPUS, train_ice_text_model
from tokenization_chatglm import ChatGLMTokenizer

REPO = Path(__file__).resolve().parents[1]

VOCAB = 4000  # text vocabulary of the tokenizer, in both revisions
APPENDED = 344  # 8 specials + <|tab|> + 79 blanks + 256 bytes
BASE = VOCAB - APPENDED  # pieces of the first release's file (the real one: 130000)
IMAGE_TOKENS = {"v1.1": 0, "original": 20000}
Piece = sp_pb2.ModelProto.SentencePiece
CONTROL, USER_DEFINED, BYTE = Piece.CONTROL, Piece.USER_DEFINED, Piece.BYTE

SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
TAB_AND_BLANKS = ["<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)]
BYTES = [f"<0x{i:02X}>" for i in range(256)]
APPENDED_SPEC = [(p, CONTROL) for p in SPECIALS] + [(p, USER_DEFINED) for p in TAB_AND_BLANKS] + [
    (p, BYTE) for p in BYTES
]

ROUND_TRIP_TEXTS = [
    "你好",
    "今天天气很好，我们去公园散步吧。",
    "The quick brown fox jumps over the lazy dog.",
    "我们用 PyTorch 训练了一个 6B 参数的模型，learning rate 是 1e-4。",
    "def add(a, b):\n    # 加法\n    return a + b\n\nclass A:\n\tdef f(self):\n\t\treturn  1\n",
    "x" + "".join(" " * n + str(n) for n in range(2, 201)),
    "   leading spaces",
    "trailing spaces   ",
    " ",
    "  \n\t \n",
    "\n\n\t\t" + " " * 80 + "|" + " " * 81 + "|" + " " * 162 + "|",
    "emoji 😀 here 🚀🇨🇳",
    "罕见字：龘 𠀋 ñ é Ω ∑ ★ ☃",
    "mixed\r\nline endings",
    "",
]
# Whitespace pieces typed as text are read as the pieces, by the official tokenizer too: no round trip.
LITERAL_PIECES = "<n> and <|tab|> <|blank_1|> <|blank_81|> written out"
ENCODE_TEXTS = ROUND_TRIP_TEXTS + [LITERAL_PIECES]


# ---------------------------------------------------------------- the official behaviour, rebuilt from its spec


def official_extension(file_bytes):
    """The first release's ice_text.model extended in memory as the official tokenizer does."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(file_bytes)
    for piece in SPECIALS:
        proto.pieces.append(Piece(piece=piece, score=0.0, type=CONTROL))
    for piece in TAB_AND_BLANKS:
        proto.pieces.append(Piece(piece=piece, score=0.0, type=USER_DEFINED))
    proto.trainer_spec.byte_fallback = True
    for piece in BYTES:
        proto.pieces.append(Piece(piece=piece, score=0.0, type=BYTE))
    return proto


def official_text_model(revision, file_bytes):
    if revision == "original":
        return spm.SentencePieceProcessor(model_proto=official_extension(file_bytes).SerializeToString())
    return spm.SentencePieceProcessor(model_proto=file_bytes)


def official_encode(sp, text, n):
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for i in range(80, 1, -1):
        text = text.replace(" " * i, f"<|blank_{i}|>")
    return [i + n for i in sp.encode(text)]


def official_decode(sp, ids, n, pad_id):
    ids = [i - n for i in ids if i != pad_id]
    text = sp.decode([i for i in ids if i >= 0])
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for i in range(2, 81):
        text = text.replace(f"<|blank_{i}|>", " " * i)
    return text


def pieces_of(path):
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def sp_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    return {rev: train_ice_text_model(root / rev / "ice_text.model", DEFAULT_CORPUS, VOCAB, revision=rev)
            for rev in IMAGE_TOKENS}


@pytest.fixture(scope="session", params=list(IMAGE_TOKENS))
def revision(request):
    return request.param


@pytest.fixture(scope="session")
def sp_path(sp_files, revision):
    return sp_files[revision]


@pytest.fixture(scope="session")
def tok(sp_path, revision):
    return ChatGLMTokenizer(str(sp_path), num_image_tokens=IMAGE_TOKENS[revision])


@pytest.fixture(scope="session")
def official(sp_path, revision):
    """The official text vocabulary of this revision's file, built independently of the tokenizer."""
    return official_text_model(revision, sp_path.read_bytes())


# ---------------------------------------------------------------- the generated ice_text.model files


def test_original_file_holds_only_the_base_vocabulary(sp_files):
    proto = pieces_of(sp_files["original"])
    pieces = [p.piece for p in proto.pieces]
    assert len(pieces) == BASE == 3656
    assert pieces[:5] == ["<unk>", "<s>", "</s>", "<pad>", "<n>"]
    assert proto.pieces[4].type == USER_DEFINED  # <n> is an ordinary member of the base vocabulary
    assert not set(pieces) & {p for p, _ in APPENDED_SPEC}  # no specials, no tab/blank pieces, no byte pieces
    assert not any(p.type in (CONTROL, BYTE) for p in proto.pieces[4:])
    assert not proto.trainer_spec.byte_fallback
    assert proto.normalizer_spec.name == "identity"
    assert not proto.normalizer_spec.add_dummy_prefix
    assert not proto.normalizer_spec.remove_extra_whitespaces


def test_v11_file_is_the_original_followed_by_the_344_appended_pieces(sp_files):
    original, v11 = pieces_of(sp_files["original"]), pieces_of(sp_files["v1.1"])
    assert len(v11.pieces) == VOCAB
    assert list(v11.pieces[:BASE]) == list(original.pieces)
    assert [(p.piece, p.type, p.score) for p in v11.pieces[BASE:]] == [(p, t, 0.0) for p, t in APPENDED_SPEC]
    assert v11.trainer_spec.byte_fallback
    # what the official code builds in memory from the first release's file is exactly the v1.1 file
    assert official_extension(sp_files["original"].read_bytes()) == v11


def test_training_is_deterministic_quiet_and_atomic(sp_files, revision, tmp_path, capfd):
    again = train_ice_text_model(tmp_path / "sub" / "ice_text.model", [str(DEFAULT_CORPUS)], VOCAB, revision=revision)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert again == tmp_path / "sub" / "ice_text.model"
    assert again.read_bytes() == sp_files[revision].read_bytes()
    assert os.listdir(tmp_path / "sub") == ["ice_text.model"]  # no temp file left behind


def test_unknown_revision_is_refused(tmp_path):
    with pytest.raises(ValueError, match="revision must be one of"):
        train_ice_text_model(tmp_path / "ice_text.model", DEFAULT_CORPUS, VOCAB, revision="v2")


# ---------------------------------------------------------------- reading the file: extend, use as is, or refuse


def test_tokenizer_text_vocabulary_is_the_official_one(tok, sp_files, revision):
    expected = official_extension(sp_files["original"].read_bytes())  # = the v1.1 file, see above
    got = sp_pb2.ModelProto()
    got.ParseFromString(tok.sp_model.serialized_model_proto())
    assert [(p.piece, p.type, p.score) for p in got.pieces] == [(p.piece, p.type, p.score) for p in expected.pieces]
    assert got.trainer_spec.byte_fallback


@pytest.mark.parametrize("text", ENCODE_TEXTS, ids=range(len(ENCODE_TEXTS)))
def test_encoding_equals_the_official_construction(tok, official, text):
    n = tok.num_image_tokens
    assert tok.encode(text, add_special_tokens=False) == official_encode(official, text, n)
    assert tok.encode(text) == official_encode(official, text, n) + [
        official.piece_to_id("[gMASK]") + n, official.piece_to_id("<sop>") + n
    ]


def test_both_revisions_encode_alike_up_to_the_image_offset(sp_files):
    original = ChatGLMTokenizer(str(sp_files["original"]), num_image_tokens=20000)
    v11 = ChatGLMTokenizer(str(sp_files["v1.1"]), num_image_tokens=0)
    for text in ROUND_TRIP_TEXTS:
        assert [i - 20000 for i in original.encode(text)] == v11.encode(text)


@pytest.mark.parametrize("damage", ["specials only", "wrong types", "wrong order", "not at the end", "one missing"])
def test_partial_or_misplaced_appended_block_is_refused_naming_the_file(sp_files, tmp_path, damage):
    proto = pieces_of(sp_files["v1.1"])
    block = [(p.piece, p.type) for p in proto.pieces[BASE:]]
    del proto.pieces[BASE:]
    if damage == "specials only":
        block = [(p, CONTROL) for p in SPECIALS]
        proto.trainer_spec.byte_fallback = False
    elif damage == "wrong types":
        block = [(p, USER_DEFINED if t == CONTROL else t) for p, t in block]
    elif damage == "wrong order":
        block[0], block[1] = block[1], block[0]
    elif damage == "not at the end":
        block.append(("zzz-extra", USER_DEFINED))
    else:
        block.remove(("<|blank_40|>", USER_DEFINED))
    for piece, kind in block:
        proto.pieces.append(Piece(piece=piece, score=0.0, type=kind))
    path = tmp_path / "ice_text.model"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError) as err:
        ChatGLMTokenizer(str(path), num_image_tokens=0)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: has ")
    assert "of the 344 pieces" in message


def test_the_old_generators_layout_and_unreadable_files_are_refused_naming_the_file(sp_files, tmp_path):
    # the former stand-in: whitespace and byte pieces learned into the base vocabulary, the specials USER_DEFINED
    proto = pieces_of(sp_files["original"])
    for piece, kind in [(p, t) for p, t in APPENDED_SPEC if t != CONTROL] + [(p, USER_DEFINED) for p in SPECIALS]:
        proto.pieces.append(Piece(piece=piece, score=0.0, type=kind))
    proto.trainer_spec.byte_fallback = True
    old = tmp_path / "old" / "ice_text.model"
    old.parent.mkdir()
    old.write_bytes(proto.SerializeToString())
    broken = tmp_path / "broken" / "ice_text.model"
    broken.parent.mkdir()
    broken.write_bytes(b"not a model")
    for path, expected in [(old, f"{old}: has 344 of the 344 pieces"), (broken, f"{broken}: not a readable")]:
        with pytest.raises(ValueError) as err:
            ChatGLMTokenizer(str(path), num_image_tokens=0)
        assert str(err.value).startswith(expected) and "\n" not in str(err.value)


# ---------------------------------------------------------------- ids and vocabulary


def test_special_ids_follow_the_official_layout(tok):
    # real files: [gMASK] = 20000 + 130000 + 1 = 150001 (first release), 0 + 130000 + 1 = 130001 (v1.1)
    n = tok.num_image_tokens
    first = n + BASE  # first appended piece
    assert tok.vocab_size == n + VOCAB == len(tok) == len(tok.get_vocab())
    assert tok.convert_tokens_to_ids(SPECIALS) == list(range(first, first + 8))
    assert tok.mask_token_id == first
    assert tok.gmask_token_id == first + 1
    assert tok.bos_token == "<sop>" and tok.bos_token_id == first + 4
    assert tok.eos_token == "<eop>" and tok.eos_token_id == first + 5
    assert tok.convert_tokens_to_ids(TAB_AND_BLANKS) == list(range(first + 8, first + 88))
    assert tok.convert_tokens_to_ids(BYTES) == list(range(first + 88, first + APPENDED)) == list(
        range(n + VOCAB - 256, n + VOCAB)
    )
    assert tok.unk_token_id == n + 0
    assert tok.end_token == "</s>" and tok.end_token_id == n + 2
    assert tok.pad_token_id == n + 3
    assert tok.convert_tokens_to_ids("<n>") == n + 4
    assert set(tok.all_special_ids) == set(range(first, first + 8)) | {n, n + 2, n + 3}


def test_hello_ends_with_gmask_and_sop_of_the_revision(tok, revision):
    gmask, sop = {"original": (23657, 23660), "v1.1": (3657, 3660)}[revision]  # n + 3656 + 1, n + 3656 + 4
    ids = tok("你好")["input_ids"]
    assert ids[-2:] == [gmask, sop]
    assert all(tok.num_image_tokens <= i < tok.num_image_tokens + BASE for i in ids[:-2])


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
    assert ids[-2:] == [tok.gmask_token_id, tok.bos_token_id]
    assert tok.decode(ids) == text  # the specials are CONTROL pieces: no text, as in the official decode
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.convert_tokens_to_string(tok.tokenize(text)) == text


def test_decode_gives_the_bare_text_of_generated_ids(tok):
    # what users do: decode(output_ids[0]) of a left-padded prompt + answer row
    batch = tok(["你好", "a longer line of text"], padding=True)
    row = batch["input_ids"][0]
    assert row[0] == tok.pad_token_id and row[-2:] == [tok.gmask_token_id, tok.bos_token_id]
    answer = tok.encode("你好！有什么可以帮你？", add_special_tokens=False)
    output = row + answer + [tok.eos_token_id, tok.pad_token_id, tok.pad_token_id]
    assert tok.decode(output) == "你好你好！有什么可以帮你？"
    assert tok.decode(output, skip_special_tokens=True) == "你好你好！有什么可以帮你？"
    assert tok.decode(batch["input_ids"]) == ["你好", "a longer line of text"]
    assert tok.batch_decode(batch["input_ids"]) == ["你好", "a longer line of text"]
    assert tok.batch_decode([output, answer], skip_special_tokens=True) == ["你好你好！有什么可以帮你？",
                                                                            "你好！有什么可以帮你？"]
    ids = tok("question", "answer")["input_ids"] + [tok.end_token_id, tok.pad_token_id]
    assert tok.decode(ids) == tok.decode(ids, skip_special_tokens=True) == "questionanswer"


def test_skip_special_tokens_drops_every_special_id(tok, official):
    # <unk> is the one special with text: sentencepiece shows it as " \u2047 ", as the official decode does
    ids = [tok.unk_token_id] + tok.encode("a", add_special_tokens=False) + [tok.mask_token_id]
    assert tok.decode(ids) == official.decode([0]) + "a" == " \u2047 a"
    assert tok.decode(ids, skip_special_tokens=True) == "a"
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == ["a"]


def test_decode_equals_the_official_decode_for_any_ids(tok, official):
    n, rng = tok.num_image_tokens, random.Random(0)
    low = max(0, n - 50)  # a few image ids too, when the revision has them
    for length in [1, 2, 5, 20, 80] * 20:
        ids = [rng.randrange(low, n + VOCAB) for _ in range(length)]
        assert tok.decode(ids) == official_decode(official, ids, n, tok.pad_token_id), ids


def test_image_ids_and_ids_past_the_vocabulary_decode_to_nothing(tok):
    text = tok.encode("图 image", add_special_tokens=False)
    beyond = [tok.vocab_size, tok.vocab_size + 31]  # the model's embedding is padded past the tokenizer
    images = [0, 7, 19999] if tok.num_image_tokens else []
    assert tok.decode(images + text + beyond) == "图 image"
    if images:
        assert tok.convert_ids_to_tokens(7) == "<image_7>"


def test_added_tokens_decode_verbatim(sp_path, revision):
    tok = ChatGLMTokenizer(str(sp_path), num_image_tokens=IMAGE_TOKENS[revision])
    tok.add_tokens(["<custom>"])
    ids = tok.encode("a<custom>b\n  c", add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<custom>") in ids
    assert tok.decode(ids) == "a<custom>b\n  c"


def test_whitespace_pieces(tok):
    assert tok.tokenize("a\nb") == ["a", "<n>", "b"]
    assert tok.tokenize("\n\n") == ["<n>", "<n>"]
    assert "<|tab|>" in tok.tokenize("a\tb")
    for run in range(2, 81):
        assert f"<|blank_{run}|>" in tok.tokenize("a" + " " * run + "b"), run
    blanks = [t for t in tok.tokenize("a" + " " * 100 + "b") if t.startswith("<|blank_")]
    assert blanks == ["<|blank_80|>", "<|blank_20|>"]
    blanks = [t for t in tok.tokenize("a" + " " * 200 + "b") if t.startswith("<|blank_")]
    assert blanks == ["<|blank_80|>", "<|blank_80|>", "<|blank_40|>"]
    assert not any(t.startswith("<|blank_") for t in tok.tokenize("one space"))
    for text in ["a\nb", "\t\tx", "a" + " " * 81 + "b", " " * 500]:
        assert tok.decode(tok.encode(text)) == text


def test_byte_fallback(tok):
    n = tok.num_image_tokens
    assert tok.tokenize("😀") == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.encode("😀", add_special_tokens=False) == [n + VOCAB - 256 + b for b in "😀".encode()]
    ids = tok.encode("😀龘𠀋", add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "😀龘𠀋"
    # bytes of an unfinished character cannot become text: sentencepiece writes one U+FFFD per byte, as the
    # official decode does
    assert tok.decode(ids[:2]) == "\ufffd\ufffd"


def test_whitespace_pieces_typed_as_text_decode_as_officially(tok, official):
    ids = tok.encode(LITERAL_PIECES)
    assert tok.decode(ids) == official_decode(official, ids, tok.num_image_tokens, tok.pad_token_id)
    assert tok.decode(ids) == "\n and \t <|blank_1|> <|blank_81|> written out"


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
