"""The streaming loader on real shards, real DataLoader workers and a real 2-process launch.

The shard set is written here (tiny 12x16 JPEGs, uneven shards, a one-sample class, an
empty class, outside samples, a few eval shards and a planted pickle), so every corner the
loader must survive is present and each test runs in seconds.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import free_port

from maskdist import streams
from maskdist.data.transforms import build_transform
from maskdist.errors import MaskdistError
from maskdist.shards.format import ShardFormatError
from maskdist.shards.manifest import open_shard_set
from maskdist.streams import training as stream_training

REPO = Path(__file__).resolve().parents[1]
FOLDS = 3
SHARD_SIZE = 11
# Samples per class in every fold; class 8 has a single sample (fold 1 only), class 17 none.
PER_FOLD = [13, 9, 3, 20, 25, 4, 5, 3, 0, 7, 8, 2, 5, 3, 1, 6, 7, 0]
EXTRA = {2: 4}  # outside samples (fold -1), class 2
EVAL_SAMPLES, EVAL_SHARD = 13, 6  # three eval shards: 6, 6, 1


class _Pwn:
    """Unpickling this creates ``path`` (stands in for arbitrary code)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(rng: np.random.Generator, h: int = 12, w: int = 16) -> bytes:
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def write_tiny_set(root: Path, pwned: Path) -> Path:
    """A shard set in the manifest format with awkward proportions (see module docstring)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    entries = []
    totals: dict[str, list[int]] = {}

    def write(relpath: str, samples: list[tuple[str, dict]], split: str, fold, cls, planted: bool = False):
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        counts = [0] * 18 if split == "train" else None
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for i, (key, meta) in enumerate(samples):
                _member(tar, f"{key}.jpg", _jpeg(rng))
                if planted and i == 0:  # a member with the sample's key and another extension
                    _member(tar, f"{key}.pyd", pickle.dumps(_Pwn(str(pwned))))
                _member(tar, f"{key}.json", json.dumps(meta).encode())
                if counts is not None:
                    counts[meta["label"]] += 1
            if planted:  # and a stand-alone one
                _member(tar, "zz-evil.pickle", pickle.dumps(_Pwn(str(pwned))))
        data = path.read_bytes()
        entries.append({"path": relpath, "split": split, "fold": fold, "class": cls, "samples": len(samples),
                        "class_counts": counts, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    folds = [(f, PER_FOLD if f != 1 else [n if c != 8 else 1 for c, n in enumerate(PER_FOLD)]) for f in range(FOLDS)]
    folds.append((-1, [EXTRA.get(c, 0) for c in range(18)]))
    for fold, counts in folds:
        name = "extra" if fold == -1 else str(fold)
        totals[name] = list(counts)
        for cls, n in enumerate(counts):
            samples = []
            for i in range(n):
                person = f"p{fold + 1}{cls:02d}{i:03d}"
                key = f"extra/{fold + 1}{cls:02d}{i:03d}" if fold == -1 else f"{person}/mask{i % 5 + 1}"
                samples.append((key, {"person": person, "label": cls, "label_true": cls, "fold": fold, "relpath": key}))
            for s, start in enumerate(range(0, n, SHARD_SIZE)):
                folder = "extra" if fold == -1 else f"fold{fold}"
                write(f"train/{folder}/c{cls:02d}-{s:06d}.tar", samples[start:start + SHARD_SIZE], "train", fold, cls,
                      planted=(fold == 0 and cls == 4 and s == 0))
    eval_samples = [(f"eval/{r:06d}", {"row": r, "image_id": f"{r:040x}.jpg", "relpath": f"images/{r}.jpg"})
                    for r in range(EVAL_SAMPLES)]
    for s, start in enumerate(range(0, EVAL_SAMPLES, EVAL_SHARD)):
        write(f"eval/eval-{s:06d}.tar", eval_samples[start:start + EVAL_SHARD], "eval", None, None)
    manifest = {
        "format": "maskdist-shards", "format_version": 1,
        "build": {"train_dir": None, "eval_dir": None, "folds": FOLDS, "seed": 0, "age_cut": 58, "image_size": 16},
        "image": {"format": "jpg", "short_side": 12}, "num_classes": 18, "folds": FOLDS, "age_cut": 58,
        "shards": entries, "totals": {"train": totals, "train_true": totals, "eval": EVAL_SAMPLES},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("stream")
    pwned = base / "PWNED"
    return write_tiny_set(base / "set", pwned), pwned


def _all_keys(shard_set, which) -> list[str]:
    shards, _ = streams.eval_shards(shard_set, which)
    return [s["__key__"] for shard in shards for s in streams.read_shard(shard_set, shard["path"])]


# --- training stream -------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_class_shares_follow_alpha(tiny, alpha):
    shard_set = open_shard_set(tiny[0])
    folds = streams.folds_except(shard_set, 0)
    counts = shard_set.class_counts(folds)
    expected = [n ** alpha if n else 0.0 for n in counts]
    expected = [e / sum(expected) for e in expected]
    loader, steps = streams.train_loader(shard_set, folds, batch_size=100, workers=0, seed=1, alpha=alpha,
                                        transform=None, shuffle_buffer=50)
    # several epochs of an infinite stream: 10,000+ samples, tolerance 2 percentage points
    seen = Counter()
    for epoch in range(math.ceil(10_000 / (steps * 100))):
        loader.set_epoch(epoch)
        for batch in loader:
            seen.update(batch["label"].tolist())
    total = sum(seen.values())
    assert total >= 10_000
    assert seen[17] == 0 and counts[17] == 0  # empty class: never drawn, breaks nothing
    for c in range(18):
        assert abs(seen[c] / total - expected[c]) < 0.02, (c, seen[c] / total, expected[c])


@pytest.mark.parametrize("world,workers,batch", [(1, 0, 7), (2, 1, 8), (2, 3, 8), (3, 2, 50), (4, 3, 1), (2, 2, 400)])
def test_every_rank_yields_exactly_steps_full_batches(tiny, world, workers, batch):
    shard_set = open_shard_set(tiny[0])
    folds = [1, 2]
    n = shard_set.samples("train", folds)
    for rank in range(world):
        loader, steps = streams.train_loader(shard_set, folds, batch, rank=rank, world_size=world, workers=workers,
                                            transform=None, shuffle_buffer=8)
        assert steps == math.ceil(n / (batch * world)) == len(loader)
        for epoch in range(2):
            loader.set_epoch(epoch)
            sizes = [len(b["key"]) for b in loader]
            assert sizes == [batch] * steps, (rank, epoch)
        loader.close()


def _sequence(shard_set, rank=0, workers=0, seed=3, epoch=0, world=2, batches=None):
    loader, _ = streams.train_loader(shard_set, [0, 1], 4, rank=rank, world_size=world, workers=workers, seed=seed,
                                    transform=None, shuffle_buffer=8)
    loader.set_epoch(epoch)
    out = [tuple(b["key"]) for b in loader]
    loader.close()
    return out


def test_seeds_differ_by_rank_worker_epoch_and_reproduce(tiny):
    shard_set = open_shard_set(tiny[0])
    base = _sequence(shard_set)
    assert base == _sequence(shard_set)  # same seed, same everything: same batches
    assert base != _sequence(shard_set, rank=1)
    assert base != _sequence(shard_set, epoch=1)
    assert base != _sequence(shard_set, seed=4)
    # two workers: their batches alternate in the loader; they must not replay one sequence
    two = _sequence(shard_set, workers=2)
    assert two == _sequence(shard_set, workers=2)
    assert two[0::2][: len(two[1::2])] != two[1::2]


def test_epochs_reach_persistent_workers(tiny):
    shard_set = open_shard_set(tiny[0])
    loader, _ = streams.train_loader(shard_set, [0, 1], 4, workers=2, seed=3, transform=None, shuffle_buffer=8)
    epochs = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        epochs.append([tuple(b["key"]) for b in loader])
    pids = loader.worker_pids()
    assert len(pids) == 2  # the same persistent workers served all three epochs
    loader.close()
    assert epochs[0] != epochs[1] and epochs[0] == epochs[2]
    # without set_epoch, each worker counts its own passes: epochs still differ
    loader, _ = streams.train_loader(shard_set, [0, 1], 4, workers=2, seed=3, transform=None, shuffle_buffer=8)
    first, second = ([tuple(b["key"]) for b in loader] for _ in range(2))
    loader.close()
    assert first == epochs[0] and second == epochs[1]


def test_train_batches_are_uint8_nchw_with_labels(tiny):
    shard_set = open_shard_set(tiny[0])
    loader, steps = streams.train_loader(shard_set, [0], 6, workers=0, transform="light")
    loader.set_epoch(0)
    batch = next(iter(loader))
    assert batch["image"].dtype == __import__("torch").uint8
    assert tuple(batch["image"].shape) == (6, 3, 150, 150)
    assert batch["label"].tolist() == batch["label_true"].tolist()  # the fixture's labels agree
    assert all(k.split("/")[0].startswith("p1") or k.startswith("extra/") for k in batch["key"])  # fold 0 (+ extra)


def test_empty_selection_is_a_clear_error(tiny):
    from maskdist.errors import MaskdistError

    shard_set = open_shard_set(tiny[0])
    with pytest.raises(MaskdistError):
        streams.train_loader(shard_set, [], 4, workers=0, extra=False)


# --- evaluation stream -----------------------------------------------------------------------


@pytest.mark.parametrize("which", [0, 1, "eval"])
def test_eval_exactly_once_for_every_split(tiny, which):
    shard_set = open_shard_set(tiny[0])
    everything = sorted(_all_keys(shard_set, which))
    assert len(everything) == len(set(everything))
    for world in (1, 2, 3, 5, 16):
        for workers in (1, 2, 3):
            seen = []
            for rank in range(world):
                shards, fields = streams.eval_shards(shard_set, which)
                for worker in range(workers):
                    mine, modulus, residue = streams.eval_plan(shards, rank, world, worker, workers)
                    seen += [s["__key__"] for i, s in enumerate(
                        x for sh in mine for x in streams.read_shard(shard_set, sh["path"])) if i % modulus == residue]
            assert sorted(seen) == everything, (world, workers)


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 0), (1, 3)])
def test_eval_loader_exactly_once_with_real_workers(tiny, world, workers):
    shard_set = open_shard_set(tiny[0])
    for which in (2, "eval"):
        seen = []
        for rank in range(world):
            loader = streams.eval_loader(shard_set, which, 4, rank=rank, world_size=world, workers=workers, transform=None)
            batches = list(loader)
            assert len(batches) == len(loader)
            keys = [k for b in batches for k in b["key"]]
            assert len(keys) == loader.dataset.samples
            field = "row" if which == "eval" else "label"
            assert all(len(b[field]) == len(b["key"]) == b["image"].shape[0] for b in batches)
            if which == "eval":
                assert [int(k.split("/")[1]) for k in keys] == [r for b in batches for r in b["row"].tolist()]
            seen += keys
            loader.close()
        assert sorted(seen) == sorted(_all_keys(shard_set, which))


def test_planted_pickle_is_never_unpickled(tiny, tmp_path):
    root, pwned = tiny
    shard_set = open_shard_set(root)
    # the planted members are real: unpickling one would create its file
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Pwn(str(probe))))
    assert probe.exists()
    loader = streams.eval_loader(shard_set, 0, 8, workers=0, transform="none")
    keys = [k for b in loader for k in b["key"]]
    train, _ = streams.train_loader(shard_set, [0], 8, workers=0, transform=None)
    for _ in train:
        pass
    assert "zz-evil" not in keys and len(keys) == shard_set.samples("train", [0], extra=False)
    assert not pwned.exists()


# --- a real 2-process launch -------------------------------------------------------------------


def _run_or_kill(cmd: list[str], env: dict, log: Path, timeout: float, what: str) -> int:
    """Run with output to ``log``, in its own session: on a hang the whole group (launcher,
    ranks, DataLoader workers) is killed and the test fails; orphans holding a pipe cannot
    block it."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            import psutil

            # the launcher starts ranks in sessions of their own: kill every descendant
            family = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            for child in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            proc.wait()
            pytest.fail(f"{what} hung:\n{log.read_text()[-3000:]}")


@pytest.mark.duration(38)
def test_two_process_ddp_equal_steps_and_exact_eval(tiny, tmp_path):
    root, _ = tiny
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--machine_rank", "0", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "tests" / "ddp" / "stream_ddp.py"), str(root), str(out), "--batch-size", "8", "--workers", "2"]
    log = tmp_path / "launch.log"
    rc = _run_or_kill(cmd, env, log, timeout=150, what="2-process launch (unequal steps per rank?)")
    assert rc == 0, log.read_text()[-4000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    shard_set = open_shard_set(root)
    n = shard_set.samples("train", [1, 2])
    steps = math.ceil(n / 16)
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2
        assert res["steps_expected"] == steps
        for epoch in res["epochs"]:
            assert epoch["steps"] == steps and epoch["all_steps"] == [steps, steps]
            assert all(len(k) == 8 for k in epoch["keys"])
    # ranks and epochs saw different sequences
    assert results[0]["epochs"][0]["keys"] != results[1]["epochs"][0]["keys"]
    assert results[0]["epochs"][0]["keys"] != results[0]["epochs"][1]["keys"]
    for which in ("0", "eval"):
        keys = results[0]["eval"][which]["keys"] + results[1]["eval"][which]["keys"]
        expected = sorted(_all_keys(shard_set, int(which) if which != "eval" else "eval"))
        assert sorted(keys) == expected  # every sample exactly once across the two ranks
        assert results[0]["eval"][which]["gathered"] == expected
        for res in results:
            ev = res["eval"][which]
            assert ev["batches"] == ev["len"] and len(ev["keys"]) == ev["samples"]
    assert sorted(results[0]["eval"]["eval"]["labels"] + results[1]["eval"]["eval"]["labels"]) == list(range(EVAL_SAMPLES))


def test_workers_start_after_the_parent_used_opencv_threads(tiny, tmp_path):
    # Regression: a forked worker calling cv2.setNumThreads(1) after the parent used
    # OpenCV's thread pool waited forever. Run in a subprocess so a hang is a failure.
    code = f"""
import cv2, numpy as np
from maskdist import streams
cv2.setNumThreads(2)
img = np.zeros((600, 600, 3), np.uint8)
for _ in range(3):
    cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (300, 300))
loader = streams.eval_loader({str(tiny[0])!r}, 0, 4, workers=2, transform="none")
print(sum(len(b["key"]) for b in loader), cv2.getNumThreads())
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    log = tmp_path / "out.log"
    rc = _run_or_kill([sys.executable, "-c", code], env, log, timeout=90, what="loader after parent OpenCV use")
    assert rc == 0, log.read_text()[-3000:]
    n = open_shard_set(tiny[0]).samples("train", [0], extra=False)
    assert log.read_text().split()[-2:] == [str(n), "2"]


# --- reading: the strict tar reader, batches written in place ---------------------------------


def _odd_shard(path: Path, members: list[tuple]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, *kind in members:
            info = tarfile.TarInfo(name)
            if kind:
                info.type = kind[0]
                info.linkname = "k0.jpg" if kind[0] == tarfile.SYMTYPE else ""
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_read_shard_skips_folders_and_refuses_links_and_truncation(tiny, tmp_path):
    rng = np.random.default_rng(1)
    root = write_tiny_set(tmp_path / "set", tmp_path / "PWNED")
    shard_set = open_shard_set(root)
    jpg, meta = _jpeg(rng), json.dumps({"label": 1, "label_true": 1}).encode()
    _odd_shard(root / "folder.tar", [("p", None, tarfile.DIRTYPE), ("p/k0.jpg", jpg), ("p/k0.json", meta),
                                     ("p/k0.txt", b"note"), ("p/k1.JPG", jpg), ("p/k1.json", meta)])
    samples = list(streams.read_shard(shard_set, "folder.tar"))
    assert [(s["__key__"], s["__index__"], s["jpg"], s["json"]) for s in samples] == \
        [("p/k0", 0, jpg, meta), ("p/k1", 1, jpg, meta)]
    assert [s["__key__"] for s in streams.read_shard(shard_set, "folder.tar", start=1)] == ["p/k1"]
    _odd_shard(root / "link.tar", [("k0.jpg", jpg), ("k0.json", meta), ("k1.jpg", None, tarfile.SYMTYPE)])
    with pytest.raises(ShardFormatError, match="link or device"):
        list(streams.read_shard(shard_set, "link.tar"))
    whole = (root / "folder.tar").read_bytes()
    (root / "cut.tar").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ShardFormatError, match="cut.tar: .*truncated"):
        list(streams.read_shard(shard_set, "cut.tar"))
    # a shard cut short makes the eval loader fail loudly (one line naming it), not yield less
    first = shard_set.shards("eval")[0]["path"]
    data = (root / first).read_bytes()
    (root / first).write_bytes(data[:len(data) // 3])  # (the last part of a tar can be padding)
    for workers in (0, 1):
        with pytest.raises(MaskdistError, match=f"{first}: .* bytes, the manifest says .*truncated.*evaluation reads every sample"):
            list(streams.eval_loader(shard_set, "eval", 4, workers=workers, transform=None))


def test_worker_batches_equal_in_process_batches(tiny):
    shard_set = open_shard_set(tiny[0])
    transform = build_transform("none", resize=(20, 24), crop=(16, 16))

    def by_key(workers):
        loader = streams.eval_loader(shard_set, "eval", 4, workers=workers, transform=transform)
        out = {k: (img.numpy().copy(), row) for b in loader for k, img, row in zip(b["key"], b["image"], b["row"].tolist())}
        loader.close()
        return out

    here, there = by_key(0), by_key(2)
    assert sorted(here) == sorted(there) and len(here) == EVAL_SAMPLES
    for key, (img, row) in here.items():
        assert img.shape == (3, 16, 16) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, there[key][0])
        assert row == there[key][1] == int(key.split("/")[1])
    # decode only (no fixed output size): images of one size are stacked
    loader = streams.eval_loader(shard_set, 0, 5, workers=0, transform=None)
    assert tuple(next(iter(loader))["image"].shape) == (5, 3, 12, 16)


def test_enlarging_stored_images_warns(tiny):
    import copy

    shard_set = copy.deepcopy(open_shard_set(tiny[0]))
    shard_set.manifest["image"]["shapes"] = {"12x16": 99}
    with pytest.warns(UserWarning, match=r"12x16 \(HxW\) are enlarged .*--image-size 224x224"):
        streams.eval_loader(shard_set, 0, 4, workers=0, transform="none")
    from maskdist.data import transforms

    assert streams.check_stored_size(shard_set, transforms.build_transform("none", resize=(12, 16), crop=8)) == []
    assert streams.check_stored_size(shard_set, transforms.build_transform("none", resize=None, crop=8)) == []
    with pytest.warns(UserWarning, match="12x17"):
        assert streams.check_stored_size(shard_set, transforms.build_transform("none", resize=(12, 17), crop=8)) == ["12x16"]


def test_small_shard_cache_changes_nothing_but_the_reads(tiny, monkeypatch):
    shard_set = open_shard_set(tiny[0])

    def keys(cache):
        loader, _ = streams.train_loader(shard_set, [0, 1], 4, workers=0, seed=7, transform=None, shuffle_buffer=5)
        loader.dataset._cache = cache
        out = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            out.append([k for b in loader for k in b["key"]])
        return out, loader.dataset._cache

    reads = Counter()
    real = streams.read_shard

    def counting(shard_set, shard, start=0, stop=None):
        reads[shard["path"] if isinstance(shard, dict) else shard] += 1
        return real(shard_set, shard, start, stop)

    monkeypatch.setattr(stream_training, "read_shard", counting)
    plain, _ = keys(stream_training._ShardCache(budget=0))
    uncached_reads = sum(reads.values())
    reads.clear()
    cached, cache = keys(None)  # the default: a cache made on first iteration
    assert cached == plain
    assert cache.used > 0 and set(cache.shards) == set(reads) and all(n == 1 for n in reads.values())
    assert sum(reads.values()) < uncached_reads
    budget = sorted(s["bytes"] for s in shard_set.shards("train", [0, 1]))[2]
    limited, cache = keys(stream_training._ShardCache(budget=budget))
    assert limited == plain and 0 < cache.used <= budget


@pytest.mark.parametrize("workers", [0, 3])
def test_a_resumed_epoch_yields_the_rest_of_the_uninterrupted_epoch(tiny, workers):
    """set_epoch(e, s) gives exactly batches s.. of epoch e, same keys and same (augmented)
    pixels, for every s: the DataLoader's worker turns, the per-batch augmentation seeds and
    the undecoded skipping all line up."""
    shard_set = open_shard_set(tiny[0])
    transform = build_transform("light", resize=(20, 24), crop=(16, 16))
    loader, steps = streams.train_loader(shard_set, [1, 2], batch_size=4, workers=workers, seed=3, transform=transform,
                                        shuffle_buffer=8)
    try:
        loader.set_epoch(2)
        whole = [(b["key"], b["image"].clone(), b["step"]) for b in loader]
        assert [s for _k, _i, s in whole] == list(range(steps)) and steps >= 7
        for start in range(steps + 1):
            loader.set_epoch(2, start)
            rest = [(b["key"], b["image"]) for b in loader]
            assert [k for k, _ in rest] == [k for k, _i, _s in whole[start:]], start
            assert all(np.array_equal(a.numpy(), b.numpy()) for (_, a), (_, b, _) in zip(rest, whole[start:])), start
    finally:
        loader.close()
