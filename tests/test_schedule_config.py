"""The lr schedule against torch's CosineAnnealingWarmRestarts; config layering."""
import pytest
import torch

from maskdist import config
from maskdist.errors import MaskdistError
from maskdist.train.schedule import WarmRestarts, scaled_lr


@pytest.mark.parametrize("t0,mult", [(2, 1), (1, 2)])
def test_matches_torch_warm_restarts_with_fractional_epochs(t0, mult):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t0, T_mult=mult, eta_min=0.001)
    ours = WarmRestarts(base_lr=0.1, total_epochs=10, restart_epochs=t0, restart_mult=mult, min_lr=0.001)
    steps_per_epoch = 7
    for step in range(1, 8 * steps_per_epoch):
        epoch = step / steps_per_epoch
        torch_sched.step(epoch)
        assert ours.lr(epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6, abs=1e-9), step


def test_warmup_is_linear_then_cosine_reaches_min_at_the_end():
    s = WarmRestarts(base_lr=1.0, total_epochs=5, warmup_epochs=1.0)
    assert s.lr(0.25) == pytest.approx(0.25) and s.lr(0.5) == pytest.approx(0.5)
    assert s.lr(1.0) == pytest.approx(1.0)
    assert s.lr(3.0) == pytest.approx(0.5)
    assert s.lr(5.0 - 1e-9) == pytest.approx(0.0, abs=1e-6)
    assert s.lr(5.0) == pytest.approx(0.0, abs=1e-9), "one cosine must not restart at the end of the run"
    assert scaled_lr(0.05, 512, 256) == pytest.approx(0.1)


def test_config_layers_defaults_yaml_flags(tmp_path):
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text("shards: shards/x\nbatch-size: 32\nlr: 0.2\nmodel: test_efficientnet\n")
    cfg = config.load(yaml_file, {"lr": 0.3, "epochs": None})
    assert (cfg.batch_size, cfg.lr, cfg.model, cfg.epochs) == (32, 0.3, "test_efficientnet", config.TrainConfig.epochs)
    config.save(cfg, tmp_path / "out" / "config.yaml")
    again = config.load(tmp_path / "out" / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize("text,needle", [
    ("shards: x\nbatchsize: 3\n", "unknown option 'batchsize'"),
    ("shards: x\nepochs: many\n", "epochs: 'many' is not a int"),
    ("shards: x\nprecision: fp8\n", "--precision 'fp8' is not one of no, bf16, fp16"),
    ("shards: x\ncrop: 300\n", "--crop 300 is larger than --resize 224"),
    ("epochs: 2\n", "--shards is required"),
])
def test_bad_config_is_one_clear_line(tmp_path, text, needle):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text(text)
    with pytest.raises(MaskdistError) as err:
        config.load(yaml_file)
    assert needle in str(err.value)


def test_presets_and_launch_configs_load(tmp_path):
    import yaml
    from conftest import REPO

    for name in config.presets():
        cfg = config.load(name, {"shards": "x"})
        assert config.load(REPO / "launch" / "configs" / f"{name}.yaml", {"shards": "x"}) == cfg
    assert {"recipe", "cpu_fast"} <= set(config.presets())
    recipe = config.load("recipe", {"shards": "x"})
    assert (recipe.model, recipe.resize, recipe.crop, recipe.loss, recipe.class_weights, recipe.optimizer, recipe.alpha) == \
        ("efficientnet_b3", 224, 150, "focal", "seed", "sgd", 0.0)
    for accelerate_file in (REPO / "launch").glob("*.yaml"):
        settings = yaml.safe_load(accelerate_file.read_text())
        assert settings["num_processes"] >= 1 and settings["compute_environment"] == "LOCAL_MACHINE", accelerate_file
    with pytest.raises(MaskdistError, match="preset"):
        config.load("no_such_preset")
