"""Errors meant for the user: one line, in their terms (file, line, field, flag), and a non-zero exit, no traceback."""

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
