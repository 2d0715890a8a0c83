"""The errors a user can see, each with its exit code.

Every error raised for bad input names the file (and line or key) and what is
wrong; the CLI prints the message alone, without a traceback.
"""


class PipelineError(Exception):
    """Base of the errors the CLI reports as one clear message."""

    exit_code = 2


class InputError(PipelineError):
    """A file, flag or setting given by the user is missing or malformed."""

    exit_code = 2


class GateFailed(PipelineError):
    """A stage's artifact broke its parity gate: nothing after it is shipped."""

    exit_code = 3


class EngineRequired(PipelineError):
    """--require-engine was given but no TensorRT engine could be built here."""

    exit_code = 4


class Interrupted(BaseException):
    """SIGTERM (or another stop signal) arrived during a build; like KeyboardInterrupt, not an Exception to be caught by accident."""

    def __init__(self, signal_name: str, exit_code: int):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = exit_code
