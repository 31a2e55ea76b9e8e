"""The ONNX graph of a mixed ensemble (an 18-way model and a part-heads model, each with its
own normalisation, unequal weights, tuned class weights, TTA) under onnxruntime against
PyTorch; the fold models of a trained experiment are exported in tests/test_predict.py."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from maskdist.data import transforms
from maskdist.infer import export
from maskdist.infer.ensemble import Ensemble, InputGroup, Member
from maskdist.model import heads
from maskdist.model.factory import create_model

TOLERANCE = 1e-5  # as tests/test_predict.py's ONNX_TOLERANCE


def _member(heads_kind: str, mean, std, seed: int) -> Member:
    torch.manual_seed(seed)
    model = create_model("test_efficientnet", heads=heads_kind, warn_random=False).eval()
    card = {"heads": heads_kind, "normalisation": {"mean": list(mean), "std": list(std)}, "image": {"resize": 40, "crop": 32}}
    return Member(SimpleNamespace(card=card, run_dir=f"run{seed}"), model)


def test_onnx_graph_of_a_mixed_ensemble_matches_pytorch(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    members = [_member("single", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0), _member("parts", (0.5,) * 3, (0.5,) * 3, 1)]
    weights = np.array([0.3, 0.7])
    ensemble = Ensemble(members, weights, [tmp_path], np.ones(1), [InputGroup(40, 32, [0, 1], members[0].card)])
    class_weights = np.linspace(0.5, 1.5, 18)
    out = export.write_onnx(export.EnsembleGraph(ensemble, "hflip", class_weights), tmp_path / "mixed.onnx")
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    probs, label = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": images})

    expected = 0
    with torch.no_grad():
        for member, weight in zip(members, weights):
            x = transforms.to_device(torch.from_numpy(images).permute(0, 3, 1, 2), "cpu", *member.normalisation)
            views = [heads.probabilities(member.model(v), member.card["heads"]) for v in (x, torch.flip(x, dims=[3]))]
            expected = expected + weight * (sum(views) / 2).numpy()
    assert np.abs(probs - expected).max() < TOLERANCE
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)  # part heads: the product of the part probabilities sums to 1
    assert (label == (expected * class_weights).argmax(axis=1)).all()


def test_one_graph_takes_one_input_size(tmp_path):
    from maskdist.errors import MaskdistError

    members = [_member("single", (0.5,) * 3, (0.5,) * 3, 0), _member("single", (0.5,) * 3, (0.5,) * 3, 1)]
    groups = [InputGroup(40, 32, [0], members[0].card), InputGroup(64, 48, [1], members[1].card)]
    ensemble = Ensemble(members, np.array([0.5, 0.5]), [tmp_path], np.ones(1), groups)
    with pytest.raises(MaskdistError, match="2 different inputs .* export each experiment on its own"):
        export.EnsembleGraph(ensemble)


@pytest.mark.parametrize("resize, crop", [(64, 48), (64, 57), (40, 32), (67, 64)])
def test_timm_transform_crops_where_maskdist_does_or_the_export_says_it_does_not(resize, crop):
    """On a photo already resize x resize (no resize filter involved), timm's own eval
    transform from the exported config gives maskdist's input to float precision; where its
    centre crop lands one pixel off (a margin of 3 mod 4: torchvision rounds half to even,
    maskdist floors), the export's differences say so, and the pixels show it is true."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    card = {"image": {"resize": resize, "crop": crop}}
    config, differences = export.timm_data_config(card, mean, std)
    photo = np.random.default_rng(resize + crop).integers(0, 256, (resize, resize, 3), dtype=np.uint8)
    timm_x = create_transform(**resolve_data_config(pretrained_cfg=config))(Image.fromarray(photo))
    ours = transforms.build_transform("none", resize, crop)(photo)
    mine = transforms.to_device(torch.from_numpy(ours)[None], "cpu", mean, std)[0]
    same = torch.allclose(timm_x, mine, atol=1e-5)
    offset = [d for d in differences if "centre crop" in d]
    assert same == (not offset), (differences, float((timm_x - mine).abs().max()))
    assert same == ((resize - crop) % 4 != 3)
