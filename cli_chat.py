"""Chat with ChatGLM-6B in the terminal: the answer streams in as it is generated, and the conversation is kept.

    python cli_chat.py                                            # the embedded model
    python cli_chat.py --model_name_or_path /models/chatglm-6b --lora_path output

Type a message and press Enter. 'clear' starts a new conversation; 'stop' (or Ctrl-D) quits. Earlier turns are
sent with each message in ChatGLM's [Round i] format, like the official chat().
"""

import argparse
import sys

import torch

from glm_tune.arguments import add_compile_argument, add_model_arguments, add_sampling_arguments
from glm_tune.errors import exit_on_user_error
from glm_tune.loading import load_model_and_tokenizer
from glm_tune.terminal_chat import terminal_chat

BANNER = "ChatGLM-6B: type a message and press Enter; 'clear' starts a new conversation, 'stop' quits."
# clean_response() turns these into full-width marks once a Chinese character follows them, so a streamed answer
# ending in one may still change: it is shown when the next token has arrived.
_MAY_STILL_CHANGE = tuple(",!:;?")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, ptuning=True)
    add_compile_argument(parser)
    add_sampling_arguments(parser, do_sample=True, max_length=True)
    return parser.parse_args(argv)


def stream_answer(model, tokenizer, query, history, out, **generation):
    """Write the answer to `out` as it grows; returns the new history."""
    shown, response, new_history = "", "", history + [(query, "")]
    for response, new_history in model.stream_chat(tokenizer, query, history, **generation):
        stable = response[:-1] if response.endswith(_MAY_STILL_CHANGE) else response
        if stable.startswith(shown):
            out.write(stable[len(shown):])
            out.flush()
            shown = stable
    out.write(response[len(shown):] if response.startswith(shown) else "\n" + response)
    out.write("\n")
    return new_history


@exit_on_user_error
def main(argv=None, stdin=None, out=None):
    args = parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args.lora_path, args.dtype,
                                                merge_adapter=True, revision=args.revision,
                                                ptuning_checkpoint=args.ptuning_checkpoint,
                                                pack_for_cpu=True, compile_decoding=args.compile_decoding)
    if torch.cuda.is_available():
        model = model.cuda()
    generation = dict(max_length=args.max_length, do_sample=args.do_sample, temperature=args.temperature,
                      top_p=args.top_p)
    return terminal_chat(stdin, out, BANNER,
                         lambda query, history: stream_answer(model, tokenizer, query, history, out, **generation))


if __name__ == "__main__":
    main()
