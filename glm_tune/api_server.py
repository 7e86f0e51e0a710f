"""The OpenAI-compatible HTTP API (FastAPI) over a BatchEngine: /v1/chat/completions, /v1/completions, /v1/models,
the official ChatGLM `POST /` ({prompt, history}) and /health. Errors are OpenAI's error JSON."""

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from glm_tune.atomic import append_bytes
from glm_tune.chat_model import cut_at_stop, settled_text
from glm_tune.serving import BASE, QueueFull, Request, SamplingParams, ShuttingDown
from modeling_chatglm import build_chat_prompt, clean_response


class ApiError(Exception):
    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status, message, type_="invalid_request_error", param=None, code=None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Any = None


class GenerationBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields we do not use (presence_penalty, user, ...) are accepted
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever the model says


class ChatBody(GenerationBody):
    messages: list[ChatMessage]


class CompletionBody(GenerationBody):
    prompt: str | list[str]


class OfficialBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str
    history: list[list[str]] | None = None
    max_length: int | None = None
    top_p: float | None = None
    temperature: float | None = None


def message_text(message):
    """A message's text: a string, or OpenAI's content parts [{type: text, text}]."""
    if isinstance(message.content, str):
        return message.content
    if isinstance(message.content, list):
        return "".join(p.get("text", "") for p in message.content if isinstance(p, dict) and p.get("type") == "text")
    if message.content is None:
        return ""
    raise ApiError(400, "messages: content must be a string or a list of text parts", param="messages")


def chat_prompt(messages):
    """ChatGLM's round prompt for OpenAI role messages (system / user / assistant), via messages_to_prompt."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    kinds = {"system": SystemMessage, "developer": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    converted = []
    for message in messages:
        if message.role not in kinds:
            raise ApiError(400, f"messages: role {message.role!r} is not supported (system, user, assistant)",
                           param="messages")
        converted.append(kinds[message.role](content=message_text(message)))
    from glm_tune.chat_model import messages_to_prompt

    try:
        return messages_to_prompt(converted)
    except ValueError as err:
        raise ApiError(400, f"messages: {err}", param="messages") from None


class Service:
    """What the routes share: the engine (None while loading), model names, defaults, the request log."""

    def __init__(self, base_name, adapter_names=(), max_length=2048, temperature=0.95, top_p=0.7,
                 request_timeout=600.0, request_log=None, api_key=None):
        self.engine, self.tokenizer, self.load_error = None, None, None
        self.base_name, self.adapter_names = base_name, list(adapter_names)
        self.max_length, self.temperature, self.top_p = max_length, temperature, top_p
        self.request_timeout, self.api_key = request_timeout, api_key
        self.request_log = Path(request_log) if request_log else None
        self.draining = False
        self.in_flight = 0  # responses begun and not finished (a stream counts until its [DONE] is sent)

    def ready(self, engine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer

    def adapter_for(self, model):
        if model in (None, self.base_name):
            return BASE, self.base_name
        if model in self.adapter_names:
            return model, model
        raise ApiError(404, f"The model `{model}` does not exist; GET /v1/models lists the served models",
                       param="model", code="model_not_found")

    def log(self, request, model, n_in, status="ok"):
        if self.request_log is None:
            return
        ttft = None if request.first_token_at is None else request.first_token_at - request.arrived
        end = request.finished_at or time.monotonic()
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model, "tokens_in": n_in,
                  "tokens_out": len(request.output_ids), "latency_s": round(end - request.arrived, 4),
                  "ttft_s": None if ttft is None else round(ttft, 4), "finish_reason": request.finish_reason,
                  "status": status}
        append_bytes(self.request_log, (json.dumps(record) + "\n").encode())


class Generation:
    """One request's run through the engine, seen from the event loop: an asyncio queue of its events, and the
    growing answer text (stop strings cut, clean_response applied the way chat() does)."""

    def __init__(self, service, prompt, body, adapter):
        self.service, self.tokenizer = service, service.tokenizer
        self.prompt_ids = self.tokenizer(prompt)["input_ids"]
        n = len(self.prompt_ids)
        room = service.max_length - n
        if room < 1:
            raise ApiError(413, f"This model's maximum context length is {service.max_length} tokens; the prompt is "
                                f"{n} tokens, which leaves no room for an answer", param="messages",
                           code="context_length_exceeded")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
        temperature = service.temperature if body.temperature is None else body.temperature
        top_p = service.top_p if body.top_p is None else body.top_p
        if not 0 <= temperature <= 2 or not 0 < top_p <= 1:
            raise ApiError(400, "temperature must lie in [0, 2] and top_p in (0, 1]", param="temperature")
        self.stops = [s for s in ([body.stop] if isinstance(body.stop, str) else body.stop or []) if s]
        params = SamplingParams(max_new_tokens=min(max_tokens or room, room), temperature=temperature, top_p=top_p,
                                stop=self.stops, seed=body.seed, ignore_eos=body.ignore_eos)
        self.loop = asyncio.get_running_loop()
        self.events = asyncio.Queue()
        self.request = Request(self.prompt_ids, params, adapter,
                               emit=lambda e: self.loop.call_soon_threadsafe(self.events.put_nowait, e),
                               timeout=service.request_timeout)
        self.shown = ""

    def submit(self):
        if self.service.draining:
            raise ApiError(503, "The server is shutting down", type_="server_error", code="shutting_down")
        try:
            self.service.engine.submit(self.request)
        except QueueFull as err:
            raise ApiError(429, str(err), type_="rate_limit_error", code="queue_full") from None
        except ShuttingDown as err:
            raise ApiError(503, str(err), type_="server_error", code="shutting_down") from None

    def answer_ids(self):
        ids = self.request.output_ids
        return ids[:-1] if ids and ids[-1] == self.tokenizer.eos_token_id and self.request.finish_reason == "stop" \
            else ids

    async def deltas(self):
        """Yields new settled text as tokens come; ends with (rest of the final text). Raises ApiError(504/500)."""
        while True:
            kind, value = await self.events.get()
            if kind == "token":
                text, _ = cut_at_stop(self.tokenizer.decode(self.answer_ids(), skip_special_tokens=True), self.stops)
                settled = settled_text(text, self.stops)
                if len(settled) > len(self.shown) and settled.startswith(self.shown):
                    yield settled[len(self.shown):]
                    self.shown = settled
            elif kind == "error":
                code = 504 if value.startswith("timeout") else 500
                raise ApiError(code, value, type_="server_error", code="timeout" if code == 504 else None)
            else:
                final = self.final_text()
                if final.startswith(self.shown) and len(final) > len(self.shown):
                    yield final[len(self.shown):]
                return

    def final_text(self):
        text, _ = cut_at_stop(self.tokenizer.decode(self.answer_ids(), skip_special_tokens=True), self.stops)
        return clean_response(text)

    @property
    def finish_reason(self):
        return "stop" if self.request.finish_reason == "stop" else "length"

    def usage(self):
        n_in, n_out = len(self.prompt_ids), len(self.request.output_ids)
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def sse(data):
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(service):
    app = FastAPI(title="glm-tune OpenAI-compatible API")
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(_, err):
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, err):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, "The request body is not valid JSON", code="invalid_json")
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)

    @app.middleware("http")
    async def check_ready_and_key(request, call_next):
        if request.url.path != "/health":
            if service.api_key and request.headers.get("authorization", "") != f"Bearer {service.api_key}":
                return error_response(401, "Incorrect or missing API key (Authorization: Bearer <key>)",
                                      code="invalid_api_key")
            if service.engine is None:
                return error_response(503, "The model is still loading; retry shortly", "server_error",
                                      code="loading")
        return await call_next(request)

    @app.get("/health")
    async def health():
        if service.load_error:
            return JSONResponse({"status": "error", "error": service.load_error}, status_code=503)
        if service.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if service.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        running, waiting = service.engine.load()
        return {"status": "ok", "running": running, "waiting": waiting}

    @app.get("/v1/models")
    async def models():
        names = [service.base_name, *service.adapter_names]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "glm-tune"}
                                           for n in names]}

    async def run(body, prompt, http, chat):
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        adapter, model_name = service.adapter_for(body.model)
        generation = Generation(service, prompt, body, adapter)
        generation.submit()
        created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        kind = "chat.completion" if chat else "text_completion"
        service.in_flight += 1
        if body.stream:
            return StreamingResponse(counted(stream(generation, body, model_name, created, rid, kind, chat)),
                                     media_type="text/event-stream")
        try:
            async for _ in generation.deltas():
                if await http.is_disconnected():
                    generation.request.cancel()
                    break
        except ApiError:
            service.log(generation.request, model_name, len(generation.prompt_ids), status="error")
            raise
        finally:
            generation.request.cancel()  # a no-op once finished; frees the row if the handler was cancelled
            service.in_flight -= 1
        service.log(generation.request, model_name, len(generation.prompt_ids))
        text = generation.final_text()
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = generation.finish_reason
        return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice],
                "usage": generation.usage()}

    async def counted(chunks):
        """`chunks`, counted in service.in_flight until the last one is sent (a draining server waits for it)."""
        try:
            async for piece in chunks:
                yield piece
        finally:
            service.in_flight -= 1

    async def stream(generation, body, model_name, created, rid, kind, chat):
        head = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created, "model": model_name}

        def chunk(text=None, finish=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            return sse({**head, "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                             "finish_reason": finish}]})

        status = "ok"
        try:
            if chat:
                yield chunk(role=True)
            async for text in generation.deltas():
                yield chunk(text)
            yield chunk(finish=generation.finish_reason)
            if (body.stream_options or {}).get("include_usage"):
                yield sse({**head, "choices": [], "usage": generation.usage()})
        except ApiError as err:
            status = "error"
            yield sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})
        except BaseException:  # the client went away (the response task was cancelled)
            status = "disconnected"
            raise
        finally:
            generation.request.cancel()
            service.log(generation.request, model_name, len(generation.prompt_ids), status=status)
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HttpRequest):
        return await run(body, chat_prompt(body.messages), http, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: give one prompt (a string)", param="prompt")
        return await run(body, prompts[0], http, chat=False)

    @app.post("/")
    async def official(body: OfficialBody, http: HttpRequest):
        """The official ChatGLM-6B api.py: {prompt, history, max_length, top_p, temperature}."""
        history = [tuple(turn) for turn in body.history or []]
        if any(len(turn) != 2 for turn in history):
            raise ApiError(400, "history: a list of [question, answer] pairs", param="history")
        prompt = build_chat_prompt(body.prompt, history)
        settings = GenerationBody(temperature=body.temperature, top_p=body.top_p)
        if body.max_length is not None:
            settings.max_tokens = max(1, body.max_length - len(service.tokenizer(prompt)["input_ids"]))
        result = await run(settings, prompt, http, chat=True)
        response = result["choices"][0]["message"]["content"]
        return {"response": response, "history": [list(t) for t in history] + [[body.prompt, response]],
                "status": 200, "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    return app


def load_in_background(service, load):
    """Run `load()` -> (engine, tokenizer) in a thread; /health answers 503 until it is done."""

    def run():
        try:
            service.ready(*load())
        except Exception as err:  # shown by /health and on stderr
            service.load_error = f"{type(err).__name__}: {err}"
            print(f"error: loading the model failed: {service.load_error}", flush=True)

    thread = threading.Thread(target=run, name="model-loader", daemon=True)
    thread.start()
    return thread
