"""Training configuration: one typed dataclass; defaults, then a YAML file, then flags.

Every field is a ``maskdist train`` flag (``--batch-size`` for ``batch_size``) whose help is
the field's ``help`` metadata, so the dataclass is the one place options are defined.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from maskdist.errors import MaskdistError

FULL_DATA = "all"  # --fold all: the full-data model, trained on every fold, in OUT/all

# Prediction choices, shared by `predict`, `kfold` and `pseudo-label`.
TTAS = ("none", "hflip")  # test-time augmentation: the image, or it and its mirror
WEIGHTINGS = ("uniform", "f1")  # fold models weighted equally, or by their validation macro F1


# Option groups, in the order `maskdist train --help` and docs/training.md show them.
GROUPS = ("data", "faults", "model", "loss", "optimisation", "run")


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, group: str = "", run_only: bool = False):
    """A TrainConfig field. ``run_only``: a setting of how a run goes (workers, logging,
    saves, timeouts), not of what it trains; it may differ between the folds of one
    experiment and between a run and its resumed continuation."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "run_only": run_only})


@dataclass
class TrainConfig:
    # data
    shards: str = _opt("", "Shard set: folder, http(s) URL or pipe: template.", group="data", run_only=True)
    fold: str = _opt("0", "Validation fold; the model trains on every other fold (plus extra samples). all: every fold, no"
                          " validation (the full-data model, in OUT/all).", group="data", run_only=True)
    out: str = _opt("runs/exp", "Experiment folder; the fold's run goes to OUT/fold<K>.", group="run", run_only=True)
    alpha: float = _opt(0.0, "Class mixing: probability ~ n_c**alpha (0 balanced, 1 natural).", group="data")
    shuffle_buffer: int = _opt(1000, "Shuffle buffer per worker (samples).", group="data")
    workers: int = _opt(4, "Loader worker processes per training process.", group="data", run_only=True)
    val_workers: int = _opt(-1, "Validation loader workers per process; they start for each validation and exit after it."
                                " -1: min(--workers, 4).", group="data", run_only=True)
    max_skipped: float = _opt(0.05, "Stop when unreadable shards skipped in an epoch hold more than this fraction of its samples.",
                              group="faults", run_only=True)
    read_tries: int = _opt(5, "Attempts per remote shard read (http(s), pipe:, other URLs) before the shard is skipped.",
                           group="faults", run_only=True)
    read_backoff_s: float = _opt(1.0, "Wait before the second attempt of a remote read; doubles with each further one (at most 30 s).",
                                 group="faults", run_only=True)
    augment: str = _opt("recipe", "Augmentation preset (strong: RandAugment-like ops and cutout).", ("recipe", "light", "strong", "none"),
                        group="data")
    resize: int = _opt(224, "Resize both sides to this before cropping.", group="data")
    crop: int = _opt(150, "Centre-crop size fed to the model.", group="data")
    # model
    model: str = _opt("efficientnet_b3", "timm architecture name.", group="model")
    pretrained: str = _opt("none", "Starting weights: hub (the architecture's default timm weights, through the Hugging Face"
                                   " cache), a hub repo (hf-hub:ORG/NAME, timm/NAME.TAG), a local .safetensors/.pth FILE, or"
                                   " none (random init).", group="model")
    drop_rate: float = _opt(0.4, "Dropout before the classifier.", group="model")
    drop_path: float = _opt(0.0, "Stochastic depth (timm's drop_path_rate, the deepest block's); 0: off.", group="model")
    heads: str = _opt("single", "One 18-way head, or mask (3), gender (2) and age (3) heads whose probabilities multiply.",
                      ("single", "parts"), group="model")
    ema_decay: float = _opt(0.0, "Keep an EMA of the weights with this decay (e.g. 0.999) and validate it too; 0: off.", group="model")
    compile: bool = _opt(False, "torch.compile the model.", group="model", run_only=True)
    # loss
    loss: str = _opt("focal", "Loss function: focal, cross-entropy, soft macro-F1, or a mix with it.",
                     ("focal", "ce", "f1", "focal+f1", "ce+f1"), group="loss")
    f1_weight: float = _opt(0.5, "Share of the soft macro-F1 term in focal+f1 and ce+f1.", group="loss")
    gamma: float = _opt(2.0, "Focal loss gamma.", group="loss")
    class_weights: str = _opt("seed", "Class weights from the training folds' counts.", ("seed", "inverse", "effective-number", "none"), group="loss")
    label_smoothing: float = _opt(0.0, "Label smoothing (done by mixup/cutmix when they are on).", group="loss")
    mixup: float = _opt(0.0, "Mixup alpha (timm's Mixup); 0: off.", group="loss")
    cutmix: float = _opt(0.0, "CutMix alpha (timm's Mixup); 0: off. With both on, each batch is one or the other.", group="loss")
    # optimisation
    epochs: int = _opt(10, "Epochs; an epoch is ceil(training samples / global batch) steps.", group="optimisation")
    epochs_from: str = _opt("", "With --fold all: take --epochs from a finished k-fold experiment, the median of its folds'"
                                " best epochs.", group="optimisation", run_only=True)
    batch_size: int = _opt(64, "Batch per process.", group="optimisation")
    optimizer: str = _opt("sgd", "Optimiser (SGD uses momentum and Nesterov).", ("sgd", "adamw"), group="optimisation")
    lr: float = _opt(0.05, "Learning rate at the reference global batch (--base-batch); scaled linearly.", group="optimisation")
    base_batch: int = _opt(256, "Global batch at which --lr applies.", group="optimisation")
    momentum: float = _opt(0.9, "SGD momentum.", group="optimisation")
    nesterov: bool = _opt(True, "Nesterov momentum for SGD.", group="optimisation")
    weight_decay: float = _opt(1e-4, "Weight decay.", group="optimisation")
    warmup_epochs: float = _opt(0.0, "Linear warm-up length in epochs (fractional allowed).", group="optimisation")
    restart_epochs: float = _opt(0.0, "Cosine warm-restart period T_0 in epochs; 0: one cosine over the whole run.", group="optimisation")
    restart_mult: int = _opt(1, "Period multiplier after each restart (T_mult).", group="optimisation")
    min_lr: float = _opt(0.0, "Lowest learning rate of the cosine.", group="optimisation")
    grad_accum: int = _opt(1, "Gradient accumulation steps.", group="optimisation")
    clip_grad: float = _opt(0.0, "Clip the gradient norm to this; 0: off.", group="optimisation")
    precision: str = _opt("no", "Mixed precision through Accelerate.", ("no", "bf16", "fp16"), group="optimisation")
    # bookkeeping
    seed: int = _opt(0, "Base seed: model init, sampling, augmentation.", group="run")
    resume: bool = _opt(False, "Continue an interrupted run from OUT/fold<K>/state (at the next batch).", group="run", run_only=True)
    checkpoint_every: int = _opt(0, "Also save the resumable state every N training steps inside an epoch; 0: at epoch ends only.",
                                 group="run", run_only=True)
    checkpoint_minutes: float = _opt(0.0, "Also save the resumable state every M minutes inside an epoch; 0: off.", group="run", run_only=True)
    log_batches: bool = _opt(False, "Write every training batch's sample keys to OUT/fold<K>/batches/rank<R>.txt (audits).",
                             group="run", run_only=True)
    log_with: str = _opt("tensorboard", "Experiment trackers, comma-separated: TensorBoard always, and beside it any that accelerate"
                                        " supports (wandb, mlflow, comet_ml, aim, ...) with the same scalars and hyperparameters.",
                         group="run", run_only=True)
    log_every: int = _opt(10, "Log training scalars every N training steps (batches), and at the end of each epoch.", group="run", run_only=True)
    max_steps: int = _opt(0, "Stop each epoch after N steps (smoke tests); 0: full epochs.", group="run")
    timeout_s: int = _opt(0, "Collective-operation timeout in seconds (a hung rank becomes an error); 0: 1800 on one machine,"
                             " 600 across machines.", group="run", run_only=True)

    overwrite: bool = _opt(False, "Start the fold again: what its folder holds (model, state, logs, OOF) is replaced.",
                           group="run", run_only=True)
    replan: bool = _opt(False, "This run's training settings become the experiment's plan (OUT/experiment.yaml), which the"
                               " other folds must then match.", group="run", run_only=True)
    lock_wait_s: float = _opt(0.0, "Wait up to this many seconds for another run that holds the fold folder to finish (a"
                                   " requeued job whose previous incarnation is still saving); 0: refuse at once.",
                              group="run", run_only=True)

    def __post_init__(self):
        self.fold = str(self.fold).strip()  # a number, or "all" (YAML and old configs hold ints)
        self.pretrained = _pretrained(self.pretrained)

    @property
    def full_data(self) -> bool:
        """Every fold trains, none validates (``--fold all``)."""
        return self.fold == FULL_DATA

    @property
    def fold_number(self) -> int:
        """The validation fold as a number (not for the full-data model)."""
        return int(self.fold)

    def run_dir(self) -> Path:
        return Path(self.out) / (FULL_DATA if self.full_data else f"fold{self.fold}")

    def validation_workers(self) -> int:
        return min(self.workers, 4) if self.val_workers < 0 else self.val_workers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise MaskdistError(f"--{_flag(f.name)} {value!r} is not one of {', '.join(choices)}")
        positive = ("epochs", "batch_size", "base_batch", "grad_accum", "resize", "crop", "read_tries", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise MaskdistError(f"--{_flag(name)} must be positive (got {getattr(self, name)})")
        not_negative = ("timeout_s", "max_skipped", "read_backoff_s", "checkpoint_every", "checkpoint_minutes", "max_steps", "workers",
                        "mixup", "cutmix", "drop_path", "ema_decay")
        for name in not_negative:
            if getattr(self, name) < 0:
                raise MaskdistError(f"--{_flag(name)} must be 0 or more (got {getattr(self, name)})")
        # The optimiser's and the loss's numbers: torch would refuse some of these only once the
        # model is built (and name the lr scaled to the global batch), and take the others silently.
        if self.lr <= 0:
            raise MaskdistError(f"--lr must be positive (got {self.lr})")
        if not 0.0 <= self.min_lr <= self.lr:
            raise MaskdistError(f"--min-lr must be 0 or more and at most --lr {self.lr} (got {self.min_lr})")
        for name in ("weight_decay", "gamma", "warmup_epochs", "restart_epochs", "clip_grad", "alpha"):
            if getattr(self, name) < 0:
                raise MaskdistError(f"--{_flag(name)} must be 0 or more (got {getattr(self, name)})")
        for name in ("momentum", "label_smoothing", "drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise MaskdistError(f"--{_flag(name)} must be in [0, 1) (got {getattr(self, name)})")
        if self.restart_mult < 1:
            raise MaskdistError(f"--restart-mult must be 1 or more (got {self.restart_mult})")
        if self.val_workers < -1:
            raise MaskdistError(f"--val-workers must be -1 (auto), 0 or more (got {self.val_workers})")
        if not 0.0 <= self.f1_weight <= 1.0 or not 0.0 <= self.ema_decay < 1.0 or not 0.0 <= self.drop_path < 1.0:
            raise MaskdistError(f"--f1-weight {self.f1_weight} must be in [0, 1], --ema-decay {self.ema_decay} and"
                                f" --drop-path {self.drop_path} in [0, 1)")
        if self.crop > self.resize:
            raise MaskdistError(f"--crop {self.crop} is larger than --resize {self.resize}")
        if not (self.fold.isdigit() or self.full_data):
            raise MaskdistError(f"--fold {self.fold!r}: expected a fold number, or {FULL_DATA} for the full-data model")
        if self.epochs_from and not self.full_data:
            raise MaskdistError("--epochs-from goes with --fold all: the folds of an experiment choose the full-data model's epochs")
        if not self.shards:
            raise MaskdistError("--shards is required: the shard set to train from (see `maskdist shards build`)")


def run_only_settings() -> tuple[str, ...]:
    """The settings that may differ between the folds of an experiment and between a run and
    its resumed continuation: how a run goes, not what it trains."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["run_only"])


def training_settings(values: TrainConfig | dict) -> dict:
    """What a run trains: every setting but the run-only ones."""
    values = values.to_dict() if isinstance(values, TrainConfig) else dict(values)
    if "pretrained" in values:
        values["pretrained"] = _pretrained(values["pretrained"])
    skip = set(run_only_settings())
    defaults = TrainConfig(shards="-").to_dict()
    return {name: values.get(name, defaults[name]) for name in defaults if name not in skip}


def differences(before: TrainConfig | dict, now: TrainConfig | dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The training settings that differ (but those in ``ignore``), as ``--name before -> now``."""
    a, b = training_settings(before), training_settings(now)
    return [f"--{_flag(name)} {a[name]!r} -> {b[name]!r}" for name in a if a[name] != b[name] and name not in ignore]


def _pretrained(spec) -> str:
    """Configs before hub weights wrote "" (or null) for random init: that is ``none``."""
    return str(spec).strip() if spec not in (None, "") else "none"


def _flag(name: str) -> str:
    return name.replace("_", "-")


def field_type(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(TrainConfig)[f.name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def load(yaml_file: str | Path | None = None, overrides: dict[str, Any] | None = None, validate: bool = True) -> TrainConfig:
    """Defaults, then ``yaml_file``, then ``overrides`` (None values are ignored); checked
    unless ``validate`` is False (a preset shown by ``--help``, before ``--shards`` is known)."""
    values: dict[str, Any] = {}
    names = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if yaml_file:
        path = resolve_config(yaml_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise MaskdistError(f"config file {path} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise MaskdistError(f"config file {path} must be a mapping of option: value")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise MaskdistError(f"config file {path}: unknown option {key!r}; see `maskdist train --help`")
            kind = field_type(names[name])
            try:
                values[name] = kind(value) if value is not None else ""
            except (TypeError, ValueError):
                raise MaskdistError(f"config file {path}: {key}: {value!r} is not a {kind.__name__}") from None
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    config = TrainConfig(**values)
    if validate:
        config.validate()
    return config


PRESETS = Path(__file__).parent / "presets"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """A YAML file path, or the name of a preset shipped with maskdist (``recipe``, ``cpu_fast``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESETS / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise MaskdistError(f"config {name_or_path} not found: pass a YAML file of train options or a preset ({', '.join(presets())})")


def to_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML: what ``config.yaml`` holds and ``--print-config`` prints."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def save(config: TrainConfig, path: Path) -> None:
    """The resolved config as YAML (written atomically)."""
    from maskdist.system.fileio import atomic_write_text

    atomic_write_text(path, to_yaml(config))
