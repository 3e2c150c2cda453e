"""The one exception type for bad user input.

The CLI turns a `UserError` into a single line on stderr and exit code 2, so bad input never
shows a traceback from deep inside torch, pyarrow or Ray.
"""


class UserError(Exception):
    """Bad input from the user: a config, a path, an option. The message is one line."""

    exit_code = 2
