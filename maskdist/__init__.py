"""maskdist: distributed face-mask classification (18 classes: mask x gender x age)."""

import os

__version__ = "0.1.0"

# albumentations looks for a newer release of itself on import (in every loader worker): on a
# node without network that is a warning and up to 2 s each time. The user's own setting wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
