"""api.py, the OpenAI-compatible server, driven over HTTP by the official `openai` client and LangChain's ChatOpenAI:
greedy answers equal under streaming and under concurrent batched decoding, errors in OpenAI's format, disconnects
free their row, SIGTERM drains. The servers run a varied-weight copy of the embedded model in fp32 (the embedded
weights decode one repeated token greedily, which would make equality checks vacuous)."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test"
PROMPTS = [f"{word} question {i}" for i, word in enumerate(
    "hello weather python tea river music paper green cloud stone apple north window bread light ocean".split())]
NEW = 24


@pytest.fixture(scope="module")
def varied_checkpoint(tmp_path_factory):
    from glm_tune.loading import load_model, resolve_model_path

    source, folder = resolve_model_path(None), tmp_path_factory.mktemp("varied") / "chatglm-varied"
    shutil.copytree(source, folder)
    model = load_model(str(source), dtype="fp32")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" not in name:
                param.normal_(0, 0.2)
    for old in [*folder.glob("*.bin"), *folder.glob("*.safetensors"), *folder.glob("*.index.json")]:
        old.unlink()
    model.save_pretrained(folder)
    return folder


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint, log, *flags):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "api.py"), "--model_name_or_path", str(checkpoint), "--dtype", "fp32",
             "--port", str(self.port), "--request_log", str(log), *flags],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server did not become healthy")

    def health(self):
        return httpx.get(self.url + "/health").json()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(varied_checkpoint, tmp_path_factory):
    srv = Server(varied_checkpoint, tmp_path_factory.mktemp("log") / "requests.jsonl", "--api_key", KEY,
                 "--max_length", "256", "--max_batch_size", "16")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def chat(client, prompt, **kw):
    return client.chat.completions.create(model="chatglm-varied", messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=NEW, **kw)


def streamed(client, prompt):
    return "".join(c.choices[0].delta.content or "" for c in chat(client, prompt, stream=True) if c.choices)


def test_openai_client_chat_stream_and_models(client):
    reply = chat(client, PROMPTS[0])
    text = reply.choices[0].message.content
    assert len(text) > 5 and reply.usage.completion_tokens == NEW and reply.choices[0].finish_reason == "length"
    assert streamed(client, PROMPTS[0]) == text
    assert [m.id for m in client.models.list().data] == ["chatglm-varied"]
    completion = client.completions.create(model="chatglm-varied", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert completion.choices[0].text and completion.usage.prompt_tokens > 0


def test_langchain_chat_openai_answers_like_the_openai_client(server, client):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key=KEY, model="chatglm-varied", temperature=0,
                     max_tokens=NEW, max_retries=0)
    assert llm.invoke(PROMPTS[2]).content == chat(client, PROMPTS[2]).choices[0].message.content


def test_16_concurrent_streams_equal_their_solo_runs_and_share_forward_passes(client):
    start = time.perf_counter()
    solo = [streamed(client, p) for p in PROMPTS]
    solo_time = time.perf_counter() - start
    assert len(set(solo)) >= 8  # distinct answers, not one repeated token
    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: streamed(client, p), PROMPTS))
    batched_time = time.perf_counter() - start
    assert together == solo
    print(f"\n16 concurrent: {batched_time:.2f}s, 16 solo back to back: {solo_time:.2f}s, "
          f"ratio {batched_time / solo_time:.2f}")
    assert batched_time < 0.6 * solo_time


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    body = {"model": "chatglm-varied", "messages": [{"role": "user", "content": "tell a long story"}],
            "temperature": 0, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.health()["running"] == 1
    deadline = time.time() + 5
    while server.health()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert server.health()["running"] == 0
    time.sleep(0.2)
    last = json.loads(server.log.read_text().splitlines()[-1])
    assert last["status"] == "disconnected" and last["tokens_out"] < 200


@pytest.mark.parametrize("case, status, code", [
    ("no key", 401, "invalid_api_key"),
    ("unknown model", 404, "model_not_found"),
    ("over-long prompt", 413, "context_length_exceeded"),
    ("malformed JSON", 400, "invalid_json"),
    ("n=2", 400, None),
    ("no messages", 400, None),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, case, status, code):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = {"model": "chatglm-varied", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    if case == "no key":
        headers.pop("Authorization")
    elif case == "unknown model":
        body["model"] = "gpt-4"
    elif case == "over-long prompt":
        body["messages"][0]["content"] = "word " * 400
    elif case == "n=2":
        body["n"] = 2
    elif case == "no messages":
        del body["messages"]
    content = b'{"model": "chatglm-varied", "messages": [' if case == "malformed JSON" else json.dumps(body)
    response = httpx.post(server.url + "/v1/chat/completions", content=content, headers=headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"] == code
    assert chat(client, "still there?").choices[0].message.content


def test_official_route_answers_with_history(server):
    response = httpx.post(server.url + "/", json={"prompt": "hi", "history": [], "max_length": 40},
                          headers={"Authorization": f"Bearer {KEY}"}).json()
    assert response["status"] == 200 and response["history"] == [["hi", response["response"]]]
    assert set(response) == {"response", "history", "status", "time"}


def test_full_queue_gets_429_and_sigterm_lets_the_stream_finish_then_exits_0(varied_checkpoint, tmp_path):
    srv = Server(varied_checkpoint, tmp_path / "log.jsonl", "--max_batch_size", "1", "--max_queue", "1")
    try:
        url = srv.url + "/v1/chat/completions"

        def body(n, stream=False):
            return {"messages": [{"role": "user", "content": "story"}], "temperature": 0, "max_tokens": n,
                    "stream": stream, "ignore_eos": True}

        # one row decoding, one request waiting: the next is refused with 429
        with httpx.stream("POST", url, json=body(400, stream=True)) as running:
            lines = running.iter_lines()
            next(lines)
            waiting = threading.Thread(target=httpx.post, args=(url,), kwargs=dict(json=body(4), timeout=60))
            waiting.start()
            deadline = time.time() + 5
            while srv.health()["waiting"] == 0 and time.time() < deadline:
                time.sleep(0.02)
            refused = httpx.post(url, json=body(4))
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        waiting.join()

        # SIGTERM during a stream: the stream completes, new requests get 503, then exit 0
        chunks = []
        with httpx.stream("POST", url, json=body(1500, stream=True)) as response:  # long enough to outlast the checks
            lines = response.iter_lines()
            chunks.append(next(lines))
            srv.proc.send_signal(signal.SIGTERM)
            deadline = time.time() + 5
            while httpx.get(srv.url + "/health").status_code != 503 and time.time() < deadline:
                time.sleep(0.01)
            late = httpx.post(url, json=body(4))
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
            chunks += list(lines)
        data = [line for line in chunks if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        assert json.loads(data[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(timeout=30) == 0
    finally:
        srv.stop()


def test_each_adapter_is_served_by_name_and_answers_as_the_adapter_does_in_process(varied_checkpoint, make_adapter,
                                                                                  tmp_path):
    """Two adapters beside the base model: /v1/models lists all three, `model` picks one, and each answers (greedy,
    fp32, concurrently with the others) what glm_tune.chat_model.ChatGLM with that adapter answers in this process."""
    from openai import OpenAI

    from glm_tune.chat_model import ChatGLM

    adapters = {"styled": make_adapter(varied_checkpoint, seed=1), "other": make_adapter(varied_checkpoint, seed=2)}
    srv = Server(varied_checkpoint, tmp_path / "requests.jsonl",
                 *[arg for name, path in adapters.items() for arg in ("--lora_path", f"{name}={path}")])
    try:
        client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        assert sorted(m.id for m in client.models.list().data) == ["chatglm-varied", "other", "styled"]
        names = ["chatglm-varied", "styled", "other"]
        with ThreadPoolExecutor(len(names)) as pool:
            served = list(pool.map(lambda name: client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": PROMPTS[3]}], temperature=0,
                max_tokens=NEW).choices[0].message.content, names))
    finally:
        srv.stop()
    expected = [ChatGLM(model_name_or_path=str(varied_checkpoint), lora_path=None if name == names[0] else
                        str(adapters[name]), dtype="fp32", do_sample=False, max_new_tokens=NEW).invoke(PROMPTS[3]).content
                for name in names]
    assert served == expected and len(set(served)) == 3  # each adapter changes the answer


def test_while_loading_every_route_but_health_answers_503_in_openai_form():
    """Before the model is ready (load_in_background still running), as a client sees the server at start-up."""
    from fastapi.testclient import TestClient

    from glm_tune.api_server import Service, create_app

    client = TestClient(create_app(Service("chatglm-small")))
    health = client.get("/health")
    assert health.status_code == 503 and health.json() == {"status": "loading"}
    reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "loading"


def test_a_request_over_the_timeout_gets_504_and_frees_its_row(varied_checkpoint, tmp_path):
    srv = Server(varied_checkpoint, tmp_path / "log.jsonl", "--request_timeout", "0.5")
    try:
        body = {"messages": [{"role": "user", "content": "story"}], "temperature": 0, "max_tokens": 1800,
                "ignore_eos": True}
        reply = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
        assert srv.health()["running"] == 0
        short = httpx.post(srv.url + "/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=60)
        assert short.status_code == 200  # the server goes on serving
    finally:
        srv.stop()
