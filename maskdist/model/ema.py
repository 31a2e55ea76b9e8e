"""An exponential moving average of the model's weights, with timm's ``ModelEmaV3``.

The averaged weights usually score better and more steadily than the last step's. Each
optimizer step does ``ema = decay * ema + (1 - decay) * live`` on every floating-point
parameter and buffer (BatchNorm statistics included); integer buffers are copied. The time
constant is about ``1 / (1 - decay)`` optimizer steps (0.999: the last ~1000 steps), so pick
``decay`` from the run's step count.

Build it from the unwrapped model once that sits on its device (timm deep-copies the model:
a DDP or compiled wrapper would be copied too), and update it with the unwrapped model after
each optimizer step: timm pairs the two state dicts by position, not by name.
"""
from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn

from maskdist.errors import MaskdistError


class Ema:
    """EMA weights of ``model``; ``module`` is the averaged copy (eval mode) to evaluate or save.

    * ``warmup``: timm's warmup decay ``1 - step^-warmup_power``, capped at ``decay`` (needs
      ``step`` in :meth:`update`), so early averages do not hold on to the first weights.
    * ``device``: keep the average elsewhere (``"cpu"`` saves accelerator memory, slower).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False, warmup_power: float = 2 / 3,
                 device: torch.device | str | None = None):
        if not 0.0 <= decay < 1.0:
            raise MaskdistError(f"EMA decay {decay} must be in [0, 1): e.g. 0.999 averages over ~1000 steps")
        self._ema = ModelEmaV3(model, decay=decay, use_warmup=warmup, warmup_power=warmup_power,
                               device=None if device is None else torch.device(device))

    @property
    def module(self) -> nn.Module:
        return self._ema.module

    def decay(self, step: int | None = None) -> float:
        """The decay ``update`` uses at ``step``."""
        return self._ema.get_decay(step)

    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Fold ``model``'s weights in after an optimizer step.

        ``step``: optimizer steps done (1 after the first). With a step, timm uses decay 0 (a
        plain copy of ``model``) at steps 0 and 1, then ``decay`` (or the warmup decay);
        without one, always ``decay``, starting from the weights the EMA was built with.
        """
        self._ema.update(model, step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's own names: tensors only (safetensors, or
        ``torch.save`` loaded with ``weights_only=True``), loadable into a fresh model too."""
        return {k: v.detach().clone().contiguous() for k, v in self._ema.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._ema.module.load_state_dict(state)
