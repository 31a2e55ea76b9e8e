"""``maskdist export``: fold models out of the run folder, in forms other tools load.

``timm``: each fold model in timm's hub layout (``config.json`` with the 18 label names, and
the preprocessing with which timm's own ``resolve_data_config`` + ``create_transform`` make
maskdist's input: :func:`timm_data_config`; ``model.safetensors``), written by timm's own ``save_for_hf``,
so ``timm.create_model("local-dir:DIR")`` (or ``hf-hub:`` after a push) rebuilds it. A model
with part heads becomes a plain 18-way classifier: the class logit is the sum of its three
part logits, whose softmax is exactly the product of the part probabilities.

``onnx``: the whole ensemble as one graph. Input: ``image``, uint8 RGB NHWC at the models'
input size: the photo squashed to ``resize`` x ``resize`` (aspect ratio not kept, bilinear),
then centre-cropped to ``crop``, as ``model.json`` says and the file's ``maskdist.input``
metadata repeats; inside: each model's normalisation, TTA when asked, each model's 18-class
probabilities (part heads as products), the weighted mean. Outputs: ``probs`` (N, 18) and
``label`` (N), the decisions' class (``argmax_c w_c p_c``, as ``predict`` decides).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from maskdist.config import TTAS
from maskdist.data import labels
from maskdist.errors import MaskdistError
from maskdist.infer import decisions as decisions_mod, finite
from maskdist.infer.ensemble import Ensemble, Member, load_ensemble
from maskdist.infer.members import find_members
from maskdist.model import heads as heads_mod
from maskdist.model.factory import create_model
from maskdist.shards import crop as face_crop
from maskdist.system.fileio import atomic_path, give_plain_modes, make_temp_dir, replace_dir

FORMATS = ("timm", "onnx")
ONNX_OPSET = 17


def _ensemble(sources, weighting: str, decisions: str, allow_unfinished: bool,
              allow_nonfinite: bool = False) -> tuple[Ensemble, decisions_mod.Applied, dict]:
    """The ensemble, its decisions, and the models with non-finite weights or output (run -> why)."""
    runs = find_members(sources, allow_unfinished)
    applied = decisions_mod.resolve(decisions, runs, list(dict.fromkeys(r.experiment for r in runs)))
    ensemble = load_ensemble(runs, weighting, "cpu", allow_unfinished, applied.experiment_weights)
    _warn_of_face_crops(ensemble)
    broken = nonfinite_models(ensemble)
    if broken and not allow_nonfinite:
        raise MaskdistError(f"{'; '.join(f'{run}: {why}' for run, why in broken.items())}: the model's weights are broken, so none of"
                            f" its answers can be trusted; retrain it (likely causes: {finite.CAUSES}); nothing was exported."
                            f" {finite.ALLOW_OPTION} exports it anyway (the timm export records it in maskdist.json)")
    for run, why in broken.items():
        warnings.warn(f"{run}: {why}; exported anyway ({finite.ALLOW_OPTION})", stacklevel=3)
    return ensemble, applied, broken


def nonfinite_models(ensemble: Ensemble) -> dict[str, str]:
    """Models with non-finite weights, or non-finite output on two probe images at their input
    size (the mean image and a ramp): no input can be trusted to give them a finite answer."""
    broken = {}
    for member in ensemble.members:
        bad = [name for name, t in member.model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        crop = int(member.card["image"]["crop"])
        probes = torch.stack([torch.zeros(3, crop, crop), torch.linspace(-2, 2, 3 * crop * crop).reshape(3, crop, crop)])
        with torch.no_grad():
            probs = heads_mod.probabilities(member.model.eval()(probes), member.card.get("heads", "single"))
        if bad or not torch.isfinite(probs).all():
            broken[str(member.run_dir)] = (f"non-finite weights (NaN or inf in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
                                           if bad else "non-finite output (NaN or inf) on probe images")
    return broken


def _warn_of_face_crops(ensemble: Ensemble) -> None:
    """An exported model holds no face detector: one trained on face crops gives poor answers
    on whole photos, with nothing to say so. Said once per input group."""
    for group in ensemble.groups:
        policy = face_crop.policy_of(group.card)
        if policy is not None:
            warnings.warn(f"{ensemble.members[group.members[0]].run_dir}: trained with a {face_crop.describe_policy(policy)}; the"
                          " exported model holds no detector, so feed it face crops made so, not whole photos"
                          " (maskdist classify and predict crop them)", stacklevel=3)


# --- timm's hub layout --------------------------------------------------------------------


def single_head(member: Member) -> nn.Module:
    """The member as a plain timm 18-way classifier (part heads folded into one linear head)."""
    if member.card.get("heads", "single") == "single":
        return member.model
    plain = create_model(member.card["architecture"], labels.NUM_CLASSES, member.card.get("drop_rate", 0.0), warn_random=False)
    head = _classifier_prefix(member.model)
    state = {k: v for k, v in member.model.state_dict().items() if not k.startswith(head)}
    parts = member.model.get_classifier().layers()
    weight = sum(layer.weight[heads_mod.CLASS_PARTS[:, k]] for k, layer in enumerate(parts))
    bias = sum(layer.bias[heads_mod.CLASS_PARTS[:, k]] for k, layer in enumerate(parts))
    prefix = _classifier_prefix(plain)
    plain.load_state_dict(state | {prefix + "weight": weight, prefix + "bias": bias})
    return plain.eval()


def _classifier_prefix(model: nn.Module) -> str:
    head = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is head) + "."


def export_timm(sources: Sequence[str | os.PathLike], out: str | os.PathLike, allow_unfinished: bool = False,
                allow_nonfinite: bool = False) -> list[Path]:
    """Each fold model of ``sources`` to ``out/<experiment>-fold<K>/`` in timm's hub layout; a
    model with non-finite weights or output is refused unless ``allow_nonfinite`` (then recorded)."""
    from timm.models import save_for_hf

    ensemble, _, broken = _ensemble(sources, "uniform", "argmax", allow_unfinished, allow_nonfinite)  # each on its own: no vote
    out = Path(out)
    names = [_folder_name(m, len(ensemble.experiments) > 1) for m in ensemble.members]
    written = []
    for member, name in zip(ensemble.members, names):
        card = member.card
        data_config, differences = timm_data_config(card, *member.normalisation)
        for difference in differences:
            warnings.warn(difference, stacklevel=2)  # once per export: the CLI shows a warning once
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(target)
        try:
            save_for_hf(single_head(member), str(tmp), model_config={"label_names": list(card["classes"])}, safe_serialization=True,
                        data_config=data_config)
            record = card | {"export": {"timm_preprocessing": {**data_config, "exact": not differences, "differences": differences},
                                        "weights_sha256": member.run.weights_sha256}}  # the fold weights it was made from
            record |= {"nonfinite": broken[str(member.run_dir)]} if str(member.run_dir) in broken else {}
            (tmp / "maskdist.json").write_text(json.dumps(record, indent=1))  # where it came from: the run's model card
            give_plain_modes(tmp)
            replace_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        written.append(target)
    return written


# maskdist's input: the photo squashed to resize x resize (aspect ratio not kept), bilinear,
# then centre-cropped (data/transforms.py); timm says so with crop_mode "squash".
TIMM_CROP_MODE = "squash"
TIMM_INTERPOLATION = "bilinear"
ANTIALIAS_NOTE = ("timm's transform resizes PIL images with antialiasing, maskdist (OpenCV) without: on photos larger"
                  " than the input the pixels differ slightly (a few levels of 255 on average; docs/export.md)")


def _pair(size) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


def timm_data_config(card: dict, mean, std) -> tuple[dict, list[str]]:
    """The ``pretrained_cfg`` data settings with which timm's own ``resolve_data_config`` +
    ``create_transform`` make maskdist's input from a photo, and what they cannot say exactly.

    timm squashes to ``floor(crop / crop_pct)`` per side: ``crop_pct`` is chosen inside the
    interval where that floor is the resize (``crop / resize`` itself can fall just below it
    in floating point). One ``crop_pct`` cannot give two sides different ratios: then the
    closest is written, with a difference saying so."""
    resize, crop = _pair(card["image"]["resize"]), _pair(card["image"]["crop"])
    low = max(r / c for r, c in zip(resize, crop))  # 1 / crop_pct must be in [low, high)
    high = min((r + 1) / c for r, c in zip(resize, crop))
    differences = []
    if low < high:
        crop_pct = round(2 / (low + high), 6)
        if any(int(c / crop_pct) != r for r, c in zip(resize, crop)):  # rounding left the interval
            crop_pct = 2 / (low + high)
    else:
        crop_pct = crop[0] / resize[0]
        scaled = tuple(int(c / crop_pct) for c in crop)
        differences.append(f"timm cannot squash to {resize[0]}x{resize[1]} before a {crop[0]}x{crop[1]} crop with one crop_pct;"
                           f" the export squashes to {scaled[0]}x{scaled[1]}")
    squashed = tuple(math.floor(c / crop_pct) for c in crop)
    if squashed == resize and any((r - c) // 2 != round((r - c) / 2) for r, c in zip(resize, crop)):
        # maskdist's centre crop starts at (resize - crop) // 2, torchvision's at that half
        # rounded to even: a 3 (mod 4) margin, as 64 -> 57, puts timm's one pixel further on
        differences.append(f"timm's centre crop of {crop[0]}x{crop[1]} from {resize[0]}x{resize[1]} starts one pixel lower or"
                           f" further right than maskdist's (torchvision rounds the margin's half to even; maskdist floors it)")
    differences.append(ANTIALIAS_NOTE)
    config = {"input_size": (3, *crop), "mean": tuple(mean), "std": tuple(std), "crop_pct": crop_pct,
              "crop_mode": TIMM_CROP_MODE, "interpolation": TIMM_INTERPOLATION}
    return config, differences


def _folder_name(member: Member, several: bool) -> str:
    fold = f"fold{member.run.fold}" if str(member.run.fold).isdigit() else str(member.run.fold)
    return f"{member.run.experiment.name}-{fold}" if several else fold


# --- ONNX: the ensemble as one graph ------------------------------------------------------


class EnsembleGraph(nn.Module):
    """uint8 NHWC images -> (the ensemble's 18-class probabilities, the decided class)."""

    def __init__(self, ensemble: Ensemble, tta: str = "none", class_weights: np.ndarray | None = None):
        super().__init__()
        if tta not in TTAS:
            raise MaskdistError(f"unknown TTA {tta!r}: choose {' or '.join(TTAS)}")
        if len(ensemble.groups) > 1:
            sizes = sorted((g.resize, g.crop) for g in ensemble.groups)
            raise MaskdistError(f"the models take {len(ensemble.groups)} different inputs (resize, crop: {sizes}, or face crops):"
                                " one ONNX graph takes one; export each experiment on its own")
        self.resize, self.crop = ensemble.groups[0].resize, ensemble.groups[0].crop
        self.tta = tta
        self.models = nn.ModuleList(m.model.eval() for m in ensemble.members)
        self.kinds = [m.card.get("heads", "single") for m in ensemble.members]
        means = torch.tensor([[v * 255 for v in m.normalisation[0]] for m in ensemble.members], dtype=torch.float32)
        stds = torch.tensor([[v * 255 for v in m.normalisation[1]] for m in ensemble.members], dtype=torch.float32)
        self.register_buffer("means", means[:, None, :, None, None])
        self.register_buffer("inv_stds", 1 / stds[:, None, :, None, None])
        self.register_buffer("weights", torch.tensor(ensemble.weights, dtype=torch.float32))
        w = np.ones(labels.NUM_CLASSES) if class_weights is None else np.asarray(class_weights)
        self.register_buffer("class_weights", torch.tensor(w, dtype=torch.float32)[None, :])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).contiguous().float()
        total = 0
        for j, (model, kind) in enumerate(zip(self.models, self.kinds)):
            normalised = (x - self.means[j]) * self.inv_stds[j]
            views = [normalised, torch.flip(normalised, dims=[3])] if self.tta == "hflip" else [normalised]
            probs = sum(heads_mod.probabilities(model(view), kind) for view in views) / len(views)
            total = total + self.weights[j] * probs
        return total, torch.argmax(total * self.class_weights, dim=1)


def write_onnx(graph: EnsembleGraph, out: str | os.PathLike, members: list[dict] | None = None) -> Path:
    """``graph`` as an ONNX file (written atomically), its batch size free; ``members``
    (:func:`onnx_members`) recorded in its metadata when given."""
    example = torch.zeros((2, graph.crop, graph.crop, 3), dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        # The TorchScript exporter: the torch.export one needs onnxscript, and these
        # convolutional graphs have no control flow for it to handle better.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.eval(), (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET, input_names=["image"],
                          output_names=["probs", "label"], dynamic_axes={"image": {0: "n"}, "probs": {0: "n"}, "label": {0: "n"}})
        _document(tmp, graph, members)
    return out


def onnx_input_recipe(graph: EnsembleGraph) -> dict:
    """How to make the graph's ``image`` input from a photo: maskdist's own preprocessing."""
    return {"layout": "NHWC", "dtype": "uint8", "channels": "RGB", "resize": [graph.resize, graph.resize],
            "resize_mode": "squash (the aspect ratio is not kept)", "interpolation": "bilinear (OpenCV INTER_LINEAR, no antialiasing)",
            "crop": [graph.crop, graph.crop], "crop_mode": "centre", "normalisation": "inside the graph"}


def onnx_members(ensemble: Ensemble) -> list[dict]:
    """The fold models the graph holds, by the sha256 of the weights each was made from."""
    return [{"run": str(m.run_dir), "fold": m.run.fold, "weight": float(w), "weights_sha256": m.run.weights_sha256}
            for m, w in zip(ensemble.members, ensemble.weights)]


def _document(path: Path, graph: EnsembleGraph, members: list[dict] | None) -> None:
    """The input recipe (``maskdist.input``) and the fold models (``maskdist.members``) as the
    ONNX file's metadata, where a runtime user reads them."""
    import onnx

    model = onnx.load(str(path))
    props = {"maskdist.input": json.dumps(onnx_input_recipe(graph))}
    if members is not None:
        props["maskdist.members"] = json.dumps(members)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def export_onnx(sources: Sequence[str | os.PathLike], out: str | os.PathLike, tta: str = "none", weighting: str = "uniform",
                decisions: str = "tuned", allow_unfinished: bool = False, allow_nonfinite: bool = False) -> dict:
    """The ensemble of ``sources`` as one ONNX file ``out``; what it holds (``nonfinite``: the
    models with non-finite weights or output, exported only when ``allow_nonfinite``)."""
    ensemble, applied, broken = _ensemble(sources, weighting, decisions, allow_unfinished, allow_nonfinite)
    graph = EnsembleGraph(ensemble, tta, applied.class_weights)
    out = write_onnx(graph, out, onnx_members(ensemble))
    return {"out": str(out), "models": len(ensemble.members), "resize": graph.resize, "crop": graph.crop, "tta": tta,
            "decisions": applied.name, "face_crop": face_crop.policy_of(ensemble.groups[0].card),
            "members": [str(m.run_dir) for m in ensemble.members], "nonfinite": broken}
