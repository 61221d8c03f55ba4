"""The one exception family the command line turns into a single line without a traceback: a bad
input (config key, task file, dataset folder, run directory, checkpoint) whose message names the
file, task or key at fault. Anything else is a bug and keeps its traceback."""


class InputError(Exception):
    """Bad input; the message names the culprit and says what to do."""


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; the message says where."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum
