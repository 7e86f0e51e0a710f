"""ChatGLM as a LangChain chat model: the in-repo ChatGLM (base checkpoint + optional LoRA adapter) behind
langchain_core's BaseChatModel, so the apps' chains, agents and users' own LangChain code all talk to it alike.

    llm = ChatGLM(model_name_or_path="THUDM/chatglm-6b", lora_path="output", do_sample=False)
    llm.invoke("你好")                                  # an AIMessage
    for chunk in llm.stream([SystemMessage(...), HumanMessage(...)]): print(chunk.content, end="")

Messages become ChatGLM's round prompt: each human message with the AI answer after it is a past round, the last
human message is the open question, and system text goes in front of the first question (ChatGLM-6B has no system
role). Stop sequences end generation as soon as they appear and are cut from the answer. Streamed tokens reach
LangChain callbacks (`on_llm_new_token`), and the streamed chunks add up to exactly what invoke() returns for the
same settings. A checkpoint + adapter is loaded once per process and shared by every ChatGLM that names it.
"""

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, PrivateAttr
from transformers import StoppingCriteria, StoppingCriteriaList

from glm_tune.arguments import MAX_LENGTH, TEMPERATURE, TOP_P
from glm_tune.errors import UserError
from glm_tune.generation import input_device
from modeling_chatglm import _FULL_WIDTH, build_chat_prompt, clean_response


@dataclass
class LoadedChatGLM:
    """A model with its tokenizer, and the lock that makes one generation at a time run on it (web servers call
    from many threads)."""

    model: Any
    tokenizer: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


_LOADED = {}
_LOADING = threading.Lock()


def load_chatglm(model_name_or_path=None, lora_path=None, dtype="auto", revision=None):
    """The (cached) LoadedChatGLM for this checkpoint, adapter and dtype: loaded on first use, then shared."""
    from glm_tune.loading import load_model_and_tokenizer, resolve_model_path

    folder = resolve_model_path(model_name_or_path, revision)
    key = (str(folder), str(Path(lora_path).resolve()) if lora_path else None, str(dtype))
    with _LOADING:
        if key not in _LOADED:
            model, tokenizer = load_model_and_tokenizer(folder, lora_path, dtype=dtype, pack_for_cpu=True)
            _LOADED[key] = LoadedChatGLM(model, tokenizer)
        return _LOADED[key]


def messages_to_prompt(messages):
    """ChatGLM's prompt for a LangChain message list (see the module docstring); ValueError for what it cannot say."""
    system, rounds, question = [], [], []
    for message in messages:
        text = message.text
        if isinstance(message, SystemMessage):
            system.append(text)
        elif isinstance(message, HumanMessage):
            question.append(text)
        elif isinstance(message, AIMessage):
            if question:
                rounds.append([question, text])
                question = []
            elif rounds:  # a second AI message in a row continues the last answer
                rounds[-1][1] += "\n" + text
            else:
                raise ValueError("ChatGLM: an AI message must follow a human message")
        else:
            raise ValueError(f"ChatGLM takes system, human and AI messages, not {message.type!r} ones")
    if not question:
        raise ValueError("ChatGLM: the last message must be a human message (the question to answer)")
    history = [("\n".join(q), a) for q, a in rounds]
    query = "\n".join(question)
    if system:
        preamble = "\n".join(system) + "\n\n"
        if history:
            history[0] = (preamble + history[0][0], history[0][1])
        else:
            query = preamble + query
    return build_chat_prompt(query, history)


def cut_at_stop(text, stops):
    """(text before the first stop sequence, whether one was found)."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


def settled_text(text, stops):
    """What of a growing answer can be shown already: its final form (clean_response) without the trailing
    characters that may still change: the start of a stop sequence, an unfinished UTF-8 character (decoded as
    U+FFFD), whitespace (trimmed at the end) and ASCII punctuation (made full-width when a Chinese character
    follows). Each settled text is a prefix of the next and of the final answer."""
    hold = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return clean_response(text[: len(text) - hold].rstrip("\ufffd" + "".join(_FULL_WIDTH) + " \t\r\n"))


class StopOnStrings(StoppingCriteria):
    """Ends generate() once the answer holds one of `stops` (only the tail is decoded each step)."""

    def __init__(self, tokenizer, prompt_length, stops):
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, list(stops)
        self.window = 4 * max(len(s) for s in self.stops) + 8  # tokens: a byte-fallback character takes up to 4

    def __call__(self, input_ids, scores, **kwargs):
        done = []
        for row in input_ids:
            tail = row[max(self.prompt_length, len(row) - self.window):]
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            done.append(any(s in text for s in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class ChatGLM(BaseChatModel):
    """ChatGLM-6B (or the embedded small model) as a LangChain chat model; see the module docstring.

    model_name_or_path: a chatglm-6b folder or Hugging Face repo id; None = the embedded small demo model.
    lora_path: a PEFT adapter folder, or a folder with / path of the seed's chatglm-lora.pt.
    max_length bounds prompt + answer in tokens (like the official chat()); max_new_tokens the answer alone.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model_name_or_path: str | None = None
    lora_path: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    max_new_tokens: int = 512
    max_length: int = MAX_LENGTH
    do_sample: bool = True
    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    repetition_penalty: float = 1.0
    stop: list[str] | None = None

    _loaded: LoadedChatGLM | None = PrivateAttr(default=None)

    @classmethod
    def from_model(cls, model, tokenizer, **settings):
        """A ChatGLM over a model already in memory (e.g. one a web page loaded), instead of loading one."""
        llm = cls(**settings)
        llm._loaded = LoadedChatGLM(model, tokenizer)
        return llm

    @property
    def _llm_type(self):
        return "chatglm"

    @property
    def _identifying_params(self):
        return {"model_name_or_path": self.model_name_or_path, "lora_path": self.lora_path, "dtype": self.dtype,
                **self._settings()}

    def _settings(self):
        sampling = dict(temperature=self.temperature, top_p=self.top_p) if self.do_sample else {}
        return dict(do_sample=self.do_sample, repetition_penalty=self.repetition_penalty, **sampling)

    def load(self):
        """The model and tokenizer (loaded on first use, shared with every ChatGLM naming the same ones)."""
        if self._loaded is None:
            self._loaded = load_chatglm(self.model_name_or_path, self.lora_path, self.dtype, self.revision)
        return self._loaded

    def get_token_ids(self, text):
        """ChatGLM's own token ids (LangChain's default would fetch GPT-2's tokenizer)."""
        return self.load().tokenizer.encode(text, add_special_tokens=False)

    def _prepare(self, messages, stop, **kwargs):
        loaded = self.load()
        prompt = messages_to_prompt(messages)
        inputs = loaded.tokenizer([prompt], return_tensors="pt").to(input_device(loaded.model))
        n_prompt = inputs["input_ids"].shape[1]
        room = self.max_length - n_prompt
        if room < 1:
            raise UserError(f"ChatGLM: the prompt is {n_prompt} tokens, max_length {self.max_length} leaves no room "
                             "for an answer (shorten the history or context, or raise max_length)")
        stops = [s for s in [*(self.stop or []), *(stop or [])] if s]
        generate_kwargs = dict(**inputs, max_new_tokens=min(self.max_new_tokens, room), **self._settings())
        generate_kwargs.update(kwargs)
        if stops:
            generate_kwargs["stopping_criteria"] = StoppingCriteriaList(
                [StopOnStrings(loaded.tokenizer, n_prompt, stops)])
        return loaded, generate_kwargs, n_prompt, stops

    def _finish(self, tokenizer, answer_ids, n_prompt, stops):
        """(final answer text, its generation info and token usage)."""
        raw = tokenizer.decode(answer_ids, skip_special_tokens=True)
        text, stopped = cut_at_stop(raw, stops)
        ended = bool(answer_ids) and answer_ids[-1] in _eos_ids(tokenizer)
        usage = {"input_tokens": n_prompt, "output_tokens": len(answer_ids),
                 "total_tokens": n_prompt + len(answer_ids)}
        return clean_response(text), {"finish_reason": "stop" if stopped or ended else "length"}, usage

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        loaded, generate_kwargs, n_prompt, stops = self._prepare(messages, stop, **kwargs)
        with loaded.lock, torch.inference_mode():
            output = loaded.model.generate(**generate_kwargs)
        answer_ids = output[0, n_prompt:].tolist()
        answer_ids = answer_ids[: _end_of_answer(answer_ids, loaded.tokenizer)]
        text, info, usage = self._finish(loaded.tokenizer, answer_ids, n_prompt, stops)
        message = AIMessage(content=text, usage_metadata=usage, response_metadata=info)
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])

    def _stream(self, messages, stop=None, run_manager=None, **kwargs) -> Iterator[ChatGenerationChunk]:
        loaded, generate_kwargs, n_prompt, stops = self._prepare(messages, stop, **kwargs)
        tokenizer, answer_ids, shown = loaded.tokenizer, [], ""
        with loaded.lock:
            for tokens in loaded.model._stream_tokens(**generate_kwargs):
                answer_ids.append(int(tokens[0]))
                text, stopped = cut_at_stop(tokenizer.decode(answer_ids, skip_special_tokens=True), stops)
                if stopped:
                    break  # closing the stream stops generate()
                settled = settled_text(text, stops)
                if len(settled) > len(shown) and settled.startswith(shown):
                    yield self._chunk(settled[len(shown):], run_manager)
                    shown = settled
        text, info, usage = self._finish(tokenizer, answer_ids[: _end_of_answer(answer_ids, tokenizer)], n_prompt,
                                         stops)
        rest = text[len(shown):] if text.startswith(shown) else ""
        yield self._chunk(rest, run_manager, usage_metadata=usage, response_metadata=info)

    @staticmethod
    def _chunk(text, run_manager, **extra):
        chunk = ChatGenerationChunk(message=AIMessageChunk(content=text, **extra))
        if run_manager and text:
            run_manager.on_llm_new_token(text, chunk=chunk)
        return chunk


def _eos_ids(tokenizer):
    return {tokenizer.eos_token_id}


def _end_of_answer(answer_ids, tokenizer):
    """How many of the generated ids belong to the answer: up to and including the first end token."""
    for i, token in enumerate(answer_ids):
        if token in _eos_ids(tokenizer):
            return i + 1
    return len(answer_ids)


def greedy_chatglm(max_new_tokens, model_name_or_path=None, revision=None, lora_path=None, dtype="auto"):
    """A ChatGLM that decodes greedily, so that the same input always gives the same answer: what the apps' planning
    and rewriting stages use (a rerun of a pipeline then finds its earlier stages unchanged)."""
    return ChatGLM(model_name_or_path=model_name_or_path, revision=revision, lora_path=lora_path, dtype=dtype,
                   do_sample=False, max_new_tokens=max_new_tokens)
