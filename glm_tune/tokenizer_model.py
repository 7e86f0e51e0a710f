"""Train a small sentencepiece model laid out like ChatGLM-6B's ``ice_text.model``.

The real ``ice_text.model`` is ~130k pieces and cannot be shipped or downloaded in
tests, so this module builds a tiny stand-in with the same *layout*:

* ids 0..3 are ``<unk> <s> </s> <pad>``;
* the whitespace pieces ``<n>``, ``<|tab|>``, ``<|blank_2|>`` .. ``<|blank_80|>``
  are user-defined pieces (the tokenizer rewrites newlines, tabs and space runs
  into them before calling sentencepiece);
* byte fallback is on, so any character can be encoded;
* the eight ChatGLM specials ``[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop>
  <ENC> <dBLOCK>`` are the last eight pieces, in that order.

Training text goes through the tokenizer's own whitespace rewrite, so the learned
pieces are the ones the tokenizer will feed sentencepiece later.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from glm_tune.atomic import write_bytes
from tokenization_chatglm import encode_whitespace  # the tokenizer's own rewrite, so training text matches

__all__ = [
    "CHATGLM_SPECIAL_PIECES",
    "DEFAULT_CORPUS",
    "MAX_BLANK",
    "WHITESPACE_PIECES",
    "encode_whitespace",
    "train_ice_text_model",
]

MAX_BLANK = 80
WHITESPACE_PIECES = ["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, MAX_BLANK + 1)]
CHATGLM_SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
DEFAULT_CORPUS = Path(__file__).resolve().parent / "assets" / "tokenizer_corpus.txt"

def _sentences(corpus_paths: Iterable[Path]) -> Iterator[str]:
    # One training sentence per non-empty line, whitespace already rewritten so the
    # learned pieces match what the tokenizer will actually see.
    for path in corpus_paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.rstrip("\n")
                if line.strip():
                    yield encode_whitespace(line)


def _append_specials(model_bytes: bytes) -> bytes:
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    # A corpus that mentions e.g. "[MASK]" could make the trainer learn it as a normal
    # piece; drop such duplicates so each special exists once, at the end.
    kept = [p for p in proto.pieces if p.piece not in CHATGLM_SPECIAL_PIECES]
    if len(kept) != len(proto.pieces):
        del proto.pieces[:]
        proto.pieces.extend(kept)
    for piece in CHATGLM_SPECIAL_PIECES:
        proto.pieces.add(piece=piece, score=0.0, type=sp_pb2.ModelProto.SentencePiece.USER_DEFINED)
    return proto.SerializeToString()


def train_ice_text_model(
    out_path: str | os.PathLike,
    corpus_paths: str | os.PathLike | Iterable[str | os.PathLike],
    vocab_size: int = 4000,
) -> Path:
    """Train an ``ice_text.model``-style sentencepiece model and write it to ``out_path``.

    ``vocab_size`` is the size of the final file, the eight appended specials included.
    The same corpus and ``vocab_size`` always give a byte-identical file (single
    thread, fixed seed, whole corpus used, no sampling). Returns ``out_path`` as a Path.
    """
    out_path = Path(out_path)
    if isinstance(corpus_paths, (str, os.PathLike)):
        corpus_paths = [corpus_paths]
    corpus_paths = [Path(p) for p in corpus_paths]
    if not corpus_paths:
        raise ValueError("corpus_paths is empty")

    spm.set_random_generator_seed(0)  # the trainer's only source of randomness
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(corpus_paths),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=vocab_size - len(CHATGLM_SPECIAL_PIECES),
        character_coverage=1.0,
        # Exact round trip: no NFKC, keep every space, no implicit leading space.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        user_defined_symbols=WHITESPACE_PIECES,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        # Determinism: one thread, read every sentence, no shuffling.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,  # keep the C++ trainer quiet
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out_path, _append_specials(buffer.getvalue()))
    return out_path
