"""The timm factory: fresh 18-way head, local pretrained weights (1000-class file), errors."""
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from maskdist.errors import MaskdistError
from maskdist.model.factory import create_model, normalisation


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """A 1000-class checkpoint of the tiny architecture, as an ImageNet file would be."""
    torch.manual_seed(0)
    source = timm.create_model("test_efficientnet", num_classes=1000)
    path = tmp_path_factory.mktemp("weights") / "test_efficientnet.safetensors"
    save_file(source.state_dict(), str(path))
    return path, source


def test_random_init_warns_and_has_a_fresh_linear_head():
    with pytest.warns(UserWarning, match="random weights"):
        model = create_model("test_efficientnet", drop_rate=0.4)
    head = model.get_classifier()
    assert head.out_features == 18
    assert (head.bias == 0).all()
    bound = 1 / math.sqrt(head.in_features)  # kaiming_uniform(a=sqrt(5)) bound
    assert head.weight.abs().max() <= bound + 1e-6 and head.weight.std() > bound / 4
    assert model.drop_rate == 0.4
    model.eval()
    logits = model(torch.rand(4, 3, 64, 64))
    assert logits.shape == (4, 18) and (logits < 0).any(), "no activation may clip the logits"


def test_local_1000_class_weights_load_with_a_new_head(imagenet_file):
    path, source = imagenet_file
    model = create_model("test_efficientnet", pretrained_file=path)
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)
    assert model.get_classifier().out_features == 18
    assert (model.get_classifier().bias == 0).all()
    assert normalisation(model) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_missing_or_mismatched_weights_are_clear_errors(imagenet_file, tmp_path):
    with pytest.raises(MaskdistError, match="not found"):
        create_model("test_efficientnet", pretrained_file=tmp_path / "nope.safetensors")
    with pytest.raises(MaskdistError, match="do not fit"):
        create_model("test_resnet", pretrained_file=imagenet_file[0])
    with pytest.raises(MaskdistError, match="unknown architecture"):
        create_model("no_such_net")
