"""What a fold's run folder holds, and the best model in it: ``best.safetensors`` beside
``model.json``.

``model.json`` says everything prediction needs (architecture, input size, normalisation,
class map, age cut, fold, epoch, metrics), so a folder is self-describing. Weights are
safetensors only: loading them cannot run code.

The other files of a run folder (written by :mod:`maskdist.train`): ``oof.csv`` (out-of-fold
probabilities of the best epoch), ``config.yaml`` (the resolved configuration), ``state/``
(the resumable state) and ``tb/`` (TensorBoard events).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from maskdist.data import labels
from maskdist.errors import MaskdistError
from maskdist.system.fileio import atomic_path, atomic_write_json
from maskdist.train.run_folder import CONFIG, MODEL_JSON, OOF, STATE, TENSORBOARD, TRAINER_STATE, WEIGHTS  # noqa: F401  (the names, kept importable from here)

FORMAT = "maskdist-model"
FORMAT_VERSION = 1


def model_card(architecture: str, resize: int, crop: int, mean, std, age_cut: int, fold: int, epoch: int, metrics: dict, drop_rate: float,
               heads: str = "single", pretrained: dict | None = None) -> dict:
    """``heads``: ``single`` (18 logits) or ``parts`` (8 part logits, see :mod:`maskdist.model.heads`);
    ``pretrained``: where the starting weights came from (:attr:`maskdist.model.weights.Weights.record`)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "num_classes": labels.NUM_CLASSES,
        "drop_rate": drop_rate,
        "heads": heads,
        "image": {"resize": resize, "crop": crop},
        "normalisation": {"mean": list(mean), "std": list(std)},
        "classes": [labels.class_name(c) for c in range(labels.NUM_CLASSES)],
        "class_code": "mask*6 + gender*3 + age_group",
        "age_cut": age_cut,
        "metric_age_cut": labels.METRIC_AGE_CUT,
        "fold": fold,
        "epoch": epoch,
        "metrics": metrics,
        "pretrained": pretrained or {"source": "none"},
    }


def save(run_dir: Path, model: nn.Module, card: dict) -> None:
    """Write the weights, then the card; each atomically (a kill keeps the previous pair).

    The weights are the plain module's (under any DDP or ``torch.compile`` wrapper), so their
    names are the architecture's own and :func:`load` fits them into a fresh model."""
    from maskdist.model.factory import plain_module

    state = {k: v.detach().contiguous().cpu() for k, v in plain_module(model).state_dict().items()}
    with atomic_path(run_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "epoch": str(card["epoch"])})
    atomic_write_json(run_dir / MODEL_JSON, card)


def update_card(run_dir: Path, values: dict) -> None:
    """Merge ``values`` into an existing ``model.json`` (atomically); nothing without one."""
    path = Path(run_dir) / MODEL_JSON
    if path.is_file():
        atomic_write_json(path, read_card(run_dir) | values)


def read_card(run_dir: Path) -> dict:
    path = Path(run_dir) / MODEL_JSON
    if not path.is_file():
        raise MaskdistError(f"{path} not found: the fold has no saved model; train it with `maskdist train`")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MaskdistError(f"{path} is not valid JSON ({err}): retrain the fold") from None
    if card.get("format") != FORMAT or card.get("format_version") != FORMAT_VERSION:
        raise MaskdistError(f"{path} is not a maskdist model card of version {FORMAT_VERSION}: retrain the fold")
    return card


def load(run_dir: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The model of a run folder (eval mode) and its card."""
    from maskdist.model.factory import create_model, strip_wrapper_prefixes

    run_dir = Path(run_dir)
    card = read_card(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise MaskdistError(f"{weights} not found: the fold has no saved weights; train it with `maskdist train`")
    model = create_model(card["architecture"], card["num_classes"], card.get("drop_rate", 0.0), warn_random=False,
                         heads=card.get("heads", "single"))  # cards before part heads have none
    try:
        state = strip_wrapper_prefixes(load_file(str(weights), device="cpu"))
    except (SafetensorError, OSError) as err:
        raise MaskdistError(f"{weights} cannot be read ({err}): retrain the fold") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise MaskdistError(f"{weights} does not fit {card['architecture']} ({str(err).splitlines()[0]}): retrain the fold") from None
    return model.to(device).eval(), card
