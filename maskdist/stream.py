"""Moved: the shard streams are :mod:`maskdist.streams` (this name warns once and re-exports them)."""
import warnings

from maskdist.streams import *  # noqa: F403
from maskdist.streams import __all__  # noqa: F401

warnings.warn("maskdist.stream moved to maskdist.streams: import it from there", FutureWarning, stacklevel=2)
