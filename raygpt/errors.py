"""The exception types the CLI turns into one line: bad user input, and training that failed.

The CLI turns a `UserError` into a single line on stderr and exit code 2, so bad input never
shows a traceback from deep inside torch, pyarrow or Ray.
"""


class UserError(Exception):
    """Bad input from the user: a config, a path, an option. The message is one line."""

    exit_code = 2


class TrainingFailed(Exception):
    """Training itself failed (a worker error Ray could not recover from, a non-finite loss).
    Exit code 1."""

    exit_code = 1


class Interrupted(Exception):
    """The user stopped a run or search (Ctrl-C / SIGINT) and its state was saved: the message says
    how to continue it. Exit code 130, as a shell reports a process ended by SIGINT."""

    exit_code = 130
