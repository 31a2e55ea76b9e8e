"""The full-data model (``--fold all``): every fold trains and none is held out, for the
number of epochs cross-validation chose.

Without validation there is no best epoch to keep: the model of the last finished epoch
(the EMA's when there is one) is ``best.safetensors``, saved at every epoch's end with its
card (``"validation": false``, where its epoch count came from), and no OOF file is written.
``--epochs-from RUNS`` takes the epoch count from a finished k-fold experiment: the median of
its folds' best epochs (as their ``model.json`` files record), counted from 1.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from maskdist import config as config_mod
from maskdist.errors import MaskdistError
from maskdist.train import checkpoint, monitor
from maskdist.train.epoch_end import epoch_figures, save_model
from maskdist.train.meters import EpochTally
from maskdist.train.run import Run
from maskdist.train.state import fold_finished
from maskdist.train.validation import sync_buffers


def epochs_from(experiment: str | Path) -> tuple[int, dict]:
    """(epochs, where they came from): the median best epoch of the experiment's finished
    folds, as an epoch count (best epoch 4, the fifth, is 5 epochs; a median between two
    counts rounds up)."""
    experiment = Path(experiment)
    runs = sorted(p for p in experiment.glob("fold*") if p.name[4:].isdigit())
    finished = [run for run in runs if fold_finished(run)]
    left = [run.name for run in runs if run not in finished]
    if not finished or left:
        raise MaskdistError(f"--epochs-from {experiment}: {'fold(s) ' + ', '.join(left) + ' are not finished' if left else 'no finished fold'}"
                            " there: train every fold first (maskdist kfold), or give --epochs")
    best = {run.name: int(json.loads((run / checkpoint.MODEL_JSON).read_text())["epoch"]) + 1 for run in finished}
    epochs = math.ceil(statistics.median(best.values()))
    return epochs, {"experiment": str(experiment), "best_epochs": best, "median": statistics.median(best.values()),
                    "epochs": epochs}


def resolve_epochs(cfg: config_mod.TrainConfig) -> tuple[config_mod.TrainConfig, dict | None]:
    """``cfg`` with ``--epochs`` from ``--epochs-from`` when given; and the source, if any."""
    import dataclasses

    if not cfg.epochs_from:
        return cfg, None
    epochs, source = epochs_from(cfg.epochs_from)
    return dataclasses.replace(cfg, epochs=epochs), source


def finish_full_epoch(run: Run, epoch: int, tally: EpochTally, skipped_history: dict, epochs_source: dict | None) -> dict:
    """Close an epoch of the full-data model: its line and scalars, and its weights as the
    model (the EMA's when kept); returns what stands for the best (this epoch)."""
    accelerator = run.accelerator
    figures = epoch_figures(run, epoch, tally, skipped_history)
    sync_buffers(run)  # the saved model's BatchNorm statistics: the average of the ranks'
    weights = "ema" if run.ema is not None else "live"
    best = {"macro_f1": None, "epoch": epoch, "weights": weights}
    if run.main:
        accelerator.log(monitor.scalars(figures["scalars"]), step=(epoch + 1) * run.steps_per_epoch)
        accelerator.print(f"epoch {epoch}: loss {figures['loss']:.4f}, {figures['rate']:.0f} img/s, data wait"
                          f" {100 * figures['wait']:.1f}%, no validation (full-data model)" + figures["skipped_text"])
        save_model(run, config_mod.FULL_DATA, epoch, best, skipped_history, validation=False, epochs_from=epochs_source)
    return best
