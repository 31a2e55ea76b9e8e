"""User-facing errors: one readable line, no traceback, a non-zero exit from the CLI."""


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 epoch``, ``2 epochs``: a count with its noun, for the lines users read."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def rate(count: int, seconds: float, unit: str = "img/s") -> str:
    """``count`` per second: whole numbers from 100 up, three significant figures below
    (``0.42 img/s`` for a few photos, where a rounded ``0 img/s`` would say nothing ran)."""
    per_s = count / max(seconds, 1e-9)
    return f"{per_s:.0f} {unit}" if per_s >= 100 else f"{per_s:.3g} {unit}"


class MaskdistError(Exception):
    """A problem with the user's input or environment that stops the job.

    The message names the file (or value) at fault and, where there is one, the fix.
    The CLI prints it as a single line and exits with status 2.
    """
