"""ChatGLM as a LangChain chat model (glm_tune.chat_model): the prompt it builds from messages, answers equal to the
model's own chat(), streaming through callbacks equal to invoke(), stop sequences, the adapter, one load per model.
Exactness is an fp32 claim: these pin dtype fp32 and greedy decoding."""

import pytest
import torch
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from glm_tune.chat_model import ChatGLM, cut_at_stop, messages_to_prompt, settled_text
from glm_tune.loading import load_model_and_tokenizer
from modeling_chatglm import build_chat_prompt, clean_response

QUESTIONS = ["你好", "Translate 苹果 into English.", "ok"]


class Recorder(BaseCallbackHandler):
    def __init__(self):
        self.tokens, self.prompts = [], []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)

    def on_chat_model_start(self, serialized, messages, **kwargs):
        self.prompts.append(messages)


@pytest.fixture(scope="module")
def base():
    return load_model_and_tokenizer(dtype="fp32")


@pytest.fixture(scope="module")
def adapter(make_adapter):
    return make_adapter(seed=1)


def llm(**settings):
    return ChatGLM(dtype="fp32", do_sample=False, **settings)


def test_messages_become_chatglm_rounds():
    assert messages_to_prompt([HumanMessage("你好")]) == "你好"
    history = [SystemMessage("Be brief."), HumanMessage("q1"), AIMessage("a1"), HumanMessage("q2"), AIMessage("a2"),
               HumanMessage("q3"), HumanMessage("more")]
    assert messages_to_prompt(history) == build_chat_prompt("q3\nmore", [("Be brief.\n\nq1", "a1"), ("q2", "a2")])
    assert messages_to_prompt([SystemMessage("S"), HumanMessage("q")]) == "S\n\nq"
    for bad, why in [([AIMessage("a")], "must follow a human"), ([HumanMessage("q"), AIMessage("a")], "last message"),
                     ([HumanMessage("q"), ToolMessage("x", tool_call_id="1")], "not 'tool'")]:
        with pytest.raises(ValueError, match=why):
            messages_to_prompt(bad)


@pytest.mark.parametrize("question", QUESTIONS)
def test_invoke_equals_the_models_own_chat(base, question):
    model, tokenizer = base
    history = [("hi", "hello")]
    want, _ = model.chat(tokenizer, question, history, max_length=60, do_sample=False)
    answer = llm(max_length=60).invoke([HumanMessage("hi"), AIMessage("hello"), HumanMessage(question)])
    assert answer.content == want
    n_prompt = len(tokenizer(build_chat_prompt(question, history))["input_ids"])
    assert answer.usage_metadata["input_tokens"] == n_prompt
    assert answer.usage_metadata["output_tokens"] <= 60 - n_prompt


@pytest.mark.parametrize("question", QUESTIONS)
def test_stream_reaches_callbacks_token_by_token_and_equals_invoke(question):
    model = llm(max_new_tokens=40)
    recorder = Recorder()
    chunks = [c.content for c in model.stream(question, config={"callbacks": [recorder]})]
    whole = model.invoke(question).content
    assert "".join(chunks) == whole and len(whole) > 0
    assert "".join(recorder.tokens) == whole
    assert len(recorder.tokens) > 3  # token by token, not one block at the end
    assert recorder.prompts[0][0][0].content == question  # the prompt the model was sent


def test_stop_sequences_end_generation_and_are_cut(base):
    model = llm(max_new_tokens=40)
    full = model.invoke("你好")
    assert len(full.content) > 8 and full.response_metadata["finish_reason"] == "length"
    stop = full.content[4:6]
    cut = model.invoke("你好", stop=[stop])
    assert cut.content == clean_response(full.content[: full.content.find(stop)])
    assert cut.response_metadata["finish_reason"] == "stop"
    assert cut.usage_metadata["output_tokens"] < full.usage_metadata["output_tokens"]  # stopped early
    assert "".join(c.content for c in model.stream("你好", stop=[stop])) == cut.content
    assert llm(max_new_tokens=40, stop=[stop]).invoke("你好").content == cut.content  # a default stop list


def test_settled_text_only_grows_into_the_final_answer():
    stops = ["</end>", "Observation:"]
    for final in ["Hello, 世界! ok,你好 ? 好", "a Obs b </e c", "你好,\n\n世界:   x", "数字 1,000 和 2 . 3"]:
        shown = ""
        for i in range(len(final) + 1):
            settled = settled_text(final[:i], stops)
            assert settled.startswith(shown) and clean_response(final).startswith(settled), (final, i)
            shown = settled
    assert settled_text("abc Obs", stops) == "abc"  # may be the start of a stop sequence
    assert settled_text("好\ufffd", []) == "好"  # half a character
    assert cut_at_stop("x Observation: y </end>", stops) == ("x ", True)


def test_adapter_is_applied(base, adapter):
    model, tokenizer = base
    with_adapter = llm(lora_path=str(adapter), max_new_tokens=30).invoke("你好").content
    without = llm(max_new_tokens=30).invoke("你好").content
    assert with_adapter != without
    tuned, _ = load_model_and_tokenizer(lora_path=str(adapter), dtype="fp32")
    n_prompt = len(tokenizer("你好")["input_ids"])
    assert with_adapter == tuned.chat(tokenizer, "你好", max_length=n_prompt + 30, do_sample=False)[0]


def test_each_model_is_loaded_once_and_shared(adapter):
    assert llm().load() is llm(max_new_tokens=3).load()
    assert llm(lora_path=str(adapter)).load() is not llm().load()
    model, tokenizer = load_model_and_tokenizer(dtype="fp32")
    mine = ChatGLM.from_model(model, tokenizer, do_sample=False, max_new_tokens=5)
    assert mine.load().model is model


def test_token_counts_use_chatglms_tokenizer(base):
    _, tokenizer = base
    text = "ChatGLM 的分词器 counts these."
    assert llm().get_num_tokens(text) == len(tokenizer.encode(text, add_special_tokens=False))


def test_a_prompt_over_max_length_is_a_clear_error():
    with pytest.raises(ValueError, match="max_length 8 leaves no room"):
        llm(max_length=8).invoke("word " * 20)


def test_bf16_model_answers():
    """The bf16 path (the default on CPUs with native bf16): runs and streams what it returns."""
    model = ChatGLM(dtype="bf16", do_sample=False, max_new_tokens=20)
    assert next(model.load().model.parameters()).dtype == torch.bfloat16
    whole = model.invoke("你好").content
    assert whole and "".join(c.content for c in model.stream("你好")) == whole
