"""Errors meant for the user: one line, in their terms (file, line, field, flag), and a non-zero exit, no traceback;
warnings likewise one line, `warning: ...` on stderr, for what a run skips and goes on without."""

import functools
import sys


class UserError(ValueError):
    """Bad input from the user (a file, a flag, a folder). Its message is the whole story, on one line."""


def exit_on_user_error(main):
    """Run a script's main(); a UserError becomes `error: message` on stderr and exit status 2."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return run


def first_line(err):
    """An exception's message cut to its first line (what a one-line error quotes), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def warn(message, warnings=None):
    """`warning: message` on stderr, and kept in `warnings` (a list) for callers that show them elsewhere."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
    if warnings is not None:
        warnings.append(message)
