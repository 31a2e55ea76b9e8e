"""Switches that make CUDA fast for this workload, set once per process (CUDA only; nothing
here runs on a CPU machine, so it is kept apart and small).

- ``cudnn.benchmark``: training batches always have one shape (every step is a full batch),
  so cuDNN may time its convolution algorithms once and keep the fastest.
- TF32 for float32 matmuls and convolutions (Ampere and newer): float32 runs (``--precision
  no``) and the float32 parts of mixed precision use tensor cores, as timm's training does.
"""
from __future__ import annotations


def tune(device) -> bool:
    """Set the switches when ``device`` is a CUDA device; returns whether it did."""
    import torch

    if torch.device(device).type != "cuda":
        return False
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True
