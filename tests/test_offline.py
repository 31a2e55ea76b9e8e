"""Offline is a first-class place: every path that touches the network ends at once, in one
line, when there is no network at all, and does not wait in a retry loop that cannot succeed.

"No network" is real: each command runs in a new network namespace (``unshare -n``: no
interface up, not even loopback, no DNS), so these tests skip, with the reason, where the
kernel does not allow one. The hub is tests/hubserver.py on 127.0.0.1 (this machine has no
internet); inside the namespace that address is unreachable too, as a hub is on a node
without network.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO
from hubserver import Hub, timm_repo

from maskdist.model import weights

HUB_REPO = "timm/test_efficientnet.r160_in1k"


def _namespaces_allowed() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -n is not permitted here: {probe.stderr.strip()[:200]}"


pytestmark = pytest.mark.skipif(_namespaces_allowed() is not None, reason=str(_namespaces_allowed()))


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "NO_ALBUMENTATIONS_UPDATE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hf-cache"), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **extra)
    return env


def _offline(args: list[str], env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    """``args`` run without any network (a new network namespace)."""
    return subprocess.run(["unshare", "-n", *args], env=env, capture_output=True, text=True, timeout=timeout)


def _maskdist(*args: str) -> list[str]:
    return [sys.executable, "-m", "maskdist", *args]


def test_weights_fetch_without_network_ends_at_once_in_one_line_and_its_advice_works(tmp_path):
    # the endpoint is a real host name: no DNS in the namespace
    env = _env(tmp_path, HF_ENDPOINT="https://huggingface.co")
    result = _offline(_maskdist("weights", "fetch", "test_efficientnet"), env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "Retrying" not in result.stderr and "nothing was retried" in result.stderr
    assert "cannot be looked up" in result.stderr
    # the advice names what works from there: fetch where the network is, into the same cache
    # (or as a file to carry); `--pretrained FILE` is train's option, not fetch's
    assert "on a machine with network run `maskdist weights fetch test_efficientnet` with the same HF_HOME" in result.stderr
    assert "--out test_efficientnet.safetensors" in result.stderr

    files, _state = timm_repo("test_efficientnet", seed=7)
    with Hub({HUB_REPO: files}) as server:  # "a machine with network", sharing the cache
        online = subprocess.run(_maskdist("weights", "fetch", "test_efficientnet", "--out", str(tmp_path / "b0.safetensors")),
                                env=_env(tmp_path, HF_ENDPOINT=server.url, NO_PROXY="127.0.0.1"), capture_output=True,
                                text=True, timeout=120)
        assert online.returncode == 0, online.stderr
        # back without network, and without HF_HUB_OFFLINE: the cache answers, nothing waits
        again = _offline(_maskdist("weights", "fetch", "test_efficientnet"), _env(tmp_path, HF_ENDPOINT=server.url))
    assert again.returncode == 0, again.stderr
    assert HUB_REPO in again.stdout and server.count("HEAD", "model.safetensors") == 1
    code = (f"from maskdist.model import weights; w = weights.resolve({str(tmp_path / 'b0.safetensors')!r}, 'test_efficientnet');"
            " print(w.record['source'])")
    carried = _offline([sys.executable, "-c", code], env, timeout=60)
    assert carried.returncode == 0 and carried.stdout.strip() == "file", carried.stderr


def test_a_mistyped_architecture_is_named_with_the_close_ones():
    with pytest.raises(weights.MaskdistError, match=r"unknown architecture 'efficientnet_b33'.*did you mean efficientnet_b3"):
        weights.fetch("efficientnet_b33")
    with pytest.raises(weights.MaskdistError, match=r"unknown architecture 'efficentnet_b3\.ra2_in1k'"):
        weights.resolve("hub", "efficentnet_b3.ra2_in1k")


def test_albumentations_does_not_look_for_updates_in_maskdist_processes(tmp_path):
    code = ("import os, maskdist, warnings; warnings.simplefilter('always');"
            " from maskdist.data import transforms; transforms.build_transform('light', 64, 48);"
            " print(os.environ['NO_ALBUMENTATIONS_UPDATE'])")
    ours = _offline([sys.executable, "-c", code], _env(tmp_path), timeout=60)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.strip() == "1" and "Error fetching version info" not in ours.stderr
    # the user's own setting wins, and then albumentations does look (and warns, offline)
    theirs = _offline([sys.executable, "-c", code], _env(tmp_path, NO_ALBUMENTATIONS_UPDATE="0"), timeout=60)
    assert theirs.stdout.strip() == "0" and "Error fetching version info" in theirs.stderr


@pytest.mark.parametrize("url", ["http://shards.example.org/sets/synth", "http://127.0.0.1:9/sets/synth"])
def test_remote_shards_without_network_are_not_retried(url, tmp_path):
    # a policy whose retries would wait 60 s and more: a run that retries says "retry 1 of"
    code = ("import logging, sys; logging.basicConfig(level=logging.WARNING);"
            " from maskdist.shards.manifest import open_shard_set; from maskdist.shards.opener import RetryPolicy;"
            f" open_shard_set({url!r}, RetryPolicy(tries=3, backoff_s=60))")
    result = _offline([sys.executable, "-c", code], _env(tmp_path), timeout=50)
    assert result.returncode != 0
    assert "retry 1 of" not in result.stderr and "nothing was retried" in result.stderr, result.stderr[-2000:]
    assert ("cannot be looked up" if "example" in url else "no network route to 127.0.0.1:9") in result.stderr


def test_a_tracker_server_without_network_is_refused_before_training(tmp_path):
    code = "from maskdist.train import trackers; trackers.parse('tensorboard,mlflow')"
    env = _env(tmp_path, MLFLOW_TRACKING_URI="http://mlflow.example.org:5000")
    result = _offline([sys.executable, "-c", code], env, timeout=60)
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert "--log-with mlflow: its server http://mlflow.example.org:5000 cannot be reached" in line
    assert "cannot be looked up" in line
