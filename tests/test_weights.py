"""--pretrained hub | repo | FILE | none: the Hugging Face cache, offline mode, broken downloads,
one download per node under a 2-process launch, and `maskdist weights fetch|list`.

There is no network here: tests/hubserver.py serves a tiny timm model on 127.0.0.1 and stands
in for the hub (HF_ENDPOINT points at it), so downloads, their requests and their failures
are real HTTP.
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from click.testing import CliRunner
from conftest import accelerate_cmd, launch_env
from hubserver import COMMIT, Hub, timm_repo

from maskdist.cli import main
from maskdist.errors import MaskdistError
from maskdist.model import weights
from maskdist.model.factory import create_model
from maskdist.system.fileio import sha256_file

REPO = "timm/test_efficientnet.r160_in1k"  # test_efficientnet's default tag, as timm names it


@pytest.fixture(scope="module")
def served():
    files, state = timm_repo("test_efficientnet", seed=7)
    return files, state


@pytest.fixture
def hub(served, tmp_path, monkeypatch):
    with Hub({REPO: served[0]}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield server


def _same_backbone(model, state) -> None:
    """Every served tensor but the 1000-class classifier (replaced by the 18-way head) loaded."""
    mine = model.state_dict()
    backbone = [k for k in state if not k.startswith("classifier.")]
    assert backbone and all(torch.equal(mine[k], state[k]) for k in backbone)


def test_hub_weights_are_the_served_ones_then_offline_from_the_cache(hub, served, monkeypatch, tmp_path):
    found = weights.resolve("hub", "test_efficientnet")
    assert found.record == {"source": "hf-hub", "repo_id": REPO, "revision": COMMIT, "file": "model.safetensors"}
    _same_backbone(create_model("test_efficientnet", pretrained_file=found.path), served[1])
    assert (hub.count("HEAD", "model.safetensors"), hub.count("GET", "model.safetensors")) == (1, 1)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = sum(hub.requests.values())
    again = weights.resolve(f"hf-hub:{REPO}", "test_efficientnet")  # the repo id names the same cache entry
    assert again.path == found.path and sum(hub.requests.values()) == before  # no request offline
    with pytest.raises(MaskdistError) as err:
        weights.resolve("hub", "test_efficientnet_gn")  # never fetched
    text = str(err.value)
    assert "\n" not in text and "maskdist weights fetch test_efficientnet_gn" in text and "--pretrained test_efficientnet_gn.safetensors" in text

    runner = CliRunner()
    listed = runner.invoke(main, ["weights", "list"])
    assert listed.exit_code == 0 and REPO in listed.output and COMMIT[:12] + " (main)" in listed.output
    assert f"{len(served[0]['model.safetensors']) / 1e6:.1f} MB" in listed.output
    out = tmp_path / "carry" / "b0.safetensors"  # fetch --out: one file to carry to a cluster (offline: from the cache)
    fetched = runner.invoke(main, ["weights", "fetch", "test_efficientnet", "--out", str(out)])
    assert fetched.exit_code == 0, fetched.output
    assert out.read_bytes() == served[0]["model.safetensors"]
    from_file = weights.resolve(str(out), "test_efficientnet")
    assert from_file.record == {"source": "file", "file": str(out), "sha256": sha256_file(found.path)}
    missing = runner.invoke(main, ["weights", "fetch", "test_efficientnet_gn"])
    assert missing.exit_code == 2 and missing.output.count("\n") == 1 and "not in the Hugging Face cache" in missing.output


def test_truncated_or_corrupt_downloads_are_not_trusted(hub, served, monkeypatch):
    hub.truncate = True  # half the body under the full Content-Length; then the hub is gone
    with pytest.raises(MaskdistError) as err:
        weights.resolve("hub", "test_efficientnet")
    assert "\n" not in str(err.value) and "nothing was kept in the cache" in str(err.value)
    blobs = list(weights.Path(weights.cache_dir()).rglob("blobs/*"))
    assert blobs == []  # no partial file, under its name or a temporary one
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MaskdistError, match="not in the Hugging Face cache"):
        weights.resolve("hub", "test_efficientnet")
    monkeypatch.delenv("HF_HUB_OFFLINE")

    hub.truncate, hub.corrupt = False, True  # the right length, the wrong bytes: the sha256 check catches it
    with pytest.raises(MaskdistError, match="corrupt .* removed from the cache"):
        weights.resolve("hub", "test_efficientnet")
    assert list(weights.Path(weights.cache_dir()).rglob("blobs/*")) == []
    hub.corrupt = False
    _same_backbone(create_model("test_efficientnet", pretrained_file=weights.resolve("hub", "test_efficientnet").path),
                   served[1])


def test_file_and_none_sources(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach a network
    assert weights.resolve("none", "test_efficientnet") == weights.Weights(None, {"source": "none"})
    assert weights.repo_of("timm/efficientnet_b3.ra2_in1k", "efficientnet_b3") == "timm/efficientnet_b3.ra2_in1k"
    assert weights.repo_of("hub", "efficientnet_b3") == "timm/efficientnet_b3.ra2_in1k"
    with pytest.raises(MaskdistError, match="not found: pass a local"):
        weights.resolve("weights/b3.safetensors", "efficientnet_b3")
    with pytest.raises(MaskdistError, match="timm has no hub weights"):
        weights.resolve("hub", "efficientnet_b6")  # an architecture timm has no pretrained tag of
    from maskdist import config

    assert config.load("recipe", {"shards": "x"}).pretrained == "hub" and config.load("strong", {"shards": "x"}).pretrained == "hub"
    assert config.load("cpu_fast", {"shards": "x"}).pretrained == "none" and config.TrainConfig(pretrained="").pretrained == "none"


@pytest.mark.duration(10)
def test_two_process_launch_downloads_once_per_node(served, small_shards, tmp_path):
    with Hub({REPO: served[0]}) as hub:
        env = launch_env(tmp_path) | {"HF_ENDPOINT": hub.url, "NO_PROXY": "127.0.0.1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        cmd = accelerate_cmd(2, "train", "--config", "cpu_fast", "--shards", str(small_shards), "--fold", "0", "--out",
                             str(tmp_path / "runs"), "--pretrained", "hub", "--epochs", "1", "--max-steps", "2", "--resize", "64",
                             "--crop", "48", "--batch-size", "8", "--workers", "0", "--val-workers", "0", "--timeout-s", "120")
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "2 process(es)" in result.stdout and "random weights" not in result.stderr
        # the local main process asked the hub once; the other rank read the cache only
        assert (hub.count("HEAD", "model.safetensors"), hub.count("GET", "model.safetensors")) == (1, 1)
    card = json.loads((tmp_path / "runs" / "fold0" / "model.json").read_text())
    assert card["pretrained"] == {"source": "hf-hub", "repo_id": REPO, "revision": COMMIT, "file": "model.safetensors"}
