"""The tool-using agent (APP_example/chatglm_agent): the tolerant parser and the loop with scripted models, the tools
(the safe calculator, web search against a local fake API, tolerant extraction, the sample knowledge base), the
router adapter trained ONCE per session through the app's own code path (held-out accuracy, the cache), agent.py
end to end on the embedded model, and the Streamlit page under AppTest."""

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

import glm_tune.router as router
from glm_tune.agent import COMPACT_HEADER, DONE, Agent, answer_prompt, format_trace, parse_decision, router_prompt
from glm_tune.agent_tools import (MAX_EXPRESSION_CHARS, TOOL_NAMES, WEB_SEARCH_UNAVAILABLE, CalculatorError,
                                  KnowledgeSearch, Tool, WebSearch, as_langchain_tools, calculate, make_tools,
                                  parse_extraction)
from glm_tune.errors import UserError
from glm_tune.locking import OutputLock

import app_helpers

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "APP_example" / "chatglm_agent"
Hit = namedtuple("Hit", "source chunk score text")


def load_script(name):
    return app_helpers.load_script(APP_DIR / f"{name}.py", "chatglm_agent")


def open_page(monkeypatch, *flags):
    return app_helpers.open_page(monkeypatch, APP_DIR / "app.py", *flags, timeout=300)


class ScriptedChat(FakeListChatModel):
    """FakeListChatModel that also keeps every prompt it was asked (the text of the last message)."""

    prompts: list = []

    def _call(self, messages, stop=None, run_manager=None, **kwargs):
        self.prompts.append(messages[-1].text)
        return super()._call(messages, stop, run_manager, **kwargs)


def scripted(*responses):
    return ScriptedChat(responses=list(responses), prompts=[])


class StubKB:
    def __init__(self):
        self.queries = []

    def search(self, query, k=4, mode="hybrid"):
        self.queries.append((query, k, mode))
        return [Hit("hr/leave_policy.md", 2, 0.83, "员工依法登记结婚的，可享受婚假 13 天。")]


def agent_with(router_llm, llm, **settings):
    tools = make_tools(llm, web_search=WebSearch(api_key=None))
    tools["kb_search"] = Tool("kb_search", *[getattr(tools["kb_search"], f) for f in ("alias", "brief", "description")],
                              run=KnowledgeSearch(_kb=StubKB()))
    return Agent(router_llm, llm, tools, **settings)


# ----------------------------------------------------------------------------------------------------------------------
# the loop, with scripted models


@pytest.mark.parametrize("tool, tool_input, llm_says, expected_output", [
    ("kb_search", "婚假", [], "[1] hr/leave_policy.md#2 (score 0.83)\n员工依法登记结婚的，可享受婚假 13 天。"),
    ("calculator", "3*(4+5)", [], "3*(4+5) = 27"),
    ("copywriting", "保温杯", ['[{"人群": "学生", "文案": "一杯暖一天"}]'], '[{"人群": "学生", "文案": "一杯暖一天"}]'),
    ("extract", "张伟是李娜的老师",
     ['```json\n{"entities": [{"name": "张伟", "type": "人物"}], "relations": '
      '[{"head": "张伟", "relation": "老师", "tail": "李娜"}]}\n```'],
     '{"entities": [{"name": "张伟", "type": "人物"}], "relations": [{"head": "张伟", "relation": "老师", "tail": "李娜"}]}'),
    ("web_search", "北京天气", [], WEB_SEARCH_UNAVAILABLE),
])
def test_each_tool_is_chosen_and_its_output_reaches_the_answer(tool, tool_input, llm_says, expected_output):
    router_llm = scripted(f"工具: {tool}\n输入: {tool_input}", DONE)
    llm = scripted(*llm_says, "最终回答")
    trace = agent_with(router_llm, llm).run(f"请求 about {tool_input}")

    assert trace["answer"] == "最终回答" and trace["stopped"] == "final"
    [step] = trace["steps"]
    assert (step["tool"], step["input"], step["output"], step["fallback"]) == (tool, tool_input, expected_output, False)
    assert llm.prompts[-1] == answer_prompt(f"请求 about {tool_input}", trace["steps"])
    assert expected_output in llm.prompts[-1]
    # the router is asked with the tool menu, then again with the first result (one line, cut short)
    assert router_llm.prompts == [router_prompt(f"请求 about {tool_input}"),
                                  router_prompt(f"请求 about {tool_input}", trace["steps"])]
    assert f"\n结果1 {tool}: " in router_llm.prompts[1]
    if tool in ("copywriting", "extract"):
        assert tool_input in llm.prompts[0]  # the tool's own prompt to the model


def test_router_prompt_lists_every_tool_and_the_compact_one_does_not():
    full = router_prompt("3加5等于多少")
    assert all(f"\n{name} " in full for name in TOOL_NAMES) and full.endswith("\n请求: 3加5等于多少")
    assert router_prompt("3加5等于多少", compact=True) == f"{COMPACT_HEADER}\n请求: 3加5等于多少"
    steps = [{"tool": "calculator", "input": "3加5", "output": "3+5 = 8\n" + "x" * 200}]
    line = router_prompt("q", steps, compact=True).splitlines()[-1]
    assert line.startswith("结果1 calculator: 3+5 = 8 xxx") and line.endswith("…") and len(line) < 90


def test_answer_prompt_holds_every_result_within_its_budget():
    steps = [{"tool": name, "input": name, "output": name[0] * 2000} for name in ("kb_search", "web_search", "extract")]
    prompt = answer_prompt("问题", steps)
    assert prompt.startswith("根据工具的结果回答请求。\n请求: 问题\n[kb_search] 输入: kb_search\n结果: kkk")
    assert all(f"结果: {name[0] * 499}…" in prompt for name in ("kb_search", "web_search", "extract"))
    assert len(prompt) < 1650 and prompt.endswith("\n回答:") and answer_prompt(" 问题 ", []) == "问题"


@pytest.mark.parametrize("answer, tool, tool_input", [
    ("工具: calculator\n输入: 1+1", "calculator", "1+1"),
    ("工具：Calculator\n输入：1+1", "calculator", "1+1"),  # full-width colons, other case
    ("Action: KB Search\nAction Input: 年假", "kb_search", "年假"),
    ("tool = kb-search\ninput = 年假", "kb_search", "年假"),
    ("工具: 计算器\n输入: 2*3", "calculator", "2*3"),
    ("工具: 知识库", "kb_search", "REQUEST"),  # no input: the request
    ("工具: 文案\n输入:", "copywriting", "REQUEST"),  # empty input: the request
    ("工具: 抽取\n输入: 张三是李四的老师", "extract", "张三是李四的老师"),
    ("工具: 搜索\n输入: 北京天气", "web_search", "北京天气"),
    ("工具: calculater\n输入: 7*6", "calculator", "7*6"),  # misspelled: the nearest name
    ("工具: web_serch", "web_search", "REQUEST"),
    ("工具: calculator 输入: 2*3", "calculator", "2*3"),  # both on one line
    ("calculator(5*5)", "calculator", "5*5"),
    ("copywriting", "copywriting", "REQUEST"),
    ("我会使用计算器来算。\n输入: 9-1", "calculator", "9-1"),
])
def test_parser_reads_spellings_aliases_and_formats(answer, tool, tool_input):
    decision = parse_decision(answer, list(TOOL_NAMES), "REQUEST")
    assert (decision.tool, decision.input, decision.final, decision.fallback) == (tool, tool_input, False, False)


@pytest.mark.parametrize("answer", ["完成", "Final Answer: 42", "done.", "工具: 无", "工具: none", "最终回答：13"])
def test_parser_reads_done(answer):
    assert parse_decision(answer, list(TOOL_NAMES), "REQUEST").final


@pytest.mark.parametrize("answer", ["", "   ", "asdf qwer zxcv", "工具: 魔法\n输入: x", "\x00\ufffd{{{"])
def test_unreadable_answers_take_the_fallback_tool(answer):
    decision = parse_decision(answer, list(TOOL_NAMES), "REQUEST", fallback_tool="calculator")
    assert (decision.tool, decision.input, decision.fallback) == ("calculator", "REQUEST", True)


def test_garbage_runs_the_fallback_and_a_repeat_stops_the_loop():
    router_llm = scripted("equeequeeque tape tape", "寻寻寻 线线线")  # garbage twice: the same fallback call twice
    trace = agent_with(router_llm, scripted("答"), fallback_tool="calculator").run("3加5乘2等于多少")
    [step] = trace["steps"]
    assert (step["tool"], step["input"], step["output"], step["fallback"]) == (
        "calculator", "3加5乘2等于多少", "3+5*2 = 13", True)
    assert step["router_output"] == "equeequeeque tape tape"
    assert trace["stopped"] == "repeat" and "fallback" in format_trace(trace)


def test_step_limit_holds():
    router_llm = scripted(*[f"工具: calculator\n输入: {i}+1" for i in range(10)])
    trace = agent_with(router_llm, scripted("答"), max_steps=2).run("q")
    assert [s["output"] for s in trace["steps"]] == ["0+1 = 1", "1+1 = 2"] and trace["stopped"] == "max_steps"
    assert len(router_llm.prompts) == 2


def test_unusable_input_is_retried_with_the_request_and_tool_failures_become_output():
    trace = agent_with(scripted("工具: calculator\n输入: 加法", DONE), scripted("答")).run("3加5等于多少")
    [step] = trace["steps"]
    assert (step["input"], step["output"], step["retried_with_request"]) == ("3加5等于多少", "3+5 = 8", True)

    def broken(text):
        raise RuntimeError("disk on fire")

    agent = agent_with(scripted("工具: calculator\n输入: 1/0", "工具: kb_search\n输入: x", DONE), scripted("答"))
    agent.tools["kb_search"] = Tool("kb_search", "知识库", "b", "d", run=broken)
    first, second = agent.run("hello")["steps"]
    assert first["output"] == "error: division by zero" and second["output"] == "error: RuntimeError: disk on fire"


def test_agent_refuses_bad_settings():
    with pytest.raises(UserError, match="max_steps"):
        agent_with(scripted(), scripted(), max_steps=0)
    with pytest.raises(UserError, match="fallback tool"):
        Agent(scripted(), scripted(), {"calculator": make_tools()["calculator"]}, fallback_tool="kb_search")


def test_tools_work_as_langchain_tools():
    tools = {tool.name: tool for tool in as_langchain_tools(make_tools(scripted("文案!")))}
    assert sorted(tools) == sorted(TOOL_NAMES)
    assert tools["calculator"].invoke({"query": "12*7"}) == "12*7 = 84"
    assert tools["calculator"].invoke({"query": "__import__('os')"}).startswith("error: function __import__")
    assert tools["copywriting"].invoke({"query": "保温杯"}) == "文案!"
    assert "计算器" in tools["calculator"].description and "arithmetic" in tools["calculator"].description


# ----------------------------------------------------------------------------------------------------------------------
# the calculator


@pytest.mark.parametrize("text, result", [
    ("3加5乘2等于多少", "3+5*2 = 13"),
    ("what is 12*7?", "12*7 = 84"),
    ("(3+4)*5", "(3+4)*5 = 35"),
    ("2+3*4-6/2", "2+3*4-6/2 = 11"),
    ("0.1+0.2", "0.1+0.2 = 0.3"),
    ("7/2", "7/2 = 3.5"),
    ("１２＋３０", "12+30 = 42"),  # full-width
    ("6除以4减去1", "6/4-1 = 0.5"),
    ("9 × 8 ÷ 4", "9 * 8 / 4 = 18"),
    ("2的10次方是多少", "2**10 = 1024"),
    ("帮我算一下 (15+27)/6 的结果", "(15+27)/6 = 7"),
    ("-2**2", "-2**2 = -4"),
    ("17 // 5 + 17 % 5", "17 // 5 + 17 % 5 = 5"),
    ("sqrt(16) + abs(-3) + round(2.567, 1)", "sqrt(16) + abs(-3) + round(2.567, 1) = 9.6"),
    ("2**-2", "2**-2 = 0.25"),
])
def test_calculator_computes(text, result):
    assert calculate(text) == result


@pytest.mark.parametrize("text, message", [
    ("__import__('os')", "function __import__ is not allowed"),
    ("(1).__class__", "attribute access is not allowed"),
    ("(1).__class__.__bases__[0].__subclasses__()", "not allowed"),
    ("x + 1", "names are not allowed: x"),
    ("open('/etc/passwd')", "function open is not allowed"),
    ("lambda: 1", "lambda is not allowed"),
    ("[1, 2]", "List is not allowed"),
    ("'a' * 3", "only numbers are allowed"),
    ("9**9**9", "exponent 387420489 is too large"),
    ("10**1000", "exponent 1000 is too large"),
    ("(10**100)**100", "the result is too large"),
    ("1e308 * 10", "the result is too large"),
    ("1/0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("sqrt(-1)", "cannot compute"),
    ("1 << 1000", "operator LShift is not allowed"),
    ("1" * (MAX_EXPRESSION_CHARS + 1), "input too long"),
    ("你好", "no arithmetic expression found"),
])
def test_calculator_refuses(text, message):
    with pytest.raises(CalculatorError, match=message.replace("(", r"\(").replace("*", r"\*")):
        calculate(text)


def test_calculator_refusal_is_fast():
    start = time.perf_counter()
    for text in ("9**9**9", "2**100**100", "(2**100)**(2**100)", "(10**99)**99", "(9**99)**(9**99)"):
        with pytest.raises(CalculatorError):
            calculate(text)
    assert time.perf_counter() - start < 1


# ----------------------------------------------------------------------------------------------------------------------
# web search against a local fake API, extraction, knowledge base


class FakeSearchAPI(http.server.BaseHTTPRequestHandler):
    requests = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeSearchAPI.requests.append((self.path, self.headers.get("Authorization"), body))
        if self.path == "/fail":
            self.send_error(500, "Internal Server Error")
            return
        if self.path == "/slow":
            time.sleep(2)
        payload = b"not json" if self.path == "/garbage" else json.dumps({
            "answer": "晴，25°C",
            "results": [{"title": "北京天气", "url": "https://weather.example/bj", "content": "今天 晴  25°C"},
                        {"title": "second", "url": "https://b.example", "content": "x" * 1000},
                        {"title": "third", "url": "https://c.example", "content": "c"},
                        {"title": "fourth", "url": "https://d.example", "content": "d"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def search_api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeSearchAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_web_search_without_a_key_says_it_is_unavailable(monkeypatch):
    monkeypatch.delenv("TAVILY_API_KEY", raising=False)
    search = WebSearch.from_env()
    assert not search.available and search("北京天气") == "web search is unavailable: set TAVILY_API_KEY"


def test_web_search_with_a_key_formats_the_results(monkeypatch, search_api):
    monkeypatch.setenv("TAVILY_API_KEY", "tvly-test")
    monkeypatch.setenv("GLM_TUNE_WEB_SEARCH_URL", search_api + "/search")
    FakeSearchAPI.requests.clear()
    output = WebSearch.from_env()("北京天气")
    assert FakeSearchAPI.requests == [("/search", "Bearer tvly-test",
                                       {"query": "北京天气", "max_results": 3, "api_key": "tvly-test"})]
    lines = output.splitlines()
    assert lines[:3] == ["answer: 晴，25°C", "[1] 北京天气 (https://weather.example/bj)", "今天 晴 25°C"]
    assert "[3] third" in output and "fourth" not in output and "x" * 401 not in output


@pytest.mark.parametrize("path, timeout, message", [
    ("/fail", 5, "web search failed: HTTP 500 Internal Server Error"),
    ("/garbage", 5, "web search failed: the search API did not answer JSON"),
    ("/slow", 0.3, "web search failed: timed out"),
])
def test_web_search_failures_are_output(search_api, path, timeout, message):
    assert WebSearch(api_key="k", url=search_api + path, timeout_s=timeout)("q") == message


def test_web_search_unreachable_is_output():
    output = WebSearch(api_key="k", url="http://127.0.0.1:9/search", timeout_s=2)("q")
    assert output.startswith("web search failed: ")


@pytest.mark.parametrize("answer, expected", [
    ('{"entities": [{"name": "张伟", "type": "人物"}], "relations": []}',
     {"entities": [{"name": "张伟", "type": "人物"}], "relations": []}),
    ('好的，结果如下：\n```json\n{"entities": [{"name": "Alice", "type": "person"}], "relations": [{"head": "Alice", '
     '"relation": "works at", "tail": "Google"}]}\n```\n希望有帮助！',
     {"entities": [{"name": "Alice", "type": "person"}],
      "relations": [{"head": "Alice", "relation": "works at", "tail": "Google"}]}),
    ('抽取结果 {"entities": [{"name": "A", "type": "人物"}, {"name": ""}, "junk", {"name": 3, "type": "数"}], '
     '"relations": [{"head": "A"}]} 以上', {"entities": [{"name": "A", "type": "人物"}, {"name": "3", "type": "数"}],
                                            "relations": []}),
    ('{"entities": "none"}', {"entities": [], "relations": []}),
])
def test_extraction_parses_json_however_wrapped(answer, expected):
    assert parse_extraction(answer) == expected


@pytest.mark.parametrize("answer", ["equeequeeque", "{not json", "", '["a list"]', '{"other": 1}', "{" * 5000])
def test_extraction_of_garbage_is_empty_with_the_raw_text(answer):
    assert parse_extraction(answer) == {"entities": [], "relations": [], "raw": answer}


def test_kb_search_searches_the_sample_knowledge_base():
    output = KnowledgeSearch()("婚假有几天？")
    assert output.startswith("[1] ") and "hr/leave_policy.md#" in output and "婚假 13 天" in output


# ----------------------------------------------------------------------------------------------------------------------
# the router data set and adapter


def test_router_data_is_balanced_deterministic_and_asked_as_the_agent_asks():
    make_router_data = load_script("make_router_data")
    for path, split, per_tool in ((router.TRAIN_FILE, "train", 180), (router.HELDOUT_FILE, "heldout", 20)):
        rows = router.read_rows(path)
        assert rows == make_router_data.make_rows(split, per_tool, seed=0)  # the shipped files are the script's
        counts = {tool: sum(row["tool_name"] == tool for row in rows) for tool in TOOL_NAMES}
        assert counts == dict.fromkeys(TOOL_NAMES, per_tool) and sum(row["tool_name"] is None for row in rows) > 0
        assert all(row["prompt"] == router.row_prompt(row) for row in rows)  # not stale
        for row in rows:
            decision = parse_decision(row["completion"], list(TOOL_NAMES), row["request"])
            assert (decision.tool, decision.final) == (row["tool_name"], row["tool_name"] is None)
    train = {row["request"] for row in router.read_rows(router.TRAIN_FILE)}
    assert not train & {row["request"] for row in router.read_rows(router.HELDOUT_FILE)}


@pytest.fixture(scope="session")
def trained_router():
    """The router adapter, trained once for the session by the app's own code path into the session's cache."""
    start = time.perf_counter()
    adapter = router.ensure_router()
    return adapter, time.perf_counter() - start


def test_router_trains_once_and_picks_tools_on_held_out_requests(trained_router):
    adapter, seconds = trained_router
    assert adapter.trained and router.is_trained(adapter.path)
    assert adapter.path.parent == Path(os.environ["GLM_TUNE_CACHE"]) and adapter.path.name.startswith("agent-router-")
    assert not adapter.path.with_name(adapter.path.name + ".partial").exists()
    score = router.evaluate_router(adapter.path)
    print(f"\nrouter: trained in {adapter.seconds:.0f} s\n{score.format()}")
    assert score.rows == 100 and score.tool_accuracy >= 0.9, score.format()
    assert score.done_rows == 20 and score.done_accuracy >= 0.9, score.format()

    mtime = (adapter.path / "adapter_config.json").stat().st_mtime_ns
    again = router.ensure_router()  # the cache: no second training
    assert (again.path, again.trained) == (adapter.path, False)
    assert (adapter.path / "adapter_config.json").stat().st_mtime_ns == mtime


def test_router_cache_follows_data_flags_and_base_model(tmp_path, monkeypatch):
    trainings = []

    def fake_train(train_file, output, model_name_or_path=None, revision=None, train_args=(), log=None):
        trainings.append(Path(train_file).read_text())
        output.mkdir(parents=True)
        (output / "adapter_config.json").write_text("{}")
        (output / "adapter_model.safetensors").write_bytes(b"")
        return 1.0

    monkeypatch.setattr(router, "train_router", fake_train)
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    first = router.ensure_router(data, cache_dir=tmp_path / "cache")
    assert first.trained and router.ensure_router(data, cache_dir=tmp_path / "cache") == \
        router.RouterAdapter(first.path, False, 0.0)
    data.write_text('{"prompt": "a", "completion": "c"}\n')  # new data: a new adapter
    second = router.ensure_router(data, cache_dir=tmp_path / "cache")
    other_flags = router.ensure_router(data, cache_dir=tmp_path / "cache", train_args=("--max_steps", "1"))
    assert second.trained and other_flags.trained and len({first.path, second.path, other_flags.path}) == 3
    assert len(trainings) == 3
    folder = router.base_model_folder()
    assert router.router_cache_path(data, base_folder=folder.with_name("other-model")) != \
        router.router_cache_path(data, base_folder=folder)


def test_router_waits_for_another_process_training_it(tmp_path, monkeypatch):
    """While another process holds the adapter's lock (training it), ensure_router waits, then uses its adapter."""
    monkeypatch.setattr(router, "train_router", lambda *a, **k: pytest.fail("trained twice"))
    monkeypatch.setattr(router, "WAIT_POLL_S", 0.05)
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    path = router.router_cache_path(data, cache_dir=tmp_path)
    other = OutputLock(path, "router adapter")  # a flock of its own: to this process's next one, another holder
    other.acquire()
    said, result = [], []
    waiter = threading.Thread(target=lambda: result.append(router.ensure_router(data, cache_dir=tmp_path,
                                                                                log=said.append)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and said and said[0].startswith("router: waiting: router adapter")
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"")
    other.release()
    waiter.join(10)
    assert result == [router.RouterAdapter(path, False, 0.0)]


def test_router_lora_choices(tmp_path):
    assert router.router_adapter("none") is None
    assert router.router_adapter("auto", model_name_or_path="THUDM/chatglm-6b") is None  # a real model: the prompt
    assert router.router_adapter(str(tmp_path)) == tmp_path
    with pytest.raises(UserError, match="no such adapter"):
        router.router_adapter(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------------------------------
# agent.py and the web page on the embedded model with the trained router


def test_agent_script_answers_with_the_calculator_as_one_json_object(trained_router):
    result = subprocess.run(
        [sys.executable, str(APP_DIR / "agent.py"), "--question", "3加5乘2等于多少", "--json", "--max_new_tokens", "8"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "TAVILY_API_KEY": ""})
    assert result.returncode == 0, result.stderr
    trace = json.loads(result.stdout)  # stdout is exactly one JSON object
    assert set(trace) == {"question", "answer", "steps", "stopped"} and isinstance(trace["answer"], str)
    assert trace["question"] == "3加5乘2等于多少" and trace["stopped"] in ("final", "repeat", "max_steps")
    first = trace["steps"][0]
    assert {"tool", "input", "output", "fallback"} <= set(first)
    assert (first["tool"], first["fallback"]) == ("calculator", False) and first["output"].endswith("= 13")
    assert "router: training" not in result.stderr  # the session's adapter, from the cache


@pytest.mark.parametrize("flags, message", [
    (["--max_steps", "0"], "--max_steps must be at least 1"),
    (["--router_lora", "/no/such/adapter"], "--router_lora /no/such/adapter: no such adapter"),
    (["--index_dir", "/no/such/index"], "--index_dir /no/such/index: no such folder"),
    (["--fallback_tool", "magic"], "invalid choice"),
    (["--question", "  "], "--question is empty"),
])
def test_agent_script_bad_flags_are_one_line(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        load_script("agent").main(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_page_shows_the_steps_and_the_answer(monkeypatch, trained_router):
    monkeypatch.delenv("TAVILY_API_KEY", raising=False)
    at = open_page(monkeypatch, "--max_new_tokens", "8")
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert all(f"**{name}**" in sidebar for name in TOOL_NAMES) and "off (set TAVILY_API_KEY)" in sidebar

    at.chat_input(key="request").set_value("3加5乘2等于多少").run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert at.expander[0].label == "Step 1: calculator"
    assert "3+5*2 = 13" in [t.value for t in at.expander[0].text]
    [turn] = at.session_state["history"]
    assert turn["steps"][0]["output"] == "3+5*2 = 13"
    assert (turn["answer"] or "_(empty answer)_") in [m.value for m in at.markdown]


def test_page_shows_a_bad_flag_as_one_line(monkeypatch):
    at = open_page(monkeypatch, "--max_steps", "zero")
    assert not at.exception and at.error[0].value.startswith("error: app.py: argument --max_steps: invalid int value")
