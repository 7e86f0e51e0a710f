"""Ask a knowledge base questions in the terminal: ChatGLM answers from the passages retrieved for each question and
lists them as its sources (file and chunk).

    python APP_example/chat_langchain/kb_chat.py                          # the sample knowledge base, sample question
    python APP_example/chat_langchain/kb_chat.py --index_dir kb_index     # chat (when stdin is a terminal)
    python APP_example/chat_langchain/kb_chat.py --index_dir kb_index --question "年假有几天？" --json
    python APP_example/chat_langchain/kb_chat.py --index_dir kb_index --model_name_or_path THUDM/chatglm-6b \\
        --lora_path output --retriever hybrid --k 4

Without --index_dir the shipped sample knowledge base (sample_kb/) is indexed into the glm-tune cache on first use.
Without --question: a chat when stdin is a terminal (or with --interactive; 'clear' starts over, 'stop' quits),
otherwise the sample question is answered once. In a chat, a follow-up is first rewritten by the model into a
standalone question using the conversation; retrieval searches for that question followed by the follow-up as
typed, so a poor rewrite cannot lose your keywords. Build an index of your own documents with build_kb.py.

Without --model_name_or_path this runs the embedded small demo model: random weights, so its answers are noise, but
the retrieval and the sources are real.
"""

from glm_tune.errors import exit_on_user_error
from glm_tune.kb_chat import build_parser, run


@exit_on_user_error
def main(argv=None, stdin=None, out=None):
    return run(build_parser(__doc__).parse_args(argv), stdin, out)


if __name__ == "__main__":
    main()
