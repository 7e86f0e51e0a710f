"""The tool-using agent in the browser: type a request, watch ChatGLM pick tools step by step (each step's tool, input
and output in an expander), then read its answer as it streams in. The sidebar lists the tools and whether web
search is on.

    streamlit run APP_example/chatglm_agent/app.py                     # embedded model + trained router
    streamlit run APP_example/chatglm_agent/app.py -- --model_name_or_path THUDM/chatglm-6b --index_dir kb_index

The flags after `--` are agent.py's (the operator's choice; a bad one is shown as one line on the page). The models
are loaded once per server and shared by every session; on the embedded model the first start trains the router
adapter (about 2-3 minutes on 2 CPU cores, then cached).
"""

import argparse
import sys

import streamlit as st

from glm_tune.agent import build_agent, build_parser, check_args
from glm_tune.agent_tools import WebSearch
from glm_tune.errors import UserError
from webui.common import PageArgumentParser

PAGE = "app.py"


def server_args():
    """The operator's flags (`streamlit run app.py -- flags`); a bad one raises UserError."""
    parser = build_parser(prog=PAGE, description="tool-using agent page; flags go after `--`",
                          parser_class=PageArgumentParser)
    args = parser.parse_args(sys.argv[1:])
    check_args(args)
    return args


@st.cache_resource(show_spinner="Loading the models (once per server; on the embedded model the first start trains "
                                "the router, about 2-3 minutes)…")
def load_agent(settings):
    """The Agent for these flags (a tuple of items), its models loaded; shared by every session."""
    agent = build_agent(argparse.Namespace(**dict(settings)))
    agent.router_llm.load()
    agent.llm.load()
    return agent


def show_step(number, step):
    fallback = " · fallback (the model's choice could not be read)" if step.get("fallback") else ""
    with st.expander(f"Step {number}: {step['tool']}{fallback}", expanded=False):
        st.markdown("**Input**")
        st.text(step["input"])
        st.markdown("**Output**")
        st.text(step["output"])


def show_turn(turn):
    for number, step in enumerate(turn["steps"], start=1):
        show_step(number, step)
    st.markdown(turn["answer"] or "_(empty answer)_")


def sidebar(agent, args):
    st.sidebar.subheader("Tools")
    web = agent.tools["web_search"].run
    for tool in agent.tools.values():
        state = ""
        if tool.name == "web_search":
            state = " — **on**" if isinstance(web, WebSearch) and web.available else " — off (set TAVILY_API_KEY)"
        st.sidebar.markdown(f"**{tool.name}**{state}  \n{tool.description}")
    router = agent.router_llm.lora_path or "none (the tool menu in the prompt)"
    st.sidebar.caption(f"Router adapter: {router} · at most {agent.max_steps} steps · fallback tool: "
                       f"{agent.fallback_tool}")


st.set_page_config(page_title="ChatGLM agent", layout="wide")
st.title("ChatGLM agent")
try:
    args = server_args()
    agent = load_agent(tuple(sorted(vars(args).items())))
except UserError as err:
    st.error(f"error: {err}")
    st.stop()
if args.model_name_or_path is None:
    st.info("This is the embedded small demo model (random weights) with a router adapter trained to pick tools: the "
            "tool choices and tool results are real, the model's own words (answers, copy) are noise. Start the "
            "server with `-- --model_name_or_path THUDM/chatglm-6b` for real answers.", icon="ℹ️")
sidebar(agent, args)

history = st.session_state.setdefault("history", [])  # traces
if st.sidebar.button("Clear conversation", key="clear"):
    history.clear()

for turn in history:
    st.chat_message("user").markdown(turn["question"])
    with st.chat_message("assistant"):
        show_turn(turn)

if request := st.chat_input("Ask something (e.g. 3加5乘2等于多少, 婚假有几天？, 给保温杯写一段文案)", key="request"):
    request = request.strip()
    st.chat_message("user").markdown(request)
    with st.chat_message("assistant"):
        shown = []

        def on_step(step):  # each step appears as soon as its tool has run
            shown.append(step)
            show_step(len(shown), step)

        try:
            with st.spinner("Choosing tools…"):
                steps, stopped = agent.plan(request, on_step=on_step)
            placeholder, answer = st.empty(), ""
            for piece in agent.stream_answer(request, steps):
                answer += piece
                placeholder.markdown(answer + " ▌")
            placeholder.markdown(answer or "_(empty answer)_")
        except UserError as err:
            st.error(f"error: {err}")
            st.stop()
    history.append({"question": request, "answer": answer, "steps": steps, "stopped": stopped})
