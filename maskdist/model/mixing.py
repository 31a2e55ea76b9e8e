"""Mixup / CutMix on the normalised batch on the device, with timm's ``Mixup``.

Mixing needs float pixels, so it runs after :func:`maskdist.data.transforms.to_device`, not in
the uint8 loader. It turns the class indices into soft 18-class targets, label-smoothed by
timm (``off = smoothing / C``, ``on = 1 - smoothing + off``, then mixed): losses take such
targets as given and do not smooth them again.

Randomness: timm draws lambda, the mixup/cutmix switch and the box from **numpy's global
RNG** (``np.random``), not torch's and not a generator of its own. Seeding numpy
(``np.random.seed`` or accelerate's ``set_seed``) makes mixing reproducible; under DDP give
every rank its own numpy seed, or all ranks draw the same lambdas and boxes.
"""
from __future__ import annotations

import torch
from timm.data import Mixup

from maskdist.data.labels import NUM_CLASSES
from maskdist.errors import MaskdistError

MODES = ("batch", "pair", "elem")


class Mixer:
    """``mixer(x, target) -> (x, soft_target)``; a pass-through when both alphas are 0.

    * ``mixup_alpha`` / ``cutmix_alpha``: Beta(alpha, alpha) for lambda; 0 turns a method off.
      With both on, each mix is cutmix with probability ``switch_prob``, else mixup.
    * ``prob``: probability that a batch (mode ``batch``) or a sample is mixed at all; an
      unmixed batch still gets label-smoothed soft targets.
    * ``mode``: one lambda per ``batch``, per ``pair``, or per ``elem`` (sample).

    timm mixes a sample with the one at the mirrored position (``x.flip(0)``) and needs an
    even batch: an odd batch mixes its first ``N - 1`` samples and leaves the last one
    unmixed, with the smoothed one-hot target (so every sample still trains). ``x`` is
    mixed in place, as timm does. Disabled, the mixer returns ``x`` and the class indices
    untouched, and the loss applies its own label smoothing to them.
    """

    def __init__(self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, label_smoothing: float = 0.0,
                 num_classes: int = NUM_CLASSES, prob: float = 1.0, switch_prob: float = 0.5, mode: str = "batch"):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise MaskdistError(f"mixup and cutmix alphas must be >= 0 (got {mixup_alpha}, {cutmix_alpha}): 0 turns one off")
        if not (0.0 <= prob <= 1.0 and 0.0 <= switch_prob <= 1.0 and 0.0 <= label_smoothing < 1.0):
            raise MaskdistError(f"mix probability {prob} and switch probability {switch_prob} must be in [0, 1]"
                                f" and label smoothing {label_smoothing} in [0, 1)")
        if mode not in MODES:
            raise MaskdistError(f"unknown mix mode {mode!r}: choose one of {', '.join(MODES)}")
        self.num_classes, self.label_smoothing = int(num_classes), float(label_smoothing)
        self.enabled = mixup_alpha > 0 or cutmix_alpha > 0
        self._mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                            mode=mode, label_smoothing=label_smoothing, num_classes=self.num_classes) if self.enabled else None

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return x, target
        if target.ndim != 1 or len(target) != len(x):
            raise ValueError(f"mixing needs one class index per image, got targets {tuple(target.shape)} for {len(x)} images")
        even = len(x) - len(x) % 2
        soft = self._smoothed_one_hot(target)
        if even:
            head = x[:even]
            # timm draws from np.random (the global numpy RNG) and mixes the view in place
            mixed, soft[:even] = self._mixup(head, target[:even])
            if mixed is not head:
                x[:even] = mixed
        return x, soft

    def _smoothed_one_hot(self, target: torch.Tensor) -> torch.Tensor:
        off = self.label_smoothing / self.num_classes
        soft = torch.full((len(target), self.num_classes), off, device=target.device)
        return soft.scatter_(1, target.long().view(-1, 1), 1.0 - self.label_smoothing + off)
