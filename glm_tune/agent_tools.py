"""The agent's tools: knowledge-base search, a safe calculator, copywriting, information extraction and web search.

Each tool is a `Tool`: a name, a Chinese alias (what a Chinese answer may call it), a brief line for the router
prompt (kept short: every token of that prompt is paid for on every training row of the router), a one-line
Chinese + English description, and `run(text) -> str`. A tool that cannot use its input raises `ToolInputError`
(the agent then retries once with the user's request); everything else it has to say, failures of outside services
included, is its output text, so that the model can read it.

    tools = make_tools(llm)                       # name -> Tool
    tools["calculator"].run("3加5乘2等于多少")     # '3+5*2 = 13'
    as_langchain_tools(tools)                     # the same tools as langchain_core StructuredTools

The calculator never calls eval(): it parses with `ast` and walks a whitelist of nodes (numbers, + - * / // % **,
unary +/-, parentheses, sqrt / abs / round), with bounds on input length, exponents and result size.
"""

import ast
import json
import math
import operator
import os
import re
import unicodedata
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from glm_tune.data import parse_json


class ToolInputError(ValueError):
    """The tool cannot use this input (e.g. no arithmetic in it); the message says why, in one line.
    retry_with_request: whether the agent should try the user's request instead (the model may have garbled it)."""

    retry_with_request = True


@dataclass(frozen=True)
class Tool:
    name: str
    alias: str  # the Chinese name the parser also accepts
    brief: str  # the router prompt's line (short: see the module docstring)
    description: str  # Chinese + English, one line: for people and for LangChain
    run: Callable[[str], str]


# ----------------------------------------------------------------------------------------------------------------------
# calculator

MAX_EXPRESSION_CHARS = 300
MAX_EXPONENT = 100
MAX_RESULT_BITS = 4000  # about 1200 decimal digits: any bigger result is refused, not computed
FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: None}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# Chinese operator words, longest first so that 乘以 wins over 乘 (the word order of Chinese arithmetic is the same as
# the symbols': 6除以3 = 6/3).
_CHINESE_OPERATORS = [("加上", "+"), ("减去", "-"), ("乘以", "*"), ("除以", "/"), ("加", "+"), ("减", "-"),
                      ("乘", "*"), ("除", "/"), ("×", "*"), ("÷", "/"), ("·", "*"), ("^", "**"),
                      ("左括号", "("), ("右括号", ")")]
_POWER_WORDS = [(re.compile(r"的平方"), "**2"), (re.compile(r"的立方"), "**3"),
                (re.compile(r"的\s*(\d+)\s*次方"), r"**\1")]
# A run of arithmetic: numbers, operators, parentheses, the whitelisted function names (and commas inside round()).
_ARITHMETIC_RUN = re.compile(r"(?:sqrt|abs|round|[0-9.+\-*/%(),\s])+")


class CalculatorError(ToolInputError):
    """Not arithmetic, or not allowed."""


class ComputeError(CalculatorError):
    """Arithmetic that has no (bounded) value: division by zero, too large, sqrt(-1). The input was understood, so
    the request would not do better."""

    retry_with_request = False


def normalize_arithmetic(text):
    """Full-width symbols to ASCII (NFKC), Chinese operator words to symbols, `3x4` to `3*4`."""
    text = unicodedata.normalize("NFKC", text)
    for pattern, replacement in _POWER_WORDS:
        text = pattern.sub(replacement, text)
    for word, symbol in _CHINESE_OPERATORS:
        text = text.replace(word, symbol)
    return re.sub(r"(?<=\d)\s*[xX]\s*(?=[\d(])", "*", text)


def find_expression(text):
    """The arithmetic expression in `text`: the text itself when it is a Python expression other than a lone word
    (so that what is not arithmetic in it is refused by name), else the longest run of arithmetic characters holding
    a digit and an operator (or a lone number); CalculatorError when there is none."""
    text = normalize_arithmetic(text).strip()
    try:
        if not isinstance(ast.parse(text, mode="eval").body, ast.Name):  # a lone word ("hello") is no arithmetic
            return text
    except SyntaxError:
        pass
    runs = [run.strip(" ,") for run in _ARITHMETIC_RUN.findall(text)]
    runs = [_balance(run) for run in runs if re.search(r"\d", run)]
    with_operator = [run for run in runs if re.search(r"\d\s*(?:[-+*/%]|\*\*)\s*[\d(.]|sqrt|abs|round", run)]
    candidates = with_operator or runs
    if not candidates:
        raise CalculatorError("no arithmetic expression found (use numbers and + - * / // % ** ( ), or 加减乘除)")
    return max(candidates, key=len)


def _balance(run):
    """A run cut out of a sentence may end in an operator or hold a stray parenthesis: trim those."""
    run = run.strip().rstrip("+-*/%(,. ").strip()
    while run.count("(") > run.count(")") and run.startswith("("):
        run = run[1:].strip()
    while run.count(")") > run.count("(") and run.endswith(")"):
        run = run[:-1].strip()
    return run


def evaluate(expression):
    """The value of an arithmetic expression (int or float); CalculatorError, in one line, for anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"input too long ({len(expression)} characters; at most {MAX_EXPRESSION_CHARS})")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise CalculatorError(f"not a valid arithmetic expression: {expression!r}") from None
    try:
        return _eval_node(tree.body)
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise ComputeError("division by zero") from None
    except OverflowError:
        raise ComputeError("the result is too large") from None
    except (ValueError, TypeError) as err:  # sqrt(-1), round(1, 2.5)
        raise ComputeError(f"cannot compute {expression!r}: {err}") from None


def _eval_node(node):
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalculatorError(f"only numbers are allowed, not {node.value!r}")
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval_node(node.operand))
    if isinstance(node, ast.Call):
        return _call(node)
    raise CalculatorError(_refusal(node))


def _call(node):
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
        name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
        raise CalculatorError(f"function {name} is not allowed (allowed: {', '.join(FUNCTIONS)})")
    if node.keywords or not 1 <= len(node.args) <= (2 if node.func.id == "round" else 1):
        takes = "one or two numbers" if node.func.id == "round" else "one number"
        raise CalculatorError(f"{node.func.id}() takes {takes}")
    args = [_eval_node(arg) for arg in node.args]
    if node.func.id == "round" and len(args) == 2 and not isinstance(args[1], int):
        raise CalculatorError("round(x, n): n must be a whole number")
    return _bounded(FUNCTIONS[node.func.id](*args))


def _refusal(node):
    """Why `node` is not arithmetic, in the user's terms."""
    if isinstance(node, ast.Name):
        return f"names are not allowed: {node.id}"
    if isinstance(node, ast.Attribute):
        return "attribute access is not allowed"
    if isinstance(node, ast.Lambda):
        return "lambda is not allowed"
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        return f"operator {type(node.op).__name__} is not allowed (allowed: + - * / // % **)"
    return f"{type(node).__name__} is not allowed: only numbers, + - * / // % **, parentheses and " \
           f"{', '.join(FUNCTIONS)}"


def _power(base, exponent):
    """base ** exponent, refused before it is computed when it would be huge (9**9**9 would take forever)."""
    if abs(exponent) > MAX_EXPONENT:
        raise ComputeError(f"exponent {format_number(exponent)} is too large (at most {MAX_EXPONENT})")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if base.bit_length() * exponent > MAX_RESULT_BITS:
            raise ComputeError("the result is too large")
    if base == 0 and exponent < 0:
        raise ZeroDivisionError
    result = base ** exponent
    if isinstance(result, complex):
        raise ComputeError("the result is not a real number (a negative number to a fractional power)")
    return _bounded(result)


def _bounded(value):
    if isinstance(value, int) and value.bit_length() > MAX_RESULT_BITS:
        raise ComputeError("the result is too large")
    if isinstance(value, float) and math.isinf(value):
        raise OverflowError
    return value


def format_number(value):
    """13 -> '13', 5.0 -> '5', 0.1 + 0.2 -> '0.3' (12 significant digits)."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


def calculate(text):
    """'3加5乘2等于多少' -> '3+5*2 = 13'; CalculatorError when there is nothing to compute or it is not allowed."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"input too long ({len(text)} characters; at most {MAX_EXPRESSION_CHARS})")
    expression = find_expression(text)
    return f"{expression} = {format_number(evaluate(expression))}"


# ----------------------------------------------------------------------------------------------------------------------
# copywriting and extraction: prompts for the language model

# In the spirit of the seed's batch job (glm_tune.batch_inference): one subject, copy for ten audiences, JSON out.
COPYWRITING_PROMPT = ("你是一名资深营销文案。请为下面的主题写推广文案：面向 10 类不同的人群，每类一句，共 10 行。"
                      "只输出 JSON 数组，每个元素形如 {{\"人群\": \"…\", \"文案\": \"…\"}}。\n主题：{text}")
EXTRACT_PROMPT = ("从下面的文本中抽取实体和关系。只输出一个 JSON 对象，格式为 "
                  "{{\"entities\": [{{\"name\": \"…\", \"type\": \"人物/组织/地点/…\"}}], "
                  "\"relations\": [{{\"head\": \"…\", \"relation\": \"…\", \"tail\": \"…\"}}]}}。\n文本：{text}")


def ask(llm, prompt):
    """The text of `llm`'s answer to one human message."""
    from langchain_core.messages import HumanMessage

    return llm.invoke([HumanMessage(content=prompt)]).text


def copywriting(llm, text):
    return ask(llm, COPYWRITING_PROMPT.format(text=text))


def _json_candidates(text):
    """JSON values found in a model's answer: the contents of ```json fences first, then every object that starts at a
    '{' and parses (so that text before or after it does not matter)."""
    for fenced in re.findall(r"```(?:json)?\s*(.*?)```", text, flags=re.S):
        try:
            yield parse_json(fenced.strip())
        except ValueError:
            pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            yield decoder.raw_decode(text, match.start())[0]
        except (ValueError, RecursionError):
            continue


def _strings(item, *keys):
    values = [item.get(key) for key in keys] if isinstance(item, dict) else []
    if not values or not all(isinstance(v, (str, int, float)) and str(v).strip() for v in values):
        return None
    return {key: str(value).strip() for key, value in zip(keys, values)}


def parse_extraction(text):
    """{"entities": [{"name", "type"}], "relations": [{"head", "relation", "tail"}]} from a model's answer, however
    it is wrapped; items that do not have those fields are dropped. Nothing usable: the empty structure with the
    answer under "raw"."""
    for value in _json_candidates(text):
        if isinstance(value, dict) and ("entities" in value or "relations" in value):
            entities = value.get("entities") if isinstance(value.get("entities"), list) else []
            relations = value.get("relations") if isinstance(value.get("relations"), list) else []
            return {"entities": [e for e in (_strings(item, "name", "type") for item in entities) if e],
                    "relations": [r for r in (_strings(item, "head", "relation", "tail") for item in relations) if r]}
    return {"entities": [], "relations": [], "raw": text}


def extract(llm, text):
    return json.dumps(parse_extraction(ask(llm, EXTRACT_PROMPT.format(text=text))), ensure_ascii=False)


# ----------------------------------------------------------------------------------------------------------------------
# web search: a Tavily-style HTTP API, only with a key

WEB_SEARCH_KEY_ENV = "TAVILY_API_KEY"
WEB_SEARCH_URL_ENV = "GLM_TUNE_WEB_SEARCH_URL"
DEFAULT_WEB_SEARCH_URL = "https://api.tavily.com/search"
WEB_SEARCH_UNAVAILABLE = f"web search is unavailable: set {WEB_SEARCH_KEY_ENV}"


@dataclass(frozen=True)
class WebSearch:
    """POST {"query", "max_results"} with the key as a bearer token (and in the body, as older Tavily versions want);
    the answer's {"answer"?, "results": [{"title", "url", "content"}]} becomes numbered lines. No key: says so.
    Time-outs, HTTP errors and answers that are not JSON become one line of output."""

    api_key: str | None = None
    url: str = DEFAULT_WEB_SEARCH_URL
    max_results: int = 3
    timeout_s: float = 15.0

    @classmethod
    def from_env(cls, url=None, **settings):
        return cls(api_key=os.environ.get(WEB_SEARCH_KEY_ENV) or None,
                   url=url or os.environ.get(WEB_SEARCH_URL_ENV) or DEFAULT_WEB_SEARCH_URL, **settings)

    @property
    def available(self):
        return bool(self.api_key)

    def __call__(self, query):
        if not self.available:
            return WEB_SEARCH_UNAVAILABLE
        body = json.dumps({"query": query, "max_results": self.max_results, "api_key": self.api_key}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = parse_json(response.read().decode("utf-8", errors="replace"))
        except urllib.error.HTTPError as err:
            return f"web search failed: HTTP {err.code} {err.reason}"
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            return f"web search failed: {getattr(err, 'reason', None) or err}"
        except ValueError:
            return "web search failed: the search API did not answer JSON"
        return format_search_results(answer, self.max_results)


def format_search_results(answer, max_results=3):
    if not isinstance(answer, dict):
        return "web search failed: unexpected answer from the search API"
    lines = [f"answer: {answer['answer']}"] if isinstance(answer.get("answer"), str) and answer["answer"] else []
    results = answer.get("results") if isinstance(answer.get("results"), list) else []
    for i, item in enumerate([r for r in results if isinstance(r, dict)][:max_results], start=1):
        content = " ".join(str(item.get("content", "")).split())[:400]
        lines.append(f"[{i}] {item.get('title', '')} ({item.get('url', '')})\n{content}")
    return "\n".join(lines) or "web search: no results"


# ----------------------------------------------------------------------------------------------------------------------
# knowledge-base search over a chat_langchain index


@dataclass
class KnowledgeSearch:
    """Search a knowledge-base index (APP_example/chat_langchain); None = the sample index, built on first use. The
    index is opened once, on the first search."""

    index_dir: str | None = None
    k: int = 3
    mode: str = "hybrid"
    _kb: object = None

    def open(self):
        if self._kb is None:
            from glm_tune import knowledge_base

            index_dir = self.index_dir or knowledge_base.ensure_sample_index(progress=False)
            self._kb = knowledge_base.KnowledgeBase.open(index_dir)
        return self._kb

    def __call__(self, query):
        hits = self.open().search(query, k=self.k, mode=self.mode)
        if not hits:
            return "knowledge base: no passages found"
        return "\n".join(f"[{i}] {hit.source}#{hit.chunk} (score {hit.score:.2f})\n{' '.join(hit.text.split())[:500]}"
                         for i, hit in enumerate(hits, start=1))


# ----------------------------------------------------------------------------------------------------------------------
# the tool set

TOOL_NAMES = ("kb_search", "calculator", "copywriting", "extract", "web_search")
# name -> (Chinese alias, router prompt line, Chinese + English description)
TOOL_INFO = {
    "kb_search": ("知识库", "查公司文档资料", "知识库检索：公司制度、产品文档等资料中的问题 / search the knowledge base "
                                            "(company policy, product documents)"),
    "calculator": ("计算器", "计算", "计算器：四则运算、乘方、开方 / arithmetic: + - * / // % **, sqrt, abs, round"),
    "copywriting": ("文案", "写推广文案", "文案：为产品或主题写面向不同人群的推广文案 / marketing copy for a product or "
                                          "topic, for ten audiences"),
    "extract": ("抽取", "提取实体关系", "信息抽取：从文本中抽取实体和关系，输出 JSON / extract entities and relations "
                                         "from a text as JSON"),
    "web_search": ("搜索", "上网查新闻天气价格", "联网搜索：新闻、天气、今日价格等最新信息 / web search for news, "
                                                 "weather, today's prices (needs TAVILY_API_KEY)"),
}


def make_tools(llm=None, index_dir=None, web_search=None):
    """name -> Tool, in TOOL_NAMES order. `llm` (any LangChain chat model) writes copy and extracts; without one those
    two tools are left out. `web_search`: a WebSearch (default: from the environment)."""
    web_search = web_search or WebSearch.from_env()
    runs = {"kb_search": KnowledgeSearch(index_dir), "calculator": calculate, "web_search": web_search}
    if llm is not None:
        runs["copywriting"] = lambda text: copywriting(llm, text)
        runs["extract"] = lambda text: extract(llm, text)
    return {name: Tool(name, *TOOL_INFO[name], run=runs[name]) for name in TOOL_NAMES if name in runs}


def as_langchain_tools(tools):
    """The tools as langchain_core StructuredTools (one string argument, `query`); a ToolInputError becomes the
    tool's answer text instead of an exception."""
    from langchain_core.tools import StructuredTool, ToolException

    def wrap(tool):
        def run(query: str) -> str:
            try:
                return tool.run(query)
            except ToolInputError as err:
                raise ToolException(str(err)) from None

        return StructuredTool.from_function(func=run, name=tool.name, description=tool.description,
                                            handle_tool_error=lambda err: f"error: {err}")

    return [wrap(tool) for tool in (tools.values() if isinstance(tools, dict) else tools)]
