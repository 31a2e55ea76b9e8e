"""maskdist: distributed face-mask classification (18 classes: mask x gender x age)."""

__version__ = "0.1.0"
