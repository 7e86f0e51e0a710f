"""Train a small sentencepiece model laid out like ChatGLM-6B's ``ice_text.model``, in either revision.

The real file is ~130k pieces and cannot be shipped or downloaded in tests, so this module builds a tiny stand-in
with the same *layout*. The base vocabulary, identical in both revisions:

* ids 0..3 are ``<unk> <s> </s> <pad>``, id 4 is ``<n>`` (newline), a user-defined piece;
* then the learned pieces; no byte pieces, no tab/blank pieces, no ChatGLM specials.

The first release's file ("original") is exactly that. The v1.1 file is that followed by the 344 pieces the
official tokenizer code appends to the first release's file in memory (``CHATGLM_APPENDED_PIECES``: the eight
specials as CONTROL, ``<|tab|>`` ``<|blank_2|>`` .. ``<|blank_80|>`` as USER_DEFINED, ``<0x00>`` .. ``<0xFF>`` as
BYTE, score 0), with byte fallback on. So the tokenizer reads the v1.1 file as it is and extends the original one,
and both give the same text vocabulary.

Training text goes through the tokenizer's own whitespace rewrite, so the learned pieces are the ones the
tokenizer will feed sentencepiece later.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from glm_tune.atomic import write_bytes
from tokenization_chatglm import (  # the tokenizer's own definitions, so the files match what it reads
    CHATGLM_APPENDED_PIECES,
    CHATGLM_SPECIAL_PIECES,
    encode_whitespace,
    with_chatglm_pieces,
)

__all__ = [
    "CHATGLM_APPENDED_PIECES",
    "CHATGLM_SPECIAL_PIECES",
    "DEFAULT_CORPUS",
    "REVISIONS",
    "encode_whitespace",
    "train_ice_text_model",
]

REVISIONS = ("original", "v1.1")
DEFAULT_CORPUS = Path(__file__).resolve().parent / "assets" / "tokenizer_corpus.txt"
# Tab and blank pieces are appended, never learned: training text is cut at them, as sentencepiece's matching of
# user-defined pieces cuts the text it segments.
_APPENDED_WHITESPACE = re.compile(r"<\|tab\|>|<\|blank_\d+\|>")


def _sentences(corpus_paths: Iterable[Path]) -> Iterator[str]:
    for path in corpus_paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.rstrip("\n")
                if line.strip():
                    yield from filter(None, _APPENDED_WHITESPACE.split(encode_whitespace(line)))


def _base_model(corpus_paths: list[Path], base_pieces: int) -> bytes:
    spm.set_random_generator_seed(0)  # the trainer's only source of randomness
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(corpus_paths),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=base_pieces,
        character_coverage=1.0,
        # Exact round trip: no NFKC, keep every space, no implicit leading space.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=False,  # the byte pieces come with the appended block
        user_defined_symbols=["<n>"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        # Determinism: one thread, read every sentence, no shuffling.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,  # keep the C++ trainer quiet
    )
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    # A corpus that mentions e.g. "[MASK]" could make the trainer learn it as a normal piece; drop such pieces so
    # the base vocabulary holds none of the appended ones (as the real file).
    appended = {piece for piece, _ in CHATGLM_APPENDED_PIECES}
    kept = [p for p in proto.pieces if p.piece not in appended]
    if len(kept) != len(proto.pieces):
        del proto.pieces[:]
        proto.pieces.extend(kept)
    return proto.SerializeToString()


def train_ice_text_model(
    out_path: str | os.PathLike,
    corpus_paths: str | os.PathLike | Iterable[str | os.PathLike],
    vocab_size: int = 4000,
    revision: str = "v1.1",
) -> Path:
    """Train an ``ice_text.model``-style sentencepiece model of `revision` and write it to ``out_path``.

    ``vocab_size`` is the size of the text vocabulary the tokenizer ends up with, the 344 appended pieces included:
    the v1.1 file holds ``vocab_size`` pieces, the original one ``vocab_size - 344``. The same corpus and
    ``vocab_size`` always give a byte-identical file (single thread, fixed seed, whole corpus used, no sampling).
    Returns ``out_path`` as a Path.
    """
    if revision not in REVISIONS:
        raise ValueError(f"revision must be one of {REVISIONS}, got {revision!r}")
    out_path = Path(out_path)
    if isinstance(corpus_paths, (str, os.PathLike)):
        corpus_paths = [corpus_paths]
    corpus_paths = [Path(p) for p in corpus_paths]
    if not corpus_paths:
        raise ValueError("corpus_paths is empty")

    model = _base_model(corpus_paths, vocab_size - len(CHATGLM_APPENDED_PIECES))
    if revision == "v1.1":
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(with_chatglm_pieces(model))  # re-serialized: one canonical record per field
        model = proto.SerializeToString()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out_path, model)
    return out_path
