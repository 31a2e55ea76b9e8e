"""User-facing errors: one readable line, no traceback, a non-zero exit from the CLI."""


class MaskdistError(Exception):
    """A problem with the user's input or environment that stops the job.

    The message names the file (or value) at fault and, where there is one, the fix.
    The CLI prints it as a single line and exits with status 2.
    """
