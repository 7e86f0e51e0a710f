"""A tool-using agent for ChatGLM: each step the model picks ONE tool and its input, the tool runs, and at the end the
model answers from the tools' results.

ChatGLM-6B has no function calling, so the choice is a prompt and a tolerant parser. The router prompt lists the
tools (name + a few words each), the request and the results so far, and asks for two lines:

    工具: calculator
    输入: 3加5乘2

or `完成` once the results answer the request. A router ADAPTER (the embedded small model's, trained by
glm_tune.router) is asked the compact form of that prompt, without the menu: the tools are in its weights. Its
training rows (APP_example/chatglm_agent/router_data, made by make_router_data.py with `router_prompt` itself) are
that compact prompt and the answer `工具: name`, so the adapter learns exactly what the agent asks. The parser takes the exact name, any spelling of it (case, spaces,
hyphens), a Chinese alias (计算器, 知识库, 文案, 抽取, 搜索) or the nearest name (difflib); an answer it cannot read
runs the fallback tool on the request, and the step says `"fallback": true`. The loop stops when the model says it is
done, repeats a call it made already, or after `max_steps` tools.

    agent = Agent(router_llm, llm, make_tools(llm))
    trace = agent.run("3加5乘2等于多少")   # {"answer": ..., "steps": [{"tool", "input", "output", ...}], ...}

Any LangChain chat model works as `router_llm` and `llm` (tests script them); the command line uses ChatGLM, with a
router adapter trained on first use for the embedded small model (glm_tune.router).
"""

import argparse
import difflib
import json
import re
import sys
import unicodedata
from dataclasses import dataclass, field

from glm_tune.agent_tools import TOOL_INFO, TOOL_NAMES, ToolInputError, WebSearch, make_tools
from glm_tune.errors import UserError

# The router prompt. Compact on purpose: its length is what a router adapter's training time is made of.
ROUTER_INSTRUCTION = "选一个工具，答“工具: 名称”“输入: 内容”两行，有结果就答完成"
COMPACT_HEADER = "选工具"  # the compact prompt's first line (see router_prompt)
RESULT_CHARS_IN_ROUTER = 60  # of each earlier result, in the router prompt (the answer prompt gets them whole)
RESULT_CHARS_IN_ANSWER = 1500  # of all results together, in the answer prompt (it must fit ChatGLM's 2048 tokens)
DONE = "完成"
ANSWER_INSTRUCTION = "根据工具的结果回答请求。"
ROUTER_MAX_NEW_TOKENS = 128
DEFAULT_FALLBACK = "kb_search"
# Words that mean "no more tools" at the start of the router's answer (or as its tool name).
_DONE_WORDS = re.compile(r"^\s*(?:完成|已完成|最终回答|最终答案|无需工具|不需要工具|final answer|final|done|finish(?:ed)?)"
                         r"(?![a-z_])", re.I)
_NO_TOOL_NAMES = {"完成", "无", "none", "done", "final", "finish", "无需工具"}
_TOOL_LINE = re.compile(r"(?:工具|tool|action)(?!\s*input)\s*[:=]\s*([^\n]*)", re.I)
_INPUT_LINE = re.compile(r"(?:输入|参数|action\s*input|tool\s*input|input)\s*[:=]\s*(.*)", re.I | re.S)
_CALL_FORM = re.compile(r"^\s*([\w\u4e00-\u9fff .-]+?)\s*\((.*)\)\s*$", re.S)


# ----------------------------------------------------------------------------------------------------------------------
# prompts


def tool_lines(tools=None):
    """`name brief` lines of `tools` (a dict of Tool; default: all of TOOL_NAMES, the router data's set)."""
    if tools is None:
        return [f"{name} {TOOL_INFO[name][1]}" for name in TOOL_NAMES]
    return [f"{tool.name} {tool.brief}" for tool in tools.values()]


def one_line(text, limit):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def router_prompt(request, steps=(), tools=None, compact=False):
    """The prompt that asks for the next tool: instruction, tool lines, the request, each earlier step's result.

    compact=True leaves out the instruction and the tool lines (COMPACT_HEADER instead): the prompt of a router
    ADAPTER, which has the tools and the answer format in its weights. Its training rows are made with it too, and
    they train five times faster without the ~90 tokens of the menu (the menu also drowns the request: with it the
    small model generalizes worse)."""
    head = [COMPACT_HEADER] if compact else [ROUTER_INSTRUCTION, *tool_lines(tools)]
    lines = [*head, f"请求: {request.strip()}"]
    lines += [f"结果{i} {step['tool']}: {one_line(step['output'], RESULT_CHARS_IN_ROUTER)}"
              for i, step in enumerate(steps, start=1)]
    return "\n".join(lines)


def router_target(tool, tool_input=None):
    """What the router answers for a step (the training rows' completion): DONE when tool is None; no 输入 line
    without a tool_input (the tool then runs on the request)."""
    if tool is None:
        return DONE
    return f"工具: {tool}" + (f"\n输入: {tool_input}" if tool_input else "")


def answer_prompt(request, steps):
    """The final prompt: the request and every tool's input and result (RESULT_CHARS_IN_ANSWER shared by the
    results)."""
    if not steps:
        return request.strip()
    lines = [ANSWER_INSTRUCTION, f"请求: {request.strip()}"]
    limit = RESULT_CHARS_IN_ANSWER // len(steps)
    for step in steps:
        output = step["output"] if len(step["output"]) <= limit else step["output"][: limit - 1] + "…"
        lines += [f"[{step['tool']}] 输入: {step['input']}", f"结果: {output}"]
    lines.append("回答:")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# the tolerant parser


@dataclass(frozen=True)
class Decision:
    """The router's choice: a tool and its input, or final (no more tools). fallback: the answer could not be read,
    so the fallback tool runs on the request."""

    tool: str | None
    input: str
    final: bool = False
    fallback: bool = False


def _key(name):
    return re.sub(r"[\s_\-]+", "", name.lower())


def resolve_tool(candidate, names):
    """The tool among `names` that `candidate` names: exactly, in another spelling (case, spaces, '-', '_'), by its
    Chinese alias, by containing a name or alias, or by the nearest spelling (difflib); None when none fits."""
    candidate = candidate.strip().strip("`'\"“”[]<>*。.,，")
    if not candidate:
        return None
    spellings = {}
    for name in names:
        spellings[_key(name)] = name
        spellings[_key(TOOL_INFO.get(name, (name,))[0])] = name
    key = _key(candidate)
    if key in spellings:
        return spellings[key]
    mentioned = [(key.find(spelling), name) for spelling, name in spellings.items() if spelling and spelling in key]
    if mentioned:
        return min(mentioned)[1]
    close = difflib.get_close_matches(key, list(spellings), n=1, cutoff=0.6)
    return spellings[close[0]] if close else None


def parse_decision(text, names, request, fallback_tool=DEFAULT_FALLBACK):
    """The router's answer -> Decision. Accepts `工具: X / 输入: Y` (or Tool/Action + Input/Action Input, either
    colon), `X(Y)`, a bare tool name, or a tool named anywhere in the answer; `完成` / Final Answer / done means final.
    A missing or empty input is the request. What cannot be read: the fallback tool on the request."""
    text = unicodedata.normalize("NFKC", text or "").strip()
    if _DONE_WORDS.match(text):
        return Decision(None, "", final=True)
    tool, tool_input = None, None
    line = _TOOL_LINE.search(text)
    found_input = _INPUT_LINE.search(text)
    if line:
        candidate = line.group(1)
        inline = _INPUT_LINE.search(candidate)  # 工具: calculator 输入: 3*4 on one line
        if inline:
            candidate = candidate[: inline.start()]
        if _key(candidate).strip("`'\"") in _NO_TOOL_NAMES:
            return Decision(None, "", final=True)
        tool = resolve_tool(candidate, names)
    if tool is None:
        call = _CALL_FORM.match(text.splitlines()[0] if text else "")
        if call and resolve_tool(call.group(1), names):
            tool, tool_input = resolve_tool(call.group(1), names), call.group(2)
    if tool is None and text:
        tool = resolve_tool(text.splitlines()[0], names) or _first_mention(text, names)
    if tool is None:
        return Decision(fallback_tool, request, fallback=True)
    if tool_input is None and found_input:
        tool_input = found_input.group(1)
    tool_input = (tool_input or "").strip().strip("`").strip()
    return Decision(tool, tool_input or request)


def _first_mention(text, names):
    """The tool whose name or alias appears first in `text` (word-ish match for names), else None."""
    found = []
    for name in names:
        for spelling in (name, TOOL_INFO.get(name, (name,))[0]):
            match = re.search(re.escape(spelling), text, re.I)
            if match:
                found.append((match.start(), name))
    return min(found)[1] if found else None


# ----------------------------------------------------------------------------------------------------------------------
# the loop


def _same_call(a, b):
    return a["tool"] == b["tool"] and " ".join(a["input"].split()) == " ".join(b["input"].split())


@dataclass
class Agent:
    """router_llm picks tools, llm answers (and writes copy / extracts, through the tools it was given); the two may be
    one model. Both are LangChain chat models."""

    router_llm: object
    llm: object
    tools: dict = field(default_factory=dict)
    max_steps: int = 3
    fallback_tool: str = DEFAULT_FALLBACK
    compact_prompt: bool = False  # True for a router adapter (see router_prompt)

    def __post_init__(self):
        if not self.tools:
            self.tools = make_tools(self.llm)
        if self.fallback_tool not in self.tools:
            raise UserError(f"fallback tool {self.fallback_tool!r} is not among the tools ({', '.join(self.tools)})")
        if self.max_steps < 1:
            raise UserError(f"max_steps must be at least 1, got {self.max_steps}")

    def decide(self, request, steps):
        """(Decision, the router's raw answer) for the next step."""
        from langchain_core.messages import HumanMessage

        prompt = router_prompt(request, steps, self.tools, compact=self.compact_prompt)
        raw = self.router_llm.invoke([HumanMessage(content=prompt)]).text
        return parse_decision(raw, list(self.tools), request, self.fallback_tool), raw

    def run_tool(self, name, tool_input, request):
        """(output, input used, retried): a tool that cannot use the model's input gets the request instead, once (a
        small model may garble what it copies); what goes wrong becomes the output (`error: ...`, the first error
        when the request fails too), never an exception out of the loop."""
        tool = self.tools[name]
        try:
            return tool.run(tool_input), tool_input, False
        except ToolInputError as err:
            if not err.retry_with_request or tool_input.strip() == request.strip():
                return f"error: {err}", tool_input, False
            try:
                return tool.run(request), request, True
            except Exception:  # noqa: BLE001 - the request is no better: report what the model's input did
                return f"error: {err}", tool_input, False
        except Exception as err:  # noqa: BLE001 - a tool's failure is something to report, not to crash on
            return f"error: {type(err).__name__}: {err}", tool_input, False

    def plan(self, request, on_step=None):
        """Run tools until done -> (steps, why it stopped: "final", "repeat" or "max_steps"). on_step(step) is called
        after each tool (the web page shows them as they come)."""
        steps = []
        while len(steps) < self.max_steps:
            decision, raw = self.decide(request, steps)
            if decision.final:
                return steps, "final"
            step = {"tool": decision.tool, "input": decision.input, "output": None, "fallback": decision.fallback,
                    "router_output": raw}
            if any(_same_call(step, earlier) for earlier in steps):
                return steps, "repeat"
            step["output"], step["input"], retried = self.run_tool(decision.tool, decision.input, request)
            if retried:
                step["retried_with_request"] = True
            steps.append(step)
            if on_step:
                on_step(step)
        return steps, "max_steps"

    def answer_messages(self, request, steps):
        from langchain_core.messages import HumanMessage

        return [HumanMessage(content=answer_prompt(request, steps))]

    def stream_answer(self, request, steps):
        """The final answer's text pieces as the model writes them."""
        for chunk in self.llm.stream(self.answer_messages(request, steps)):
            yield chunk.text

    def run(self, request, on_step=None):
        """The whole trace: {"question", "answer", "steps": [{"tool", "input", "output", "fallback", ...}],
        "stopped": why}."""
        request = request.strip()
        steps, stopped = self.plan(request, on_step)
        answer = self.llm.invoke(self.answer_messages(request, steps)).text
        return {"question": request, "answer": answer, "steps": steps, "stopped": stopped}


# ----------------------------------------------------------------------------------------------------------------------
# command line (APP_example/chatglm_agent/agent.py)

SAMPLE_QUESTIONS = [
    "公司的年假政策是什么？",
    "3加5乘2等于多少",
    "给便携咖啡机写一段推广文案",
    "从下面这段话中抽取人物和关系：张伟是李娜的老师",
    "今天北京天气怎么样",
]


def build_parser(prog=None, description=None, parser_class=argparse.ArgumentParser):
    """The agent's flags, shared by agent.py and the web page (which passes a parser class whose errors raise
    UserError)."""
    from glm_tune.arguments import add_model_arguments, add_sampling_arguments

    parser = parser_class(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_sampling_arguments(parser, do_sample=False, max_length=True)
    parser.add_argument("--max_new_tokens", type=int, default=256,
                        help="most tokens of the final answer (and of copy and extractions) (default: %(default)s)")
    parser.add_argument("--router_lora", default="auto",
                        help="adapter of the tool-choosing model: auto = on the embedded model the router adapter "
                             "trained on first use from router_data/train.jsonl (cached), on a real checkpoint none; "
                             "none = the prompt alone; or a path (default: %(default)s)")
    parser.add_argument("--max_steps", type=int, default=3, help="most tools per request (default: %(default)s)")
    parser.add_argument("--fallback_tool", default=DEFAULT_FALLBACK, choices=TOOL_NAMES,
                        help="the tool run when the model's choice cannot be read (default: %(default)s)")
    parser.add_argument("--index_dir", default=None,
                        help="knowledge-base index for kb_search (an APP_example/chat_langchain index); default: "
                             "the sample knowledge base, built on first use")
    parser.add_argument("--web_search_url", default=None,
                        help="Tavily-style search endpoint (default: $GLM_TUNE_WEB_SEARCH_URL or Tavily's); web "
                             "search is on only when TAVILY_API_KEY is set")
    return parser


def check_args(args):
    from pathlib import Path

    if args.max_steps < 1:
        raise UserError(f"--max_steps must be at least 1, got {args.max_steps}")
    if args.max_new_tokens < 1 or args.max_length < 1:
        raise UserError("--max_new_tokens and --max_length must be at least 1")
    if args.index_dir is not None and not Path(args.index_dir).is_dir():
        raise UserError(f"--index_dir {args.index_dir}: no such folder (build an index with "
                        "APP_example/chat_langchain first, or leave it out for the sample knowledge base)")
    if args.router_lora not in ("auto", "none") and not Path(args.router_lora).exists():
        raise UserError(f"--router_lora {args.router_lora}: no such adapter (auto, none, or an adapter folder)")
    if args.lora_path and not Path(args.lora_path).exists():
        raise UserError(f"--lora_path {args.lora_path}: no such adapter")


def build_models(args, log=None):
    """(router_llm, llm) for the flags: the router greedy, with its adapter (see glm_tune.router.router_adapter);
    the answering model with the user's --lora_path and sampling flags."""
    from glm_tune.chat_model import ChatGLM
    from glm_tune.router import router_adapter

    router_dir = router_adapter(args.router_lora, args.model_name_or_path, args.revision, log=log)
    base = dict(model_name_or_path=args.model_name_or_path, revision=args.revision, dtype=args.dtype,
                max_length=args.max_length)
    router_llm = ChatGLM(**base, lora_path=str(router_dir) if router_dir else None, do_sample=False,
                         max_new_tokens=ROUTER_MAX_NEW_TOKENS)
    llm = ChatGLM(**base, lora_path=args.lora_path, do_sample=args.do_sample, temperature=args.temperature,
                  top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    return router_llm, llm


def build_agent(args, log=None):
    router_llm, llm = build_models(args, log)
    tools = make_tools(llm, index_dir=args.index_dir, web_search=WebSearch.from_env(url=args.web_search_url))
    return Agent(router_llm, llm, tools, max_steps=args.max_steps, fallback_tool=args.fallback_tool,
                 compact_prompt=router_llm.lora_path is not None)


def format_trace(trace):
    """A trace for people: each step's tool, input and output, then the answer."""
    lines = [f"question: {trace['question']}"]
    for i, step in enumerate(trace["steps"], start=1):
        notes = [note for flag, note in (("fallback", "fallback: the model's choice could not be read"),
                                         ("retried_with_request", "input replaced by the request")) if step.get(flag)]
        lines.append(f"step {i}: {step['tool']}" + (f" ({'; '.join(notes)})" if notes else ""))
        lines.append(f"  input:  {step['input']}")
        lines.append("  output: " + step["output"].replace("\n", "\n          "))
    lines.append(f"stopped: {trace['stopped']}")
    lines.append(f"answer: {trace['answer']}")
    return "\n".join(lines)


def main(argv=None, description=None):
    parser = build_parser(description=description)
    parser.add_argument("--question", default=None, help="the request (default: one sample question per tool)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: the trace {question, answer, steps, stopped} (several "
                             "questions: {runs: [...]})")
    args = parser.parse_args(argv)
    check_args(args)
    if args.question is not None and not args.question.strip():
        raise UserError("--question is empty")
    questions = [args.question] if args.question is not None else SAMPLE_QUESTIONS

    def log(message):
        print(message, file=sys.stderr, flush=True)

    agent = build_agent(args, log)
    traces = []
    for question in questions:
        trace = agent.run(question)
        traces.append(trace)
        if not args.json:
            print(format_trace(trace) + "\n", flush=True)
    if args.json:
        print(json.dumps(traces[0] if args.question is not None else {"runs": traces}, ensure_ascii=False))
    return traces
