"""ChatGLM-6B tokenizer for transformers 5.

Self-contained (stdlib, sentencepiece, transformers) because this file is copied
next to checkpoints and loaded through ``auto_map`` with ``trust_remote_code``.

Layout of the model vocabulary:
* ``num_image_tokens`` ids first (20000 in the original release, 0 in v1.1),
  shown as ``<image_{i}>``; they never come out of text encoding;
* then every piece of ``ice_text.model``: model id = sentencepiece id + ``num_image_tokens``.
No id is hard-coded: specials are looked up in the sentencepiece model.
"""

import os
import re
from typing import Any

import sentencepiece as spm
from transformers import PreTrainedTokenizer

_MAX_BLANK = 80
_SPACE_RUN = re.compile(r" {2,}")
_WHITESPACE_PIECE = re.compile(r"<n>|<\|tab\|>|<\|blank_(\d+)\|>")
_IMAGE_TOKEN = re.compile(r"<image_(\d+)>")
# Pieces of ice_text.model that are special besides the named bos/eos/end/mask/gmask/pad/unk.
_EXTRA_SPECIALS = ["[sMASK]", "<unused_0>", "<ENC>", "<dBLOCK>"]


def _blank_run(match: re.Match) -> str:
    # Equivalent to replacing runs of 80, 79, ..., 2 spaces longest first:
    # blocks of 80, then one piece for the rest (a single leftover space stays a space).
    full, rest = divmod(len(match.group(0)), _MAX_BLANK)
    return f"<|blank_{_MAX_BLANK}|>" * full + (f"<|blank_{rest}|>" if rest >= 2 else " " * rest)


def encode_whitespace(text: str) -> str:
    """Newlines, tabs and space runs -> the user-defined whitespace pieces of ice_text.model."""
    return _SPACE_RUN.sub(_blank_run, text.replace("\n", "<n>").replace("\t", "<|tab|>"))


def decode_whitespace(text: str) -> str:
    """Inverse of :func:`encode_whitespace`."""

    def piece(match: re.Match) -> str:
        if match.group(1) is not None:
            return " " * int(match.group(1))
        return "\n" if match.group(0) == "<n>" else "\t"

    return _WHITESPACE_PIECE.sub(piece, text)


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
        self.sp_model = spm.SentencePieceProcessor(model_file=str(vocab_file))
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

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Text pieces go through sentencepiece (which also merges byte-fallback pieces); special and
        # image tokens are written verbatim, since sentencepiece would render control pieces as "".
        # Padding never contributes text.
        verbatim = set(self.all_special_tokens)
        out, run = [], []
        for token in tokens:
            if token == str(self.pad_token):
                continue
            if token in verbatim or _IMAGE_TOKEN.fullmatch(token):
                out.append(decode_whitespace(self.sp_model.decode_pieces(run)))
                out.append(token)
                run = []
            else:
                run.append(token)
        out.append(decode_whitespace(self.sp_model.decode_pieces(run)))
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
        # Write the loaded model itself: works even if the original file moved or is the destination.
        with open(path, "wb") as handle:
            handle.write(self.sp_model.serialized_model_proto())
        return (path,)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp_model"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.load_from_serialized_proto(state["sp_model"])
