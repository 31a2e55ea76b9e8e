"""What learns: the timm factory, pretrained weights, part heads, losses, mixup/cutmix and the EMA.

=============== =====================================================================
module          one job
=============== =====================================================================
``factory``     timm model with an 18-way or part head, pretrained weights from a file
``weights``     ``--pretrained``: hub, repo, file or none; the Hugging Face cache, offline
``heads``       part heads (mask, gender, age) and their product, 18-class probabilities
``losses``      focal loss with class weights (hard or soft targets), CE, soft macro F1,
                and the per-part loss of part heads
``mixing``      mixup / cutmix on the device (timm's ``Mixup``)
``ema``         the EMA of the weights (timm's ``ModelEmaV3``)
=============== =====================================================================
"""
from __future__ import annotations

from maskdist.system.exports import lazy_exports

_EXPORTS = {"create_model": "factory", "normalisation": "factory", "prepare_for_device": "factory"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
