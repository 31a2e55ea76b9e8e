"""Training: one fold under ``accelerate launch``, and every fold with ``kfold``.

=============== =======================================================================
module          one job
=============== =======================================================================
``loop``        :func:`train`: the fold from set-up to its best model, epochs, resume
``run``         :func:`setup`: accelerator, shards, model, loss, optimiser, loaders
``step``        one training step (accumulation, clipping, EMA) and the optimiser
``epoch``       one epoch from a given step, its logging windows and mid-epoch saves
``validation``  every held-out sample once, for the live and the EMA weights; OOF rows
``meters``      the epoch's running figures and the window between two logs
``state``       the resumable state (``state/``): save, load, finished or not
``checkpoint``  the run folder's files; ``best.safetensors`` + ``model.json``
``preemption``  when to save inside an epoch and when to stop, agreed by every rank
``schedule``    warm-up and cosine warm restarts per step
``monitor``     what goes to TensorBoard
``kfold``       every fold (typed per-fold configs), then predict
=============== =======================================================================
"""
from __future__ import annotations

from maskdist.system.exports import lazy_exports

_EXPORTS = {
    "train": "loop", "setup": "run", "Run": "run", "make_train_loader": "run", "train_step": "step",
    "make_optimizer": "step", "train_epoch": "epoch", "evaluate": "validation", "validate": "validation",
    "EpochTally": "meters", "WindowMeter": "meters", "fold_finished": "state", "has_state": "state",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
