"""Chat with ChatGLM (plus an optional LoRA adapter): streamed answers, history, generation settings.

    streamlit run webui/web_ui.py --server.port 6006
    streamlit run webui/web_ui.py -- --model_name_or_path /models/chatglm-6b --lora_path output
"""

import streamlit as st

from glm_tune.errors import UserError
from webui.common import page_config, sidebar_model, sidebar_settings, stream_answer

config = page_config("ChatGLM chat", "web_ui.py")
st.title("ChatGLM chat")
model_choice = sidebar_model(config)
settings = sidebar_settings(config)
history = st.session_state.setdefault("history", [])  # [(question, answer), ...], ChatGLM's chat history
if st.sidebar.button("Clear history", key="clear"):
    history.clear()

for question, answer in history:
    st.chat_message("user").markdown(question)
    st.chat_message("assistant").markdown(answer)

if question := st.chat_input("Ask ChatGLM", key="question"):
    st.chat_message("user").markdown(question)
    try:
        answer, seconds = stream_answer(model_choice, question, list(history), settings, config,
                                        st.chat_message("assistant").empty())
    except UserError as err:
        st.error(f"error: {err}")
        st.stop()
    history.append((question, answer))
    st.caption(f"{seconds:.2f} s")
