"""``--log-with``: accelerate's experiment trackers (wandb, mlflow, comet_ml, aim, ...) beside
TensorBoard, which always logs (the images, the confusion matrix and the hparams view come
from its writer).

The other trackers are accelerate's own classes, started on the main process and added to
``accelerator.trackers``: every ``accelerator.log`` then reaches them with the same scalars
and steps as TensorBoard. Each gets the experiment folder's name as its project (MLflow's
experiment, wandb's project), the fold as its run name, the hyperparameters at the start and
the best figures at the end (TensorBoard's hparams metrics). Each tracker reads its own
environment (``MLFLOW_TRACKING_URI``, ``WANDB_MODE=offline``, ...). A resumed fold starts a
new run in them; TensorBoard continues its own.
"""
from __future__ import annotations

from pathlib import Path

from maskdist.errors import MaskdistError

TENSORBOARD = "tensorboard"
# Run names go in under each tracker's own argument.
RUN_NAME_ARGUMENT = {"mlflow": "run_name", "wandb": "name"}
# Characters a tracker refuses in metric names, and what stands for them: MLflow takes no "<",
# which the per-class F1 tags hold ("val/class_f1/00_wear_male_<30" -> "..._lt30").
NAME_FIXES = {"mlflow": (("<", "lt"), (">", "gt"))}


def parse(log_with: str) -> list[str]:
    """The trackers ``--log-with`` names besides TensorBoard, checked (known, installed)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType if t.value != "all"]
    names = list(dict.fromkeys(n.strip() for n in str(log_with).split(",") if n.strip()))
    available = {t.value if isinstance(t, LoggerType) else str(t) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise MaskdistError(f"--log-with {name!r} is not a tracker accelerate knows: choose from {', '.join(known)}")
        if name not in available:
            raise MaskdistError(f"--log-with {name}: its package is not installed (pip install {name.replace('_', '-')})")
    for name in names:
        _check_server(name)
    return [n for n in names if n != TENSORBOARD]


# Trackers that talk to a server named by an environment variable (a file store needs none).
SERVER_VARIABLES = {"mlflow": "MLFLOW_TRACKING_URI"}


def _check_server(name: str) -> None:
    """A tracker's server that cannot be reached at all is refused before training starts (its
    client would retry each call for minutes, then fail the run after its first epoch)."""
    import os

    from maskdist.system import network

    uri = os.environ.get(SERVER_VARIABLES.get(name, ""), "")
    if uri.startswith(("http://", "https://")):
        no_network = network.unreachable(uri)
        if no_network:
            raise MaskdistError(f"--log-with {name}: its server {uri} cannot be reached ({no_network}): start the run where"
                                f" the network reaches it, or log to a local store (see docs/monitoring.md)")


def start(accelerator, names: list[str], experiment: str, run_name: str, run_dir: Path, hyperparameters: dict) -> list:
    """Start the trackers ``names`` (main process), add them to ``accelerator.trackers`` and
    give them the hyperparameters; returns them."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    started = []
    for name in names:
        kind = LOGGER_TYPE_TO_CLASS[name]
        kwargs = {RUN_NAME_ARGUMENT[name]: run_name} if name in RUN_NAME_ARGUMENT else {}
        tracker = kind(experiment, str(run_dir / name), **kwargs) if kind.requires_logging_directory else kind(experiment, **kwargs)
        if name in NAME_FIXES:
            tracker.log = _renaming(tracker.log, NAME_FIXES[name])
        tracker.start()
        tracker.store_init_configuration(hyperparameters)
        accelerator.trackers.append(tracker)
        started.append(tracker)
    return started


def _renaming(log, fixes):
    """``log`` with the metric names changed as ``fixes`` say."""
    def renamed(values: dict, step: int | None = None, **kwargs):
        fixed = {}
        for key, value in values.items():
            for old, new in fixes:
                key = key.replace(old, new)
            fixed[key] = value
        return log(fixed, step=step, **kwargs)
    return renamed


def log(trackers: list, values: dict, step: int) -> None:
    """``values`` to ``trackers`` only (what TensorBoard shows in its hparams view instead)."""
    for tracker in trackers:
        tracker.log(values, step=step)
