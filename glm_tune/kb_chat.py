"""Chatting with a knowledge base: a LangChain chain that answers from retrieved passages and names its sources.

    question + history --condense--> standalone question --retrieve--> passages --fit--> numbered context --> answer
                        (LLM; only      (+ the raw question as          (the          (what fits in --max_length
                         with history)   typed, see below)               retriever)     beside the answer)

* Condensing: a follow-up ("那病假呢？") means nothing to a retriever on its own, so with a history the model first
  rewrites it into a standalone question from the last few turns. The retrieval query is that standalone question
  followed by the follow-up exactly as typed: a small model can condense badly (drop the keyword, answer instead of
  rewrite), and BM25 still finds the user's own words in the second half.
* Answering: the QA prompt holds the numbered passages [1], [2], ... and the standalone question (not the history:
  the condensed question carries what the history contributed, and the context needs the room). It asks for a
  concise answer from the passages only, citing them as [n], and for 根据已知信息无法回答该问题 when they do not hold
  the answer.
* Budget: passages are added best first while the prompt stays within the model's max_length minus the room kept
  for the answer (max_new_tokens, at most half of max_length), counted with the model's tokenizer when it has one
  (ChatGLM does), else in characters; passages that do not fit are left out, and the sources list only those sent.

`build_chain` takes any LangChain chat model and retriever; the apps use ChatGLM and a KnowledgeBaseRetriever.
"""

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from operator import itemgetter

from glm_tune.arguments import add_model_arguments, add_sampling_arguments
from glm_tune.errors import UserError
from glm_tune.retrieval import MODES
from glm_tune.terminal_chat import terminal_chat

NO_ANSWER = "根据已知信息无法回答该问题"
HISTORY_TURNS = 3  # the turns the condense prompt sees: enough to resolve "it" / "那…呢", short enough to fit
HISTORY_ANSWER_CHARS = 300  # of each past answer in the condense prompt
PROMPT_MARGIN = 8  # tokens for what the chat model adds around the prompt ([gMASK] <sop>, round markers)

CONDENSE_TEMPLATE = """下面是用户与助手之前的对话，以及用户刚提出的后续问题。请结合对话内容，把后续问题改写成一个完整、独立的问题，\
使人不看对话也能明白它问的是什么（补全其中指代的人、物和主题）。只输出改写后的问题本身，不要回答，也不要解释。

对话记录：
{chat_history}

后续问题：{question}
独立问题："""

QA_TEMPLATE = """你是一个严谨的知识库问答助手。下面是从知识库中检索到的已知信息，每段前有编号。
请只依据这些已知信息，简洁、准确地回答用户的问题，并在用到某段信息的句子后用方括号标出它的编号，例如 [1]。
如果已知信息中没有答案，请直接回答“根据已知信息无法回答该问题”，不要编造，也不要使用已知信息以外的知识。请用提问所用的语言作答。

已知信息：
{context}

问题：{question}"""


def condense_prompt():
    from langchain_core.prompts import ChatPromptTemplate

    return ChatPromptTemplate.from_messages([("human", CONDENSE_TEMPLATE)])


def qa_prompt():
    from langchain_core.prompts import ChatPromptTemplate

    return ChatPromptTemplate.from_messages([("human", QA_TEMPLATE)])


# ----------------------------------------------------------------------------------------------------------------------
# The steps


def format_history(history, turns=HISTORY_TURNS, answer_chars=HISTORY_ANSWER_CHARS):
    """The last `turns` (question, answer) pairs as 用户：… / 助手：… lines for the condense prompt."""
    lines = []
    for question, answer in list(history)[-turns:]:
        answer = answer if len(answer) <= answer_chars else answer[:answer_chars] + "…"
        lines += [f"用户：{question}", f"助手：{answer}"]
    return "\n".join(lines)


def clean_standalone(text, question):
    """The model's rewrite, without a label it may repeat ("独立问题：") or lines after the first; the question as
    typed when nothing usable is left."""
    text = (text or "").strip()
    for label in ("独立问题：", "独立问题:", "改写后的问题：", "问题：", "Standalone question:"):
        text = text.removeprefix(label).strip()
    first = text.splitlines()[0].strip() if text else ""
    return first or question


def retrieval_query(standalone, question):
    """What the retriever is asked: the standalone question, then the question as typed when it differs (so that a
    poor rewrite cannot lose the user's keywords)."""
    standalone, question = standalone.strip(), question.strip()
    return standalone if standalone == question else f"{standalone}\n{question}"


def format_context(documents):
    """Numbered passages, each headed by its source file: `[1]（来源：hr/leave.md）` then the text."""
    return "\n\n".join(f"[{i}]（来源：{doc.metadata.get('source', '?')}）\n{doc.page_content.strip()}"
                       for i, doc in enumerate(documents, start=1))


def document_source(doc):
    """A retrieved Document as an answer's source: {source, chunk, score, text}."""
    metadata = doc.metadata
    score = metadata.get("score")
    return {"source": str(metadata.get("source", "?")), "chunk": int(metadata.get("chunk", 0)),
            "score": float(score) if score is not None else 0.0, "text": doc.page_content}


def token_counter(llm):
    """llm.get_num_tokens when the model counts with its own tokenizer (ChatGLM does), else len (characters):
    LangChain's fallback tokenizer is GPT-2's, which would have to be downloaded and counts Chinese badly."""
    from langchain_core.language_models import BaseLanguageModel

    cls = type(llm)
    own = (cls.get_token_ids is not BaseLanguageModel.get_token_ids
           or cls.get_num_tokens is not BaseLanguageModel.get_num_tokens)
    return llm.get_num_tokens if own else len


class ContextBudget:
    """Chooses the passages that fit in the QA prompt (see the module docstring)."""

    def __init__(self, llm, max_length=None, max_new_tokens=None):
        self.count = token_counter(llm)
        self.total = max_length or getattr(llm, "max_length", None)
        reserve = max_new_tokens or getattr(llm, "max_new_tokens", None) or 0
        self.reserve = min(reserve, self.total // 2) if self.total else 0

    def fit(self, documents, question):
        documents = list(documents)
        if not self.total:
            return documents
        room = self.total - self.reserve - PROMPT_MARGIN - self.count(QA_TEMPLATE.format(context="",
                                                                                          question=question))
        used = []
        for doc in documents:  # best first; one that does not fit is left out, a later shorter one may still fit
            if self.count(format_context(used + [doc])) <= room:
                used.append(doc)
        if documents and not used:
            print(f"warning: no retrieved passage fits in max_length {self.total} beside the answer; raise "
                  "--max_length or lower --chunk_size", file=sys.stderr, flush=True)
        return used


def build_chain(llm, retriever, max_length=None, max_new_tokens=None):
    """The conversational QA chain (LCEL). Input {"question": str, "chat_history": [(question, answer), ...]};
    output (also streamed key by key, the answer token by token) {..., "standalone_question", "retrieval_query",
    "documents" (retrieved), "context_documents" (those in the prompt, numbered [1]...), "context", "answer"}.
    `max_length` / `max_new_tokens` default to the model's own settings (see ContextBudget)."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.runnables import RunnableBranch, RunnableLambda, RunnablePassthrough

    budget = ContextBudget(llm, max_length, max_new_tokens)
    condense = RunnableBranch(
        (lambda x: bool(x.get("chat_history")),
         RunnablePassthrough.assign(chat_history=lambda x: format_history(x["chat_history"]))
         | condense_prompt() | llm | StrOutputParser()),
        RunnableLambda(lambda x: ""),  # a first question is standalone already: no model call
    )
    answer = {"context": itemgetter("context"), "question": itemgetter("standalone_question")} | qa_prompt() | llm \
        | StrOutputParser()
    return (
        RunnablePassthrough.assign(condensed=condense).with_config(run_name="condense_question")
        | RunnablePassthrough.assign(standalone_question=lambda x: clean_standalone(x["condensed"], x["question"]))
        | RunnablePassthrough.assign(retrieval_query=lambda x: retrieval_query(x["standalone_question"],
                                                                               x["question"]))
        | RunnablePassthrough.assign(documents=itemgetter("retrieval_query") | retriever)
        | RunnablePassthrough.assign(context_documents=lambda x: budget.fit(x["documents"], x["standalone_question"]))
        | RunnablePassthrough.assign(context=lambda x: format_context(x["context_documents"]))
        | RunnablePassthrough.assign(answer=answer)
    ).with_config(run_name="knowledge_base_chat")


@dataclass
class KBAnswer:
    question: str
    standalone_question: str
    answer: str
    sources: list  # [{source, chunk, score, text}], numbered [1]... in the order of the prompt

    def as_json(self):
        return {"answer": self.answer, "sources": self.sources}


def ask(chain, question, history=(), on_token=None, config=None):
    """Run the chain on one question; `on_token(text)` gets the answer as it streams. -> KBAnswer."""
    result = None
    for chunk in chain.stream({"question": question, "chat_history": list(history)}, config=config):
        if on_token and chunk.get("answer"):
            on_token(chunk["answer"])
        result = chunk if result is None else result + chunk  # AddableDicts: strings concatenate
    return KBAnswer(question=question, standalone_question=result["standalone_question"],
                    answer=result.get("answer", "").strip(),
                    sources=[document_source(d) for d in result["context_documents"]])


def format_sources(sources):
    """The sources list printed under an answer."""
    if not sources:
        return "来源：（无：知识库中没有找到相关内容）"
    lines = [f"[{i}] {s['source']} #{s['chunk']} (score {s['score']:.4f})" for i, s in enumerate(sources, start=1)]
    return "来源：\n" + "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Command line (APP_example/chat_langchain/kb_chat.py and app.py)


def add_kb_chat_arguments(parser):
    """The flags kb_chat.py and the web page share: the index, retrieval, the model and its sampling."""
    parser.add_argument("--index_dir", default=None,
                        help="the knowledge-base index (build_kb.py --index_dir). Default: the shipped sample "
                             "knowledge base, indexed into the glm-tune cache on first use")
    parser.add_argument("--retriever", default="hybrid", choices=MODES,
                        help="ranking: hybrid = BM25 over jieba words fused with dense embeddings (best for Chinese "
                             "with the default English embedder), dense or bm25 alone (default: %(default)s)")
    parser.add_argument("--k", type=int, default=4, help="passages retrieved per question (default: %(default)s)")
    add_model_arguments(parser)
    parser.add_argument("--max_new_tokens", type=int, default=512,
                        help="most tokens per answer (default: %(default)s)")
    add_sampling_arguments(parser, do_sample=True, max_length=True)


def check_args(args):
    if args.k < 1:
        raise UserError(f"--k {args.k}: must be at least 1")
    if args.max_new_tokens < 1 or args.max_length < 2:
        raise UserError("need --max_new_tokens >= 1 and --max_length >= 2")
    if not 0 <= args.temperature <= 2 or not 0 < args.top_p <= 1:
        raise UserError("need 0 <= --temperature <= 2 and 0 < --top_p <= 1")


def open_knowledge_base(index_dir, progress=True):
    """The KnowledgeBase at `index_dir`; None: the sample knowledge base, built (or synced) first."""
    from glm_tune.knowledge_base import KnowledgeBase, ensure_sample_index

    return KnowledgeBase.open(index_dir if index_dir else ensure_sample_index(progress=progress))


def chat_model_settings(args):
    """ChatGLM's constructor arguments from the command line (temperature 0 means greedy)."""
    return dict(model_name_or_path=args.model_name_or_path, lora_path=args.lora_path, revision=args.revision,
                dtype=args.dtype, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                do_sample=args.do_sample and args.temperature > 0, temperature=args.temperature, top_p=args.top_p)


def make_chat_model(args):
    """ChatGLM with the command line's checkpoint, adapter and sampling settings (loaded on first use)."""
    from glm_tune.chat_model import ChatGLM

    return ChatGLM(**chat_model_settings(args))


def build_parser(description=None):
    from glm_tune.knowledge_base import SAMPLE_QUESTION

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kb_chat_arguments(parser)
    parser.add_argument("--question", default=None,
                        help="answer this one question and exit. Without it: a chat when stdin is a terminal (or "
                             f"with --interactive), else the sample question ({SAMPLE_QUESTION})")
    parser.add_argument("--interactive", action="store_true",
                        help="chat (one question per line, with history) even when stdin is not a terminal")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object {"answer", "sources": [{source, chunk, score, text}]} on stdout '
                             "and nothing else (a single question only)")
    return parser


def run(args, stdin=None, out=None):
    """kb_chat.py's work once its flags are parsed."""
    from glm_tune.knowledge_base import SAMPLE_QUESTION

    stdin, out = stdin or sys.stdin, out or sys.stdout
    check_args(args)
    if args.json and args.interactive:
        raise UserError("--json answers a single question: give --question instead of --interactive")
    interactive = args.question is None and not args.json and (args.interactive or stdin.isatty())
    if args.json:  # nothing but the JSON object on stdout, whatever a library prints
        with contextlib.redirect_stdout(sys.stderr):
            answer = _single_answer(args, args.question or SAMPLE_QUESTION, out=None)
        out.write(json.dumps(answer.as_json(), ensure_ascii=False) + "\n")
        return answer
    if interactive:
        return chat_loop(_chain(args), stdin, out)
    if args.question is None:
        out.write(f"问：{SAMPLE_QUESTION}\n")
    return _single_answer(args, args.question or SAMPLE_QUESTION, out)


def _chain(args):
    knowledge_base = open_knowledge_base(args.index_dir)  # before the model: a missing index fails fast
    return build_chain(make_chat_model(args), knowledge_base.retriever(args.k, args.retriever))


def _single_answer(args, question, out):
    chain = _chain(args)
    if out is None:
        return ask(chain, question)
    answer = ask(chain, question, on_token=_writer(out))
    out.write("\n\n" + format_sources(answer.sources) + "\n")
    return answer


def _writer(out):
    def write(text):
        out.write(text)
        out.flush()

    return write


BANNER = "知识库问答：输入问题后回车；'clear' 开始新对话，'stop'（或 Ctrl-D）退出。"


def chat_loop(chain, stdin, out):
    """The terminal chat: each answer streams in, followed by its sources; follow-ups are condensed with the
    history. -> the history [(question, answer)]."""
    def reply(question, history):
        answer = ask(chain, question, history, on_token=_writer(out))
        out.write("\n\n" + format_sources(answer.sources) + "\n")
        return [*history, (question, answer.answer)]

    return terminal_chat(stdin, out, BANNER, reply, speaker="助手")
