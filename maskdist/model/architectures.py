"""timm's architecture names: a name that is not one is refused with the closest ones, so a
typo reads as a typo (not as "no hub weights", or a download that cannot succeed)."""
from __future__ import annotations

import difflib

from maskdist.errors import MaskdistError


def check(name: str) -> str:
    """``name`` (an architecture, or ``arch.tag``) if timm knows its architecture; else one
    line with the closest names."""
    import timm

    architecture = name.split(".", 1)[0]
    if timm.is_model(architecture):
        return name
    close = difflib.get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()` for the names"
    raise MaskdistError(f"unknown architecture {name!r} (timm has no model of that name): {hint}")
