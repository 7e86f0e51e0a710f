"""ChatGLM-6B tokenizer for transformers 5.

Self-contained (stdlib, sentencepiece, transformers) because this file is copied
next to checkpoints and loaded through ``auto_map`` with ``trust_remote_code``.

Layout of the model vocabulary:
* ``num_image_tokens`` ids first (20000 in the original release, 0 in v1.1),
  shown as ``<image_{i}>``; they never come out of text encoding;
* then the text vocabulary: model id = sentencepiece id + ``num_image_tokens``.

The text vocabulary is ``ice_text.model`` followed by 344 pieces the official code adds
(:data:`CHATGLM_APPENDED_PIECES`): the eight specials ``[MASK] [gMASK] [sMASK] <unused_0>
<sop> <eop> <ENC> <dBLOCK>`` (CONTROL), ``<|tab|>`` and ``<|blank_2|>`` .. ``<|blank_80|>``
(USER_DEFINED), and the byte pieces ``<0x00>`` .. ``<0xFF>`` (BYTE), all scored 0, with byte
fallback on. The first release's file (130000 pieces) lacks them, so they are appended in memory
exactly as the official tokenizer does: ``[gMASK]`` = 20000 + 130000 + 1 = 150001. The v1.1 file
already ends with them ([gMASK] = 130001) and is used as is. No id is hard-coded: every special is
looked up in the (extended) sentencepiece model.

Decoding follows the official tokenizer: padding ids are removed, CONTROL pieces (the specials,
``<s>``, ``</s>``) give no text, and so do image ids and ids past the text vocabulary (the
model's embedding is padded beyond it); whitespace pieces turn back into newlines, tabs and spaces
and byte pieces merge into characters. ``decode(ids)`` of ``你好 [gMASK] <sop> ... <eop>`` is the
bare text. Tokens added with ``add_tokens`` are written verbatim.
"""

import os
import re
import struct
from typing import Any

import sentencepiece as spm
from transformers import PreTrainedTokenizer

_MAX_BLANK = 80
_SPACE_RUN = re.compile(r" {2,}")
# Exactly the official pieces (<|blank_2|> .. <|blank_80|>): "<|blank_1|>" or "<|blank_81|>" in text stay as they are.
_WHITESPACE_PIECE = re.compile(r"<n>|<\|tab\|>|<\|blank_([2-9]|[1-7][0-9]|80)\|>")
_IMAGE_TOKEN = re.compile(r"<image_(\d+)>")
# Pieces of the text vocabulary that are special besides the named bos/eos/end/mask/gmask/pad/unk.
_EXTRA_SPECIALS = ["[sMASK]", "<unused_0>", "<ENC>", "<dBLOCK>"]

# sentencepiece piece types (ModelProto.SentencePiece.Type)
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6
CHATGLM_SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
# What the official code appends to the first release's ice_text.model, in this order; the v1.1 file ends with it.
CHATGLM_APPENDED_PIECES = (
    [(piece, CONTROL) for piece in CHATGLM_SPECIAL_PIECES]
    + [("<|tab|>", USER_DEFINED)]
    + [(f"<|blank_{i}|>", USER_DEFINED) for i in range(2, _MAX_BLANK + 1)]
    + [(f"<0x{i:02X}>", BYTE) for i in range(256)]
)


def _blank_run(match: re.Match) -> str:
    # Equivalent to replacing runs of 80, 79, ..., 2 spaces longest first:
    # blocks of 80, then one piece for the rest (a single leftover space stays a space).
    full, rest = divmod(len(match.group(0)), _MAX_BLANK)
    return f"<|blank_{_MAX_BLANK}|>" * full + (f"<|blank_{rest}|>" if rest >= 2 else " " * rest)


def encode_whitespace(text: str) -> str:
    """Newlines, tabs and space runs -> the whitespace pieces of the text vocabulary."""
    return _SPACE_RUN.sub(_blank_run, text.replace("\n", "<n>").replace("\t", "<|tab|>"))


def decode_whitespace(text: str) -> str:
    """Inverse of :func:`encode_whitespace`."""

    def piece(match: re.Match) -> str:
        if match.group(1) is not None:
            return " " * int(match.group(1))
        return "\n" if match.group(0) == "<n>" else "\t"

    return _WHITESPACE_PIECE.sub(piece, text)


class IceTextModelError(ValueError):
    """ice_text.model is not one of ChatGLM-6B's; the message names the file, on one line."""


# ----- ice_text.model as protobuf wire data -----
# ModelProto: pieces = 1 (repeated SentencePiece), trainer_spec = 2 (TrainerSpec.byte_fallback = 35).
# SentencePiece: piece = 1, score = 2 (float), type = 3. Written by hand so this file needs no protobuf package.


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes):
    """(field number, value) of each field of one serialized message; length-delimited values as bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _piece_types(model: bytes, first: int) -> list[int]:
    """Types of the pieces from id `first` on, read from a serialized sentencepiece ModelProto."""
    types, index = [], 0
    for number, value in _fields(model):
        if number == 1:
            if index >= first:
                types.append(dict(_fields(value)).get(3, NORMAL))
            index += 1
    return types


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _appended_pieces_wire() -> bytes:
    # Protobuf merges repeated fields and sub-messages that appear again later in the data, so appending these
    # records to a serialized model appends the pieces and sets trainer_spec.byte_fallback = true.
    out = bytearray()
    for piece, kind in CHATGLM_APPENDED_PIECES:
        body = _length_delimited(1, piece.encode("utf-8")) + _varint(2 << 3 | 5) + struct.pack("<f", 0.0)
        out += _length_delimited(1, body + _varint(3 << 3) + _varint(kind))
    out += _length_delimited(2, _varint(35 << 3) + _varint(1))
    return bytes(out)


def _processor(model: bytes, name: str) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=model)
    except (RuntimeError, OSError) as err:  # the C++ loader's message, e.g. "INTERNAL: ... byte pieces ..."
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise IceTextModelError(f"{name}: not a readable sentencepiece model ({message})") from None


def with_chatglm_pieces(model: bytes, name: str = "ice_text.model") -> bytes:
    """The text vocabulary of a serialized ``ice_text.model``: the first release's file (none of the 344 official
    pieces) with them appended, as the official code does; the v1.1 file (all of them, in order) as it is."""
    sp = _processor(model, name)
    ids = [sp.piece_to_id(piece) for piece, _ in CHATGLM_APPENDED_PIECES]
    found = [i for i, (piece, _) in zip(ids, CHATGLM_APPENDED_PIECES) if sp.id_to_piece(i) == piece]
    if not found:
        return model + _appended_pieces_wire()
    first = ids[0]
    if (
        len(found) == len(ids)
        and ids == list(range(first, first + len(ids)))
        and _piece_types(model, first) == [kind for _, kind in CHATGLM_APPENDED_PIECES]
    ):
        return model
    raise IceTextModelError(
        f"{name}: has {len(found)} of the {len(ids)} pieces ChatGLM-6B adds to ice_text.model ([MASK] .. <dBLOCK>, "
        f"<|tab|>, <|blank_2|> .. <|blank_80|>, <0x00> .. <0xFF>), not none and not all of them at its end in the "
        f"official order and types"
    )


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "ice_text.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    # save_pretrained() copies this file and writes auto_map, so saved folders load with AutoTokenizer.
    _auto_class = "AutoTokenizer"

    def __init__(
        self,
        vocab_file,
        do_lower_case=False,
        remove_space=False,
        bos_token="<sop>",
        eos_token="<eop>",
        end_token="</s>",
        mask_token="[MASK]",
        gmask_token="[gMASK]",
        padding_side="left",
        pad_token="<pad>",
        unk_token="<unk>",
        num_image_tokens=20000,
        **kwargs,
    ):
        # Everything get_vocab() needs must exist before super().__init__, which registers
        # the special tokens by looking them up in the vocabulary.
        self.vocab_file = vocab_file
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.num_image_tokens = int(num_image_tokens)
        with open(vocab_file, "rb") as handle:
            self._vocab_file_bytes = handle.read()  # saved back unchanged: the official code extends it again
        self.sp_model = self._text_vocabulary(self._vocab_file_bytes, str(vocab_file))
        self._base_vocab = None

        # transformers 5 treats unknown "*_token" kwargs as model-specific special tokens; from_pretrained
        # hands them back bundled in `model_specific_special_tokens`, so unpack them into our arguments.
        specific = dict(kwargs.pop("model_specific_special_tokens", None) or {})
        end_token = specific.pop("end_token", end_token)
        gmask_token = specific.pop("gmask_token", gmask_token)
        if specific:
            kwargs["model_specific_special_tokens"] = specific
        extra = list(kwargs.pop("extra_special_tokens", None) or kwargs.pop("additional_special_tokens", None) or [])
        have = {str(t) for t in extra}
        extra += [t for t in _EXTRA_SPECIALS if t not in have]
        # A saved added_tokens_decoder carries ids of the layout it was saved with; re-key pieces of the
        # base vocabulary so loading with another num_image_tokens cannot leave stale ids behind.
        saved = kwargs.pop("added_tokens_decoder", None) or {}
        kwargs["added_tokens_decoder"] = {self._base_id(str(t), int(i)): t for i, t in saved.items()}

        super().__init__(
            vocab_file=vocab_file,
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            bos_token=bos_token,
            eos_token=eos_token,
            end_token=end_token,
            mask_token=mask_token,
            gmask_token=gmask_token,
            padding_side=padding_side,
            pad_token=pad_token,
            unk_token=unk_token,
            num_image_tokens=self.num_image_tokens,
            extra_special_tokens=extra,
            **kwargs,
        )

    @staticmethod
    def _text_vocabulary(file_bytes: bytes, name: str) -> spm.SentencePieceProcessor:
        return _processor(with_chatglm_pieces(file_bytes, name), name)

    # ----- special token ids (all looked up in the sentencepiece model) -----
    @property
    def gmask_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.gmask_token)

    @property
    def mask_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.mask_token)

    @property
    def end_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.end_token)

    # ----- vocabulary -----
    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp_model.get_piece_size()

    def _base_id(self, token: str, default: Any = None) -> Any:
        """Id of `token` in the image + sentencepiece vocabulary, `default` if it is in neither."""
        image = _IMAGE_TOKEN.fullmatch(token)
        if image and int(image.group(1)) < self.num_image_tokens:
            return int(image.group(1))
        sp_id = self.sp_model.piece_to_id(token)
        if sp_id != self.sp_model.unk_id() or token == self.sp_model.id_to_piece(sp_id):
            return sp_id + self.num_image_tokens
        return default

    def get_vocab(self) -> dict[str, int]:
        if self._base_vocab is None:  # cached: the base class calls this often while registering tokens
            vocab = {f"<image_{i}>": i for i in range(self.num_image_tokens)}
            for sp_id in range(self.sp_model.get_piece_size()):
                vocab[self.sp_model.id_to_piece(sp_id)] = sp_id + self.num_image_tokens
            self._base_vocab = vocab
        return {**self._base_vocab, **self._added_tokens_encoder}

    def _convert_token_to_id(self, token: str) -> int:
        return self._base_id(token, self.sp_model.unk_id() + self.num_image_tokens)

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < self.num_image_tokens:
            return f"<image_{index}>"
        sp_id = index - self.num_image_tokens
        if 0 <= sp_id < self.sp_model.get_piece_size():
            return self.sp_model.id_to_piece(sp_id)
        return str(self.unk_token)  # e.g. ids of a model embedding padded beyond the tokenizer

    # ----- text <-> tokens -----
    def _tokenize(self, text: str, **kwargs) -> list[str]:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return self.sp_model.encode(encode_whitespace(text), out_type=str)

    # ----- ids -> text, as the official tokenizer decodes -----
    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        dropped = {self.pad_token_id} | (set(self.all_special_ids) if skip_special_tokens else set())
        text = self._ids_to_text([i for i in ids if i not in dropped])
        if clean_up_tokenization_spaces:  # off by default, as in the official tokenizer: it would alter the text
            text = self.clean_up_tokenization(text)
        return text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._ids_to_text([i for i in self.convert_tokens_to_ids(tokens) if i != self.pad_token_id])

    def _ids_to_text(self, ids: list[int]) -> str:
        # Runs of text-vocabulary ids go through sentencepiece, which merges byte pieces and renders CONTROL pieces
        # as "". Image ids and ids past the text vocabulary carry no text (the official decode drops ids below
        # num_image_tokens). Tokens added with add_tokens() lie past the text vocabulary and are written verbatim.
        n, pieces = self.num_image_tokens, self.sp_model.get_piece_size()
        out, run = [], []
        for i in ids:
            if n <= i < n + pieces:
                run.append(i - n)
            elif i >= n + pieces and i in self._added_tokens_decoder:
                out += [decode_whitespace(self.sp_model.decode(run)), self._added_tokens_decoder[i].content]
                run = []
        out.append(decode_whitespace(self.sp_model.decode(run)))
        return "".join(out)

    # ----- special tokens around sequences -----
    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        # ChatGLM puts the blank-filling prompt at the END: text [gMASK] <sop> (answer <eop>).
        ids = token_ids_0 + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        # Used by prepare_for_model to reserve room, so truncation cuts text and keeps the specials.
        return len(self.build_inputs_with_special_tokens([], [] if pair else None))

    # ----- saving -----
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary path ({save_directory}) should be a directory")
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        path = os.path.join(save_directory, name)
        # The file as it was read (not the extended vocabulary, which the official code would extend again); from
        # memory, so this works even if the original file moved or is the destination.
        with open(path, "wb") as handle:
            handle.write(self._vocab_file_bytes)
        return (path,)

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["sp_model"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.sp_model = self._text_vocabulary(self._vocab_file_bytes, str(self.vocab_file))
