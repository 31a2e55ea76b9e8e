"""Focal loss against its formula and against cross-entropy; F1 against scikit-learn."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score

from maskdist import metrics
from maskdist.data import labels
from maskdist.errors import MaskdistError
from maskdist.model import losses


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 18, generator=g) * 3, torch.randint(0, 18, (32,), generator=g)


def test_focal_loss_matches_direct_formula(batch):
    logits, target = batch
    weight = torch.rand(18, generator=torch.Generator().manual_seed(1)) + 0.1
    got = losses.FocalLoss(gamma=2.0, weight=weight)(logits, target)
    p = torch.softmax(logits, dim=1)[torch.arange(32), target]
    w = weight[target]
    expected = (-(w * (1 - p) ** 2 * torch.log(p))).sum() / w.sum()
    assert torch.allclose(got, expected, rtol=1e-5)
    # the focal term changes the value: a broken gamma would not
    assert not torch.allclose(got, losses.FocalLoss(gamma=0.0, weight=weight)(logits, target))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_gamma_zero_is_cross_entropy(batch, smoothing):
    logits, target = batch
    weight = torch.linspace(0.2, 1.0, 18)
    got = losses.FocalLoss(gamma=0.0, weight=weight, label_smoothing=smoothing)(logits, target)
    expected = F.cross_entropy(logits, target, weight=weight, label_smoothing=smoothing)
    assert torch.allclose(got, expected, rtol=1e-5)
    assert torch.allclose(losses.make_loss("ce", None, "none", label_smoothing=smoothing)(logits, target),
                          F.cross_entropy(logits, target, label_smoothing=smoothing), rtol=1e-5)


def test_focal_loss_gradient_flows(batch):
    logits, target = batch
    logits = logits.clone().requires_grad_(True)
    losses.FocalLoss()(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_class_weight_schemes():
    counts = [100, 50, 0, 10] + [40] * 14
    n = np.array(counts, float)
    assert np.allclose(losses.class_weights(counts, "seed").numpy(), 1 - n / n.sum(), atol=1e-6)
    inverse = losses.class_weights(counts, "inverse").numpy()
    assert inverse[2] == 0 and inverse[3] > inverse[1] > inverse[0]
    assert np.isclose(inverse[n > 0] @ n[n > 0], n.sum(), rtol=1e-5)  # sum_c w_c n_c = N
    effective = losses.class_weights(counts, "effective-number").numpy()
    assert effective[2] == 0 and np.isclose(effective[n > 0].mean(), 1, rtol=1e-5) and effective[3] > effective[0]
    assert (losses.class_weights(counts, "none").numpy() == 1).all()
    with pytest.raises(MaskdistError, match="unknown class weighting 'sqrt'"):
        losses.class_weights(counts, "sqrt")


def test_scores_match_scikit_learn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 18, 500)
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, 18, 500))
    y_true[y_true == 17] = 16  # a class absent from the truth still counts in the 18-class mean
    s = metrics.score(y_true, y_pred)
    everything = list(range(18))
    assert np.isclose(s.macro_f1, f1_score(y_true, y_pred, labels=everything, average="macro", zero_division=0))
    assert np.allclose(s.per_class_f1, f1_score(y_true, y_pred, labels=everything, average=None, zero_division=0))
    assert (np.array(s.confusion) == confusion_matrix(y_true, y_pred, labels=everything)).all()
    for name, part in (("mask", lambda y: y // 6), ("gender", lambda y: (y // 3) % 2), ("age", lambda y: y % 3)):
        assert np.isclose(s.part_f1[name], f1_score(part(y_true), part(y_pred), average="macro", zero_division=0)), name
    assert [labels.decode(c)[0] for c in range(18)] == [c // 6 for c in range(18)]


def test_perfect_predictions_score_one():
    y = np.arange(18).repeat(3)
    s = metrics.score(y, y)
    assert s.macro_f1 == 1.0 and s.accuracy == 1.0 and all(v == 1.0 for v in s.part_f1.values())


def test_scoring_a_submission_does_not_import_torch():
    # `maskdist score` runs often (CI gates, notebooks): seconds of torch import for a CSV
    # comparison would be waste
    import subprocess
    import sys

    code = "import sys, maskdist.infer.scoring; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
