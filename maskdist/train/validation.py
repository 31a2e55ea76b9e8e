"""Validation: every held-out sample once (gathered from all ranks by key) for the live and
the EMA weights, its scores on the true labels, and the out-of-fold table of the best epoch.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator

from maskdist import metrics
from maskdist.data import labels, transforms
from maskdist.errors import MaskdistError
from maskdist.model import heads
from maskdist.system import distributed
from maskdist.train.run import Run


def evaluate(accelerator: Accelerator, model, loader, mean, std, channels_last: bool, head_kind: str = "single") -> pd.DataFrame:
    """Probabilities of every sample of ``loader`` exactly once, gathered from all ranks by key.

    Each rank predicts its own share with the unwrapped model (ranks may hold different
    counts, so no collective runs inside the loop), then ``gather_object`` collects the
    (key, probabilities, labels) rows and duplicates are dropped by key. ``head_kind``: the
    model's heads (18-class probabilities either way, :func:`maskdist.model.heads.probabilities`).
    """
    model.eval()
    rows = []
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            x = transforms.to_device(batch["image"], accelerator.device, mean, std, channels_last)
            probs = heads.probabilities(model(x), head_kind).cpu().numpy()
            for i, key in enumerate(batch["key"]):
                rows.append((key, int(batch["label"][i]), int(batch["label_true"][i]), probs[i].astype(np.float32)))
    gathered = distributed.gather_rows(rows, accelerator)
    frame = pd.DataFrame(gathered, columns=["key", "label", "label_true", "probs"])
    return frame.drop_duplicates("key").sort_values("key").reset_index(drop=True)


def oof_frame(predictions: pd.DataFrame, fold: int) -> pd.DataFrame:
    probs = np.stack(predictions["probs"].to_numpy()) if len(predictions) else np.zeros((0, labels.NUM_CLASSES))
    out = pd.DataFrame({"key": predictions["key"], "fold": fold, "label_true": predictions["label_true"],
                        "label": predictions["label"], "pred": probs.argmax(axis=1) if len(probs) else []})
    for c in range(labels.NUM_CLASSES):
        out[f"p{c:02d}"] = probs[:, c] if len(probs) else []
    return out


def nonfinite_rows(predictions: pd.DataFrame) -> int:
    """Samples whose probabilities are not finite: the model's logits were NaN or inf on them."""
    probs = np.stack(predictions["probs"].to_numpy()) if len(predictions) else np.zeros((0, labels.NUM_CLASSES))
    return int((~np.isfinite(probs).all(axis=1)).sum())


NONFINITE_CAUSES = ("a learning rate too high (--lr), fp16 overflow (--precision bf16 or no) or broken pretrained weights"
                    " (--pretrained)")


def nonfinite_stop(fold) -> str:
    """Why a run whose every epoch gave non-finite validation logits ends without a model."""
    return (f"fold {fold}: every epoch's validation gave non-finite logits (NaN or inf), so there is no best model to save;"
            f" likely causes: {NONFINITE_CAUSES}; change one and train the fold again with --overwrite")


def sync_buffers(run: Run) -> None:
    """Average the floating-point buffers (BatchNorm statistics) of the live model and of the
    EMA over the ranks, as timm's ``distribute_bn`` does at each epoch's end.

    DDP keeps the weights equal but broadcasts buffers only at a forward's start, so after
    the last step each rank holds the statistics of its own batches: without this, each rank
    would validate its share with other statistics, and ``best.safetensors`` would hold rank
    0's. One all-reduce per model, of all its buffers flattened together.
    """
    if run.accelerator.num_processes == 1:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    models = [run.module] + ([run.ema.module] if run.ema is not None else [])
    with torch.no_grad():
        for model in models:
            buffers = [b for b in model.buffers() if b.is_floating_point()]
            if not buffers:
                continue
            flat = _flatten_dense_tensors(buffers)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= run.accelerator.num_processes
            for buffer, averaged in zip(buffers, _unflatten_dense_tensors(flat, buffers)):
                buffer.copy_(averaged)


def validate(run: Run, epoch: int) -> dict[str, tuple[pd.DataFrame, metrics.Scores]]:
    """Every validation sample once (gathered by key) and its scores on the true labels, for
    the live weights (``"live"``) and, when kept, the EMA weights (``"ema"``)."""
    models = {"live": run.module}  # the plain module: no DDP collective, no recompilation
    if run.ema is not None:
        models["ema"] = run.ema.module
    out = {}
    for name, model in models.items():
        predictions = evaluate(run.accelerator, model, run.val_loader, run.mean, run.std, run.channels_last, run.cfg.heads)
        if not len(predictions):
            raise MaskdistError(f"fold {run.cfg.fold} of {run.cfg.shards} has no validation samples: rebuild the shards with"
                                " more people per fold")
        out[name] = predictions, metrics.score(predictions["label_true"], np.stack(predictions["probs"].to_numpy()).argmax(axis=1))
    run.model.train()
    return out
