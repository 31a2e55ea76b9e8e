"""Moved: the transforms are :mod:`maskdist.data.transforms` (this name warns once and re-exports them)."""
import warnings

from maskdist.data.transforms import *  # noqa: F403
from maskdist.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RECIPE_MEAN, RECIPE_STD, Transform, build_transform, to_device  # noqa: F401

warnings.warn("maskdist.transforms moved to maskdist.data.transforms: import it from there", FutureWarning, stacklevel=2)
