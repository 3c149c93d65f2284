"""Errors the CLI turns into one line on stderr and a non-zero exit code."""

INTERRUPTED = 130  # the shell's exit code for Ctrl-C
TERMINATED = 143  # 128 + SIGTERM: a run stopped by SIGTERM (CI cancellation, docker stop, Slurm)
UNFIT = 4  # `sia sdar`: the report's backbone does not fit its images, so the gate cannot pass
FEW_IMAGES = 5  # `sia sdar`: the report counted too few images for a finding (sensitivity.MIN_COUNTED_IMAGES)
STOPPED_BY: dict = {"signal": None}  # set by the CLI's SIGTERM handler, which then raises KeyboardInterrupt


def interrupted_code() -> int:
    """130 after Ctrl-C, 143 after SIGTERM: both stop a run the same way, the code tells which."""
    import signal

    return TERMINATED if STOPPED_BY["signal"] == getattr(signal, "SIGTERM", None) else INTERRUPTED


class SiaError(Exception):
    """Bad input or environment: the message is shown to the user as is."""

    exit_code = 2
    shared = False  # raised alike on every torchrun rank (see distributed.agree)

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ModelRaised(SiaError):
    """The target model raised in its forward (models often check their input there). A run
    retries the batch one image at a time and marks the images it raises on as failed."""

    def __init__(self, detail: str):
        super().__init__(f"the model raised an error: {detail}")
