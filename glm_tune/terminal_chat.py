"""The terminal chat loop that cli_chat.py and the knowledge-base chat share: a prompt per turn, `clear` starts a new
conversation, `stop` or end of input ends it."""


def terminal_chat(stdin, out, banner, reply, speaker="ChatGLM"):
    """Read questions from `stdin` until `stop` or end of input; `reply(question, history) -> history` writes the
    answer to `out` and returns the history with this turn. -> the final history [(question, answer)]."""
    out.write(banner + "\n")
    history = []
    while True:
        out.write("\n用户：")
        out.flush()
        line = stdin.readline()
        if not line:  # end of input
            out.write("\n")
            return history
        question = line.strip()
        if question == "stop":
            return history
        if question == "clear":
            history = []
            out.write("(new conversation)\n")
        elif question:
            out.write(f"\n{speaker}：")
            history = reply(question, history)
