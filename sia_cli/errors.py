"""Errors the CLI turns into one line on stderr and a non-zero exit code."""

INTERRUPTED = 130  # the shell's exit code for Ctrl-C
UNFIT = 4  # `sia sdar`: the report's backbone does not fit its images, so the gate cannot pass


class SiaError(Exception):
    """Bad input or environment: the message is shown to the user as is."""

    exit_code = 2
    shared = False  # raised alike on every torchrun rank (see distributed.agree)

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
