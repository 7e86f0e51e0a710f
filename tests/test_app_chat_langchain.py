"""The knowledge-base chat app (APP_example/chat_langchain/): retrieval quality on the shipped sample knowledge base
(the right document first, BM25 and hybrid ahead of dense-only on Chinese keyword questions, identical after a
reload), incremental syncing counted through the stats and through the embedder itself, bad documents as one warning
each, the chain on the embedded ChatGLM (retrieved text in the prompt, passages cut to --max_length, follow-ups
condensed), the scripts' JSON output and one-line errors, and the Streamlit page under AppTest with its upload box."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import FakeListChatModel

import glm_tune.knowledge_base as knowledge_base
from glm_tune.chat_model import ChatGLM
from glm_tune.errors import UserError
from glm_tune.kb_chat import (NO_ANSWER, PROMPT_MARGIN, ask, build_chain, build_parser, clean_standalone,
                              format_context, retrieval_query, run)
from glm_tune.knowledge_base import (SAMPLE_DOCS, SAMPLE_QUESTION, KnowledgeBase, add_files, build_index,
                                     ensure_sample_index, read_index)

import app_helpers
from app_helpers import assert_clean

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "APP_example" / "chat_langchain"
# Chinese questions worded like a user would, sharing keywords (not sentences) with their document.
ZH_QUESTIONS = [
    ("婚假有几天？", "hr/leave_policy.md"),
    ("年假没休完可以顺延吗？", "hr/leave_policy.md"),
    ("电热水壶显示 E2 是什么故障？", "products/kettle_manual.html"),
    ("水垢怎么清洗？", "products/kettle_manual.html"),
    ("麻婆豆腐要放哪种豆瓣酱？", "recipes/mapo_tofu.txt"),
    ("勾芡要分几次？", "recipes/mapo_tofu.txt"),
    ("大熊猫基地几点开门？", "travel/chengdu_guide.md"),
    ("都江堰怎么去？", "travel/chengdu_guide.md"),
    ("出差住宿标准每晚多少钱？", "hr/expense_policy.docx"),
    ("报销单要在多少天内提交？", "hr/expense_policy.docx"),
    ("阅读器退货运费谁承担？", "support/faq.jsonl"),
    ("墨石阅读器支持什么电子书格式？", "support/faq.jsonl"),
]
EN_QUESTIONS = [
    ("How long must a password be?", "it_security_policy.txt"),
    ("What should I do if I lose my KeyGuard token?", "it_security_policy.txt"),
    ("What rank should I pick for LoRA?", "notes/lora_finetuning.md"),
    ("When does the astronomy club meet?", "clubs/astronomy_club.pdf"),
    ("Can I borrow the club telescope?", "clubs/astronomy_club.pdf"),
    ("How do I prevent blossom end rot on tomatoes?", "garden/balcony_tomatoes.txt"),
    ("How long does the Mostone e-reader battery last?", "support/faq.jsonl"),
]
SAMPLE_FILES = 10
FAST = ["--max_new_tokens", "8", "--no-do_sample"]


def open_page(monkeypatch, *flags):
    return app_helpers.open_page(monkeypatch, APP / "app.py", *flags)


@pytest.fixture(scope="module")
def sample_index():
    """The sample knowledge base indexed where the apps look without --index_dir (the session's cache folder)."""
    return ensure_sample_index(progress=False)


@pytest.fixture(scope="module")
def kb(sample_index):
    return KnowledgeBase.open(sample_index)


@pytest.fixture(scope="module")
def llm():
    """The embedded ChatGLM, greedy, a few tokens."""
    return ChatGLM(max_new_tokens=8, do_sample=False)


@pytest.fixture
def embedded_texts(monkeypatch):
    """Every text that reaches the embedder, in order (the real embedder still does the work)."""
    seen = []
    encode = knowledge_base.Embedder.encode

    def counting(self, texts):
        seen.extend(texts)
        return encode(self, texts)

    monkeypatch.setattr(knowledge_base.Embedder, "encode", counting)
    return seen


class Recorder(BaseCallbackHandler):
    """The prompts sent to chat models and the queries sent to retrievers."""

    def __init__(self):
        self.prompts, self.queries = [], []

    def on_chat_model_start(self, serialized, messages, **kwargs):
        self.prompts.append("\n".join(m.content for m in messages[0]))

    def on_retriever_start(self, serialized, query, **kwargs):
        self.queries.append(query)


def folder_bytes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def copy_index(sample_index, tmp_path):
    """A private copy of the sample documents and their index (the copy syncs with the copied documents without
    embedding anything: same files, same content)."""
    docs, index = tmp_path / "docs", tmp_path / "index"
    shutil.copytree(SAMPLE_DOCS, docs)
    shutil.copytree(sample_index, index)
    assert build_index(docs, index, progress=False)["chunks_embedded"] == 0
    return docs, index


def run_script(script, *args):
    return subprocess.run([sys.executable, str(APP / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


# ----------------------------------------------------------------------------------------------------------------------
# Ingest


def test_sample_index_holds_every_document_in_safe_files_with_pages_and_lines(sample_index, kb):
    assert sample_index == knowledge_base.DEFAULT_INDEX_DIR and sample_index.parent == Path(os.environ["GLM_TUNE_CACHE"])
    assert sorted(p.name for p in sample_index.iterdir()) == ["chunks.jsonl", "index.faiss", "manifest.json"]
    stored = read_index(sample_index)
    assert stored.manifest["embedding_model"] == knowledge_base.DEFAULT_EMBEDDING_MODEL
    assert stored.manifest["dim"] == 384 and stored.settings == {"chunk_size": 300, "chunk_overlap": 50}
    suffixes = {Path(s).suffix for s in kb.sources}
    assert len(kb.sources) == SAMPLE_FILES and {".md", ".txt", ".html", ".jsonl", ".docx", ".pdf"} <= suffixes
    assert len(kb) == stored.index.ntotal == len(stored.chunks) > 2 * SAMPLE_FILES
    records = list(stored.chunks.values())
    assert all(0 < len(r["text"]) <= 300 for r in records)
    assert {r["page"] for r in records if r["source"] == "clubs/astronomy_club.pdf"} == {1, 2}
    assert {r["line"] for r in records if r["source"] == "support/faq.jsonl"} == {1, 2, 3, 4, 5}
    html = " ".join(r["text"] for r in records if r["source"] == "products/kettle_manual.html")
    assert "E2：温度传感器异常" in html and "console.log" not in html and "font-family" not in html
    faq = [r["text"] for r in records if r["source"] == "support/faq.jsonl"]
    assert faq[1].startswith("墨石阅读器无法开机怎么办？\n屏幕一直黑屏")  # instruction, input, output joined


def test_chinese_chunks_end_at_sentences_paragraphs_or_lines(kb):
    neighbours = []
    for source in ("hr/leave_policy.md", "travel/chengdu_guide.md", "recipes/mapo_tofu.txt"):
        text = (SAMPLE_DOCS / source).read_text(encoding="utf-8")
        chunks = [r["text"] for r in kb.stored.chunks.values() if r["source"] == source]
        assert len(chunks) >= 2
        for chunk in chunks:
            end = text.index(chunk) + len(chunk)
            assert chunk[-1] in "。！？；，" or text[end : end + 1] in ("", "\n"), (source, chunk[-20:])
        neighbours += zip(chunks, chunks[1:])
    # where the last sentences of a chunk are short enough, the next chunk starts with them (--chunk_overlap 50)
    assert any(after[:10] in before[-50:] for before, after in neighbours)


# ----------------------------------------------------------------------------------------------------------------------
# Retrieval


@pytest.mark.parametrize("question, source", ZH_QUESTIONS[::2] + EN_QUESTIONS)
def test_hybrid_ranks_the_right_document_first(kb, question, source):
    assert kb.search(question, k=3)[0].source == source


def test_bm25_and_hybrid_beat_dense_only_on_chinese_keyword_questions(kb):
    """The default embedder reads English: on Chinese questions it is near chance, keywords are not."""
    hits = {mode: sum(kb.search(q, k=1, mode=mode)[0].source == source for q, source in ZH_QUESTIONS)
            for mode in ("dense", "bm25", "hybrid")}
    assert hits["bm25"] > hits["dense"] and hits["hybrid"] > hits["dense"], hits
    assert hits["hybrid"] >= len(ZH_QUESTIONS) - 1 and hits["dense"] <= len(ZH_QUESTIONS) - 4, hits
    english = {mode: sum(kb.search(q, k=1, mode=mode)[0].source == source for q, source in EN_QUESTIONS)
               for mode in ("dense", "hybrid")}
    assert english == {"dense": len(EN_QUESTIONS), "hybrid": len(EN_QUESTIONS)}  # and dense is fine in English


def test_reloading_the_index_gives_identical_results(sample_index, kb, monkeypatch):
    questions = [q for q, _ in ZH_QUESTIONS[:4] + EN_QUESTIONS[:3]]
    before = {(q, mode): kb.search(q, k=5, mode=mode) for q in questions for mode in ("hybrid", "dense", "bm25")}
    monkeypatch.setattr(knowledge_base, "_EMBEDDERS", {})  # the embedding model loaded again too
    reloaded = KnowledgeBase.open(sample_index)
    after = {key: reloaded.search(key[0], k=5, mode=key[1]) for key in before}
    assert after == before  # same chunks, same order, same float scores
    assert all(len(hits) == 5 for (q, mode), hits in before.items() if mode != "bm25")


def test_knowledge_base_is_a_langchain_retriever(kb):
    docs = kb.retriever(k=2, mode="bm25").invoke("麻婆豆腐")
    assert len(docs) == 2 and all(d.metadata["source"] == "recipes/mapo_tofu.txt" for d in docs)
    assert {"source", "chunk", "score", "id"} <= set(docs[0].metadata) and docs[0].page_content
    with pytest.raises(UserError, match="--retriever fuzzy"):
        kb.search("x", mode="fuzzy")


def test_sync_embeds_only_new_and_changed_files(sample_index, tmp_path, embedded_texts):
    docs, index = copy_index(sample_index, tmp_path)
    assert embedded_texts == []
    before = read_index(index)
    (docs / "recipes" / "mapo_tofu.txt").unlink()
    (docs / "new_policy.md").write_text("# 远程办公制度\n\n员工每周可以申请两天居家远程办公，须提前一天在飞鸽 OA 中登记。",
                                        encoding="utf-8")
    changed = docs / "garden" / "balcony_tomatoes.txt"
    changed.write_text(changed.read_text() + "\nSlugs. Beer traps catch the slugs that climb into the pots.\n")

    stats = build_index(docs, index, progress=False)
    after = read_index(index)
    new_records = [r for r in after.chunks.values() if r["source"] in ("new_policy.md", "garden/balcony_tomatoes.txt")]
    assert {k: stats[k] for k in ("added", "changed", "unchanged", "removed", "skipped")} == \
        dict(added=1, changed=1, unchanged=SAMPLE_FILES - 2, removed=1, skipped=0)
    assert stats["chunks_embedded"] == len(new_records) == len(embedded_texts)
    assert sorted(embedded_texts) == sorted(r["text"] for r in new_records)
    assert stats["chunks_total"] == len(after.chunks) and "recipes/mapo_tofu.txt" not in after.sources
    for source, entry in before.sources.items():  # the untouched files: same chunks, same ids, same vectors
        if source not in ("recipes/mapo_tofu.txt", "garden/balcony_tomatoes.txt"):
            assert after.sources[source] == entry
            for i in entry["ids"]:
                assert after.chunks[i] == before.chunks[i]
                assert (after.index.reconstruct(i) == before.index.reconstruct(i)).all()

    kb = KnowledgeBase.open(index)
    assert all(h.source != "recipes/mapo_tofu.txt" for h in kb.search("麻婆豆腐 郫县豆瓣酱", k=10, mode="bm25"))
    assert kb.search("可以申请几天远程办公？", k=1)[0].source == "new_policy.md"
    assert kb.search("How do I get rid of slugs?", k=1)[0].source == "garden/balcony_tomatoes.txt"

    embedded_texts.clear()
    again = build_index(docs, index, progress=False)
    assert (again["chunks_embedded"], again["unchanged"], embedded_texts) == (0, SAMPLE_FILES, [])

    resplit = build_index(docs, index, chunk_size=200, chunk_overlap=20, progress=False)
    assert resplit["resplit"] == SAMPLE_FILES and resplit["chunks_embedded"] == resplit["chunks_total"]
    assert len(embedded_texts) == resplit["chunks_total"] and read_index(index).settings["chunk_size"] == 200


def test_a_failed_sync_leaves_the_old_index_as_it_was(sample_index, tmp_path, monkeypatch):
    docs, index = copy_index(sample_index, tmp_path)
    original = folder_bytes(index)
    (docs / "new.txt").write_text("something new to embed")

    def broken(self, texts):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(knowledge_base.Embedder, "encode", broken)
    with pytest.raises(RuntimeError):
        build_index(docs, index, progress=False)
    assert folder_bytes(index) == original and not list(tmp_path.glob(".index.*"))


def test_an_index_keeps_its_embedding_model(sample_index, tmp_path):
    with pytest.raises(UserError, match="built with embedding model all-MiniLM-L6-v2, not BAAI/bge-small-zh"):
        KnowledgeBase.open(sample_index, embedding_model="BAAI/bge-small-zh-v1.5")
    with pytest.raises(UserError, match="add --rebuild"):
        build_index(SAMPLE_DOCS, sample_index, embedding_model="BAAI/bge-small-zh-v1.5", progress=False)
    with pytest.raises(UserError, match="--chunk_overlap 300: must be"):
        build_index(SAMPLE_DOCS, tmp_path / "x", chunk_overlap=300, progress=False)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("do not replace me")
    with pytest.raises(UserError, match="is not a knowledge-base index"):  # never swapped for an index
        build_index(SAMPLE_DOCS, tmp_path / "precious", progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# Bad documents


def test_unreadable_files_are_one_warning_each_and_the_rest_is_indexed(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.md").write_text("# 远程办公\n\n每周可以居家办公两天。", encoding="utf-8")
    (docs / "gbk.txt").write_bytes("国标编码的文件也能读取：量子咖啡机每 45 天除垢一次。".encode("gb18030"))
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\ngarbage without xref or trailer")
    (docs / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    (docs / "empty.md").write_bytes(b"")
    (docs / "fake.docx").write_bytes(b"this is not a zip archive")
    (docs / "rows.jsonl").write_text('{"text": "第一行可以读取。"}\n{not json\n{"id": 3}\n{"content": "third row"}\n',
                                     encoding="utf-8")
    (docs / "notes.csv").write_text("a,b\n")  # not a supported type: ignored, not warned about
    capsys.readouterr()

    stats = build_index(docs, tmp_path / "index", progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    expected = {"broken.pdf": "not a readable PDF", "image.txt": "binary file", "empty.md": "empty file",
                "fake.docx": "not a readable Word .docx file", "rows.jsonl:2": "not valid JSON",
                "rows.jsonl:3": "no text, content or instruction/output field"}
    assert len(warnings) == len(expected) == len(stats["warnings"])
    for (name, why), line in zip(sorted(expected.items()), sorted(warnings, key=lambda w: w.split(docs.name + "/")[1])):
        assert line.startswith(f"warning: {docs / name}: {why}") and line.endswith(", skipped"), line
    assert (stats["added"], stats["skipped"], stats["ignored"]) == (3, 4, 1)
    kb = KnowledgeBase.open(tmp_path / "index")
    assert kb.sources == ["gbk.txt", "good.md", "rows.jsonl"]
    assert kb.search("量子咖啡机多久除垢？", k=1)[0].source == "gbk.txt"
    assert [r["line"] for r in kb.stored.chunks.values() if r["source"] == "rows.jsonl"] == [1, 4]


def test_nothing_to_index_is_an_error_and_the_index_stays_byte_for_byte(sample_index, tmp_path):
    docs, index = copy_index(sample_index, tmp_path)
    original = folder_bytes(index)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_script("build_kb.py", "--docs", empty, "--index_dir", index)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: --docs {empty}: no documents to index; supported: "
                                                  ".txt, .md, .pdf, .docx, .html, .htm, .jsonl"]
    assert folder_bytes(index) == original
    (empty / "blank.txt").write_text("  \n")  # only files that cannot be indexed: the same
    with pytest.raises(UserError, match="nothing could be indexed from its 1 files"):
        build_index(empty, index, progress=False)
    assert folder_bytes(index) == original


# ----------------------------------------------------------------------------------------------------------------------
# The chain


def test_retrieved_chunks_reach_the_chatglm_prompt_and_the_answer_streams(kb, llm):
    recorder, streamed = Recorder(), []
    answer = ask(build_chain(llm, kb.retriever(k=3)), SAMPLE_QUESTION, on_token=streamed.append,
                 config={"callbacks": [recorder]})
    [prompt] = recorder.prompts  # a first question needs no condensing: one model call
    assert recorder.queries == [SAMPLE_QUESTION]
    assert [s["source"] for s in answer.sources][0] == "hr/leave_policy.md" and len(answer.sources) == 3
    assert "婚假 13 天" in answer.sources[0]["text"]
    for i, source in enumerate(answer.sources, start=1):
        assert f"[{i}]（来源：{source['source']}）\n{source['text'].strip()}" in prompt
    assert NO_ANSWER in prompt and prompt.endswith(f"问题：{SAMPLE_QUESTION}")
    assert answer.answer and "".join(streamed).strip() == answer.answer  # ChatGLM's own tokens, streamed


def test_passages_are_cut_to_the_max_length_budget(kb):
    small = ChatGLM(max_new_tokens=8, max_length=520, do_sample=False)  # room for the best passage, not all four
    recorder = Recorder()
    answer = ask(build_chain(small, kb.retriever(k=4)), SAMPLE_QUESTION, config={"callbacks": [recorder]})
    best = kb.search(SAMPLE_QUESTION, k=1)[0]
    assert 1 <= len(answer.sources) < 4 and answer.sources[0] == best.as_source()
    assert small.get_num_tokens(recorder.prompts[0]) <= 520 - 8 - PROMPT_MARGIN
    roomy = ChatGLM(max_new_tokens=8, max_length=2048, do_sample=False)
    assert len(ask(build_chain(roomy, kb.retriever(k=4)), SAMPLE_QUESTION).sources) == 4


def test_a_follow_up_is_condensed_with_the_history_before_retrieval(kb):
    history = [("墨石阅读器支持哪些电子书格式？", "支持 EPUB、PDF、MOBI、AZW3 和 TXT 格式。")]
    model = FakeListChatModel(responses=["独立问题：墨石阅读器的保修期是多久？", "保修期为一年 [1]。"])
    recorder = Recorder()
    answer = ask(build_chain(model, kb.retriever(k=2)), "那它的保修期呢？", history,
                 config={"callbacks": [recorder]})
    condense, qa = recorder.prompts
    assert all(text in condense for text in ("墨石阅读器支持哪些电子书格式？", "支持 EPUB、PDF", "那它的保修期呢？"))
    assert answer.standalone_question == "墨石阅读器的保修期是多久？"
    assert recorder.queries == ["墨石阅读器的保修期是多久？\n那它的保修期呢？"]  # rewrite, then the words as typed
    assert qa.endswith("问题：墨石阅读器的保修期是多久？") and "那它的保修期呢" not in qa
    assert answer.sources[0]["source"] == "support/faq.jsonl" and "保修期为一年" in answer.sources[0]["text"]
    assert answer.sources[0]["text"] in qa and answer.answer == "保修期为一年 [1]。"


def test_a_useless_rewrite_falls_back_to_the_question_as_typed():
    assert clean_standalone("", "那病假呢？") == "那病假呢？"
    assert clean_standalone("独立问题：\n", "那病假呢？") == "那病假呢？"
    assert clean_standalone(" 病假怎么请？\n（解释：…）", "那病假呢？") == "病假怎么请？"
    assert retrieval_query("病假怎么请？", "那病假呢？") == "病假怎么请？\n那病假呢？"
    assert retrieval_query("婚假几天？", "婚假几天？") == "婚假几天？"
    assert format_context([]) == ""


def test_terminal_chat_keeps_history_and_lists_sources(sample_index, llm):
    out = io.StringIO()
    args = build_parser().parse_args(["--index_dir", str(sample_index), "--interactive", "--k", "2", *FAST])
    history = run(args, stdin=io.StringIO("婚假有几天？\n\n那病假呢？\nstop\n"), out=out)
    assert [q for q, _ in history] == ["婚假有几天？", "那病假呢？"]
    assert out.getvalue().count("来源：\n[1] ") == 2 and "[1] hr/leave_policy.md #1" in out.getvalue()


def test_json_output_of_the_embedded_default(sample_index):
    """No --index_dir: the sample index in the cache (built by the fixture; the script syncs it), the sample
    question; stdout is the JSON object alone."""
    result = run_script("kb_chat.py", "--json", *FAST)
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    output = json.loads(line)
    assert set(output) == {"answer", "sources"} and isinstance(output["answer"], str)
    assert len(output["sources"]) == 4 and output["sources"][0]["source"] == "hr/leave_policy.md"
    for source in output["sources"]:
        assert set(source) == {"source", "chunk", "score", "text"}
        assert (type(source["source"]), type(source["chunk"]), type(source["score"]), type(source["text"])) == \
            (str, int, float, str)


def test_a_missing_index_is_one_line(tmp_path):
    missing = tmp_path / "no_index"
    result = run_script("kb_chat.py", "--index_dir", missing, "--question", "hi")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --index_dir {missing}: no such folder; build one with: python APP_example/chat_langchain/"
        f"build_kb.py --docs YOUR_DOCS --index_dir {missing}"]


# ----------------------------------------------------------------------------------------------------------------------
# The web page


def test_page_answers_with_sources_and_indexes_uploads(monkeypatch, sample_index, tmp_path, kb, llm):
    _, index = copy_index(sample_index, tmp_path)
    at = open_page(monkeypatch, "--index_dir", str(index), "--max_new_tokens", "8", "--temperature", "0")
    assert_clean(at)
    at.chat_input(key="question").set_value(SAMPLE_QUESTION).run()
    assert_clean(at)
    assert [e.label for e in at.expander] == ["Sources (4)"]
    shown = [m.value for m in at.markdown]
    expected = ask(build_chain(llm, kb.retriever(k=4)), SAMPLE_QUESTION).answer  # the same model, greedy
    assert shown[:2] == [SAMPLE_QUESTION, expected]
    assert shown[2].startswith("**[1] hr/leave_policy.md** · chunk 1 · score ")
    assert "婚假 13 天" in at.text[0].value

    at.sidebar.selectbox(key="retriever").set_value("bm25")
    at.sidebar.slider(key="k").set_value(2)
    at.file_uploader(key="uploads").set_value([("coffee.txt", "量子咖啡机每 45 天除垢一次。".encode(), "text/plain"),
                                               ("bad.txt", b"\0\1\2", "text/plain")]).run()
    assert_clean(at)
    assert "1 added" in at.sidebar.success[0].value and "1 skipped" in at.sidebar.success[0].value
    assert at.sidebar.warning[0].value == f"{index / 'uploads' / 'bad.txt'}: binary file (NUL bytes), not text, skipped"
    assert sorted(p.name for p in (index / "uploads").iterdir()) == ["coffee.txt"]  # a useless upload is not kept
    assert "uploads/coffee.txt" in KnowledgeBase.open(index).sources

    at.chat_input(key="question").set_value("量子咖啡机多久除垢一次？").run()
    assert_clean(at)
    assert [e.label for e in at.expander] == ["Sources (4)", "Sources (2)"]  # history kept, new k applied
    assert at.markdown[-2].value.startswith("**[1] uploads/coffee.txt** · chunk 0 · score ")
    chunks = len(read_index(index).chunks)
    at.run()  # a rerun does not index the same upload again
    assert_clean(at)
    assert len(read_index(index).chunks) == chunks and "1 added" in at.sidebar.success[0].value
    with pytest.raises(UserError, match="tool.exe: unsupported file type"):
        add_files(index, [("tool.exe", b"MZ")])


@pytest.mark.parametrize("flags, message", [
    (["--k", "0"], "--k 0: must be at least 1"),
    (["--retriever", "fuzzy"], "argument --retriever: invalid choice"),
    (["--index_dir", "/nonexistent/kb"], "--index_dir /nonexistent/kb: no such folder"),
])
def test_bad_flags_are_one_line_errors_on_the_page(monkeypatch, flags, message):
    at = open_page(monkeypatch, *flags)
    assert not at.exception and len(at.error) == 1 and message in at.error[0].value
    assert "\n" not in at.error[0].value
