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


# The trackers accelerate knows (its LoggerType but "all"; a test keeps this list true), each
# with the module that its package installs: checked without importing accelerate (torch).
KNOWN = {"aim": "aim", "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "comet_ml": "comet_ml",
         "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}


def check_names(log_with: str) -> list[str]:
    """The trackers ``--log-with`` names (TensorBoard too), each known, installed and given the
    environment it needs; without torch (maskdist.cli.usage calls it before torch loads)."""
    import importlib.util

    names = list(dict.fromkeys(n.strip() for n in str(log_with).split(",") if n.strip()))
    for name in names:
        if name not in KNOWN:
            raise MaskdistError(f"--log-with {name!r} is not a tracker accelerate knows: choose from {', '.join(KNOWN)}")
        if importlib.util.find_spec(KNOWN[name]) is None:
            raise MaskdistError(f"--log-with {name}: its package is not installed (pip install {name.replace('_', '-')})")
    if "mlflow" in names:
        _check_mlflow_store()
    return names


def parse(log_with: str) -> list[str]:
    """The trackers ``--log-with`` names besides TensorBoard, checked (known, installed, their
    environment, their server reachable)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = check_names(log_with)
    available = {t.value if isinstance(t, LoggerType) else str(t) for t in get_available_trackers()}
    for name in names:
        if name not in available:
            raise MaskdistError(f"--log-with {name}: its package is not installed (pip install {name.replace('_', '-')})")
    for name in names:
        _check_server(name)
    return [n for n in names if n != TENSORBOARD]


MLFLOW_STORE_HELP = "a server (http://HOST:5000), or a folder (file:PATH) with MLFLOW_ALLOW_FILE_STORE=true; see docs/monitoring.md"


def _check_mlflow_store() -> None:
    """MLflow 3 has no usable default store and refuses a folder unless told: both are said in
    one line before training, not by its exception after the first epoch's TensorBoard files."""
    import os

    major = _mlflow_major()
    if major is None or major < 3:
        return  # MLflow 2 logs into ./mlruns by default
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        raise MaskdistError(f"--log-with mlflow: set MLFLOW_TRACKING_URI to where runs go: {MLFLOW_STORE_HELP}")
    is_folder = uri.startswith("file:") or "://" not in uri and not uri.startswith(("databricks", "sqlite:", "uc"))
    allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1")
    if is_folder and not allowed:
        raise MaskdistError(f"--log-with mlflow: MLFLOW_TRACKING_URI={uri} is a folder, which MLflow {major} uses only with"
                            " MLFLOW_ALLOW_FILE_STORE=true: set it, or log to a server (http://HOST:5000)")


def _mlflow_major() -> int | None:
    """The installed MLflow's major version (the full or the skinny package)."""
    from importlib import metadata

    for distribution in ("mlflow", "mlflow-skinny"):
        try:
            return int(metadata.version(distribution).split(".")[0])
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return None


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
