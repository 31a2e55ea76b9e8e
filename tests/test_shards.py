"""Shard sets: build, inspect, verify, remote access (real tars on disk, small synthetic data)."""
from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import shutil
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from maskdist import shards as shards_api
from maskdist.cli import main
from maskdist.data import images, labels
from maskdist.errors import MaskdistError
from maskdist.shards import build as shards_build, format as shard_format, tario
from maskdist.shards.manifest import open_shard_set

SHARD_SIZE = 8  # small, so groups span several shards


# --- fixtures --------------------------------------------------------------------------------


def _people(train: Path) -> list[str]:
    return sorted(p.name for p in (train / "images").iterdir() if not p.name.startswith("."))


# The module's tests share expensive module fixtures: one unit for the scheduler.
pytestmark = [pytest.mark.xdist_group("shards-built"), pytest.mark.duration(60)]


@pytest.fixture(scope="module")
def odd_data(small_synth, tmp_path_factory) -> dict:
    """small_synth plus bad and odd-mode images and an extra CSV; returns what was planted."""
    root = tmp_path_factory.mktemp("odd") / "data"
    shutil.copytree(small_synth, root)
    train = root / "train"
    people = _people(train)
    bad, odd = people[0], people[1]
    folder = train / "images" / bad
    good_jpeg = (folder / "mask1.jpg").read_bytes()
    (folder / "mask1.jpg").write_bytes(b"")  # zero-byte
    (folder / "mask2.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])  # truncated
    (folder / "mask3.jpg").write_bytes(b"GIF89a" + bytes(range(256)) * 8)  # corrupt
    folder = train / "images" / odd
    rgb = np.asarray(Image.open(folder / "mask1.jpg").convert("RGB"))
    Image.fromarray(rgb).convert("CMYK").save(folder / "mask1.jpg", "JPEG")  # CMYK JPEG
    (folder / "mask2.jpg").unlink()
    rgba = Image.fromarray(rgb).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "mask2.png")  # RGBA PNG
    (folder / "mask3.jpg").unlink()
    Image.fromarray(rgb).convert("L").save(folder / "mask3.png")  # grayscale PNG
    # Extra (outside) images, labelled by class.
    extra_dir = root / "outside"
    (extra_dir / "img").mkdir(parents=True)
    source = train / "images" / people[2]
    rows = []
    for n, (stem, label) in enumerate((("normal", 14), ("normal", 17), ("mask1", 2))):
        shutil.copy(source / f"{stem}.jpg", extra_dir / "img" / f"x{n}.jpg")
        rows.append({"path": f"img/x{n}.jpg", "label": label})
    pd.DataFrame(rows).to_csv(extra_dir / "extra.csv", index=False)
    return {"root": root, "train": train, "eval": root / "eval", "extra": extra_dir / "extra.csv", "bad": bad, "odd": odd}


def _build(data: dict, out: Path, **options):
    kwargs = dict(eval_dir=data["eval"], folds=3, seed=0, shard_size=SHARD_SIZE, extra=[data["extra"]])
    kwargs.update(options)
    return shards_api.build_shards(data["train"], out, **kwargs)


@pytest.fixture(scope="module")
def built(odd_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "set"
    _build(odd_data, out, workers=2)
    return out


def _read_set(root: Path) -> dict[str, list[dict]]:
    """Every shard's samples, read straight from the tars: {relpath: [{key, jpg, json}]}."""
    manifest = json.loads((root / "manifest.json").read_text())
    out = {}
    for shard in manifest["shards"]:
        samples: dict[str, dict] = {}
        with tarfile.open(root / shard["path"]) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                samples.setdefault(key, {"key": key})[ext] = json.loads(data) if ext == "json" else data
        out[shard["path"]] = list(samples.values())
    return out


def _copy_set(built: Path, tmp_path: Path) -> Path:
    target = tmp_path / "set"
    shutil.copytree(built, target)
    return target


# --- build -----------------------------------------------------------------------------------


def test_manifest_totals_equal_recount(built):
    manifest = json.loads((built / "manifest.json").read_text())
    contents = _read_set(built)
    train = {}
    for shard in manifest["shards"]:
        samples = contents[shard["path"]]
        assert len(samples) == shard["samples"]
        assert hashlib.sha256((built / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
        assert (built / shard["path"]).stat().st_size == shard["bytes"]
        assert all(set(s) == {"key", "jpg", "json"} for s in samples)
        if shard["split"] == "train":
            counts = [0] * 18
            for s in samples:
                counts[s["json"]["label"]] += 1
            assert counts == shard["class_counts"]
            name = "extra" if shard["fold"] == -1 else str(shard["fold"])
            train[name] = [a + b for a, b in zip(train.get(name, [0] * 18), counts)]
    assert train == manifest["totals"]["train"]
    assert manifest["totals"]["eval"] == sum(len(v) for k, v in contents.items() if k.startswith("eval/"))
    report = json.loads((built / "report.json").read_text())
    assert report["written"] == sum(len(v) for v in contents.values())
    assert report["read"] == report["written"] + report["skipped"]


def test_shards_grouped_by_fold_and_class(built):
    manifest = json.loads((built / "manifest.json").read_text())
    contents = _read_set(built)
    groups = {}
    for shard in manifest["shards"]:
        if shard["split"] != "train":
            assert re.fullmatch(r"eval/eval-\d{6}\.tar", shard["path"])
            continue
        folder = "extra" if shard["fold"] == -1 else f"fold{shard['fold']}"
        assert re.fullmatch(rf"train/{folder}/c{shard['class']:02d}-\d{{6}}\.tar", shard["path"])
        assert 1 <= shard["samples"] <= SHARD_SIZE
        groups.setdefault((shard["fold"], shard["class"]), []).append(shard)
        for s in contents[shard["path"]]:
            meta = s["json"]
            assert (meta["fold"], meta["label"]) == (shard["fold"], shard["class"])
            assert meta["label_true"] == (meta["label"] if meta["age"] == -1 else labels.label_of(meta["mask"], meta["gender"], meta["age"]))
            assert set(meta) == set(shard_format.TRAIN_SCHEMA)
    assert {fold for fold, _ in groups} == {0, 1, 2, -1}
    assert any(len(g) > 1 for g in groups.values())  # a group larger than --shard-size spans shards
    # Within a group, only the last shard may be short.
    for group in groups.values():
        assert all(s["samples"] == SHARD_SIZE for s in group[:-1])


def test_no_person_in_two_folds(built):
    folds = {}
    for path, samples in _read_set(built).items():
        for s in samples:
            if path.startswith("train/") and s["json"]["source"] == "competition":
                folds.setdefault(s["json"]["person"], set()).add(s["json"]["fold"])
                assert s["key"] == f"{s['json']['person']}/{Path(s['json']['relpath']).stem}"
    assert folds and all(len(f) == 1 for f in folds.values())


def test_eval_in_info_csv_order(built, odd_data):
    info = pd.read_csv(odd_data["eval"] / "info.csv", dtype=str)
    contents = _read_set(built)
    metas = [s["json"] for path in sorted(contents) if path.startswith("eval/") for s in contents[path]]
    assert [m["image_id"] for m in metas] == list(info["ImageID"])
    assert [m["row"] for m in metas] == list(range(len(info)))
    assert all(s["key"] == f"eval/{s['json']['row']:06d}" for p in contents if p.startswith("eval/") for s in contents[p])


def test_bad_images_skipped_and_odd_modes_written_as_rgb(built, odd_data):
    report = json.loads((built / "report.json").read_text())
    skipped = {Path(s["relpath"]).name: s["reason"] for s in report["skipped_files"]}
    assert skipped == {"mask1.jpg": "empty", "mask2.jpg": "truncated", "mask3.jpg": "corrupt"}
    assert all(odd_data["bad"] in s["relpath"] for s in report["skipped_files"])
    assert report["skipped_by_reason"] == {"corrupt": 1, "empty": 1, "truncated": 1}
    assert report["layout"]["problems"]  # synth junk files are reported from the layout
    written = {s["json"]["relpath"]: s["jpg"] for v in _read_set(built).values() for s in v if "relpath" in s["json"]}
    for name in ("mask1.jpg", "mask2.png", "mask3.png"):
        data = written[f"images/{odd_data['odd']}/{name}"]
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")
            assert im.size == (224, 224)  # the default: exactly the recipe's Resize((224, 224))
    assert not any(f"images/{odd_data['bad']}/mask{i}.jpg" in written for i in (1, 2, 3))


def test_extra_samples_train_only(built):
    contents = _read_set(built)
    extra = [s for p, v in contents.items() if p.startswith("train/extra/") for s in v]
    assert sorted(s["json"]["label"] for s in extra) == [2, 14, 17]
    assert all(s["json"]["source"] == "extra" and s["json"]["fold"] == -1 for s in extra)
    assert all(re.fullmatch(r"extra/\d{6}", s["key"]) for s in extra)
    elsewhere = [s for p, v in contents.items() if not p.startswith("train/extra/") for s in v]
    assert all(s["json"].get("source", "competition") == "competition" for s in elsewhere)
    shard_set = open_shard_set(built)
    assert not any("/extra/" in u for u in shard_set.urls("train", folds=[0], extra=False))


def test_rebuild_is_byte_identical_and_seed_changes_folds(built, odd_data, tmp_path):
    again = tmp_path / "again"
    _build(odd_data, again, workers=1)  # the fixture used 2 workers: same bytes either way
    first = json.loads((built / "manifest.json").read_text())["shards"]
    second = json.loads((again / "manifest.json").read_text())["shards"]
    assert [(s["path"], s["sha256"]) for s in first] == [(s["path"], s["sha256"]) for s in second]
    other = tmp_path / "other"
    _build(odd_data, other, seed=1)
    folds_of = lambda root: {s["json"]["person"]: s["json"]["fold"] for v in _read_set(root).values() for s in v if "person" in s["json"]}  # noqa: E731
    assert folds_of(built) != folds_of(other)
    assert folds_of(built).keys() == folds_of(other).keys()


def test_cli_build_refuses_overwrite_and_prints_summary(odd_data, tmp_path):
    out = tmp_path / "set"
    runner = CliRunner()
    args = ["shards", "build", str(odd_data["train"]), "--out", str(out), "--folds", "2", "--quiet", "--image-size", "original"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "skipped (truncated): 1" in result.output and f"{odd_data['bad']}/mask2.jpg" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image"]["short_side"] is None and manifest["build"]["image_size"] == "original"
    assert manifest["image"]["shapes"] == {"512x384": manifest["totals"]["eval"] + sum(map(sum, manifest["totals"]["train"].values()))}
    first = (out / "manifest.json").read_bytes()
    result = runner.invoke(main, args)
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output
    assert (out / "manifest.json").read_bytes() == first
    result = runner.invoke(main, args[:-2] + ["--overwrite"])
    assert result.exit_code == 0, result.output
    cli_default = next(p.default for p in main.commands["shards"].commands["build"].params if p.name == "image_size")
    size = shards_api.parse_image_size(cli_default)  # the CLI's default, whatever it is, is what gets recorded
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["image_size"] == shards_build.image_size_text(size)
    assert (manifest["image"]["short_side"], manifest["image"]["size"]) == \
        ((size, None) if isinstance(size, int) else (None, list(size)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temp or old folders left


def test_interrupted_build_leaves_nothing(odd_data, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = shards_build._encode_task

    def dying(task):
        # Simulates a kill / Ctrl-C part-way through the build (after 50 images).
        calls["n"] += 1
        if calls["n"] > 50:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(shards_build, "_encode_task", dying)
    out = tmp_path / "set"
    with pytest.raises(KeyboardInterrupt):
        _build(odd_data, out, workers=1)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    # A build killed with -9 cannot clean up; the next build removes its partial folder.
    stale = tmp_path / ".set.partial-999999999"
    (stale / "train").mkdir(parents=True)
    monkeypatch.setattr(shards_build, "_encode_task", real)
    _build(odd_data, out, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_build_errors_are_one_line(odd_data, tmp_path):
    with pytest.raises(MaskdistError, match="--image-size"):
        _build(odd_data, tmp_path / "x", image_size="huge")
    with pytest.raises(MaskdistError, match="not found"):
        shards_api.build_shards(tmp_path / "nothing", tmp_path / "y")
    assert not (tmp_path / "x").exists()


# --- inspect / verify ------------------------------------------------------------------------


def test_inspect_json_matches_manifest(built):
    result = CliRunner().invoke(main, ["shards", "inspect", str(built), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    manifest = json.loads((built / "manifest.json").read_text())
    assert {k: v["classes"] for k, v in info["train"].items()} == manifest["totals"]["train"]
    assert info["eval_samples"] == manifest["totals"]["eval"]
    assert info["shards"] == len(manifest["shards"])
    assert info["bytes"] == sum(s["bytes"] for s in manifest["shards"])
    assert info["image"]["size"] == [224, 224] and info["image"]["short_side"] is None and info["build"]["folds"] == 3
    assert info["build"]["image_size"] == shards_api.DEFAULT_IMAGE_SIZE == "224x224"
    text = CliRunner().invoke(main, ["shards", "inspect", str(built)]).output
    assert "extra" in text and "eval:" in text and "exactly 224x224" in text


def test_verify_ok(built):
    for extra in ([], ["--quick"]):
        result = CliRunner().invoke(main, ["shards", "verify", str(built), "--quiet", *extra])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("ok:")


def _rewrite_tar(path: Path, change) -> None:
    """Rewrite a tar with change(name, data) -> list of (name, data)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            for new_name, new_data in change(name, data):
                info = tarfile.TarInfo(new_name)
                info.size = len(new_data)
                tar.addfile(info, io.BytesIO(new_data))


def test_verify_catches_missing_truncated_and_tampered(built, tmp_path):
    root = _copy_set(built, tmp_path)
    shards = json.loads((root / "manifest.json").read_text())["shards"]
    missing, truncated, tampered, smuggled = (s["path"] for s in shards[:4])
    (root / missing).unlink()
    data = (root / truncated).read_bytes()
    (root / truncated).write_bytes(data[: len(data) // 2])

    def relabel(name, data):
        if name.endswith(".json"):
            meta = json.loads(data)
            meta["label"] = (meta["label"] + 1) % 18
            data = json.dumps(meta).encode()
        return [(name, data)]

    _rewrite_tar(root / tampered, relabel)
    _rewrite_tar(root / smuggled, lambda n, d: [(n, d)] + ([(n.replace(".json", ".pyd"), b"cos\nsystem\n")] if n.endswith(".json") else []))
    runner = CliRunner()
    result = runner.invoke(main, ["shards", "verify", str(root), "--quiet"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    for path in (missing, truncated, tampered, smuggled):
        assert any(line.startswith(f"{path}: ") for line in lines), (path, result.output)
    assert any(missing in line and "missing" in line for line in lines)
    assert any(tampered in line and "label" in line for line in lines)
    assert any(smuggled in line and ".pyd" in line for line in lines)
    quick = runner.invoke(main, ["shards", "verify", str(root), "--quick", "--quiet"])
    assert quick.exit_code == 1
    assert all(any(line.startswith(f"{p}: ") for line in quick.output.splitlines()) for p in (missing, truncated, tampered, smuggled))


def test_verify_catches_person_in_two_folds(built, tmp_path):
    root = _copy_set(built, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    fold0 = next(s for s in manifest["shards"] if s["fold"] == 0)
    fold1 = next(s for s in manifest["shards"] if s["fold"] == 1 and s["class"] == fold0["class"])
    with tarfile.open(root / fold0["path"]) as tar:
        person = json.loads(next(tar.extractfile(m).read() for m in tar if m.name.endswith(".json")))["person"]

    def move(name, data):  # the fold-1 samples now claim to be the fold-0 person
        if name.endswith(".json"):
            meta = json.loads(data)
            meta["person"] = person
            data = json.dumps(meta).encode()
        return [(f"{person}/{name.split('/', 1)[1]}", data)]

    _rewrite_tar(root / fold1["path"], move)
    result = CliRunner().invoke(main, ["shards", "verify", str(root), "--quiet"])
    assert result.exit_code == 1 and f"person {person} is in folds [0, 1]" in result.output


def test_missing_manifest_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["shards", "inspect", str(tmp_path)])
    assert result.exit_code == 2
    assert "manifest.json not found" in result.output and "maskdist shards build" in result.output
    assert len(result.output.strip().splitlines()) == 1


# --- remote sets -----------------------------------------------------------------------------


@pytest.fixture
def http_url(built):
    handler = functools.partial(_QuietHandler, directory=str(built.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{built.name}"
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.parametrize("remote", ["http", "pipe"])
def test_remote_inspect_and_verify(remote, built, http_url):
    location = http_url if remote == "http" else f"pipe:cat {built}/{{}}"
    runner = CliRunner()
    local = json.loads(runner.invoke(main, ["shards", "inspect", str(built), "--json"]).output)
    result = runner.invoke(main, ["shards", "inspect", location, "--json"])
    assert result.exit_code == 0, result.output
    assert {k: v for k, v in json.loads(result.output).items() if k != "location"} == {k: v for k, v in local.items() if k != "location"}
    result = runner.invoke(main, ["shards", "verify", location, "--quiet"])
    assert result.exit_code == 0, result.output
    shard_set = open_shard_set(location)
    urls = shard_set.urls("train", folds=[1], classes=[0])
    assert urls and all(u.startswith(location.replace("{}", "train/fold1/c00-")) for u in urls)
    assert shard_set.samples("train", folds=[1], classes=[0]) == shard_set.class_counts(folds=[1], extra=False)[0]


def test_remote_missing_shard_and_manifest(built, tmp_path):
    root = _copy_set(built, tmp_path)
    first = json.loads((root / "manifest.json").read_text())["shards"][0]["path"]
    (root / first).unlink()
    result = CliRunner().invoke(main, ["shards", "verify", f"pipe:cat {root}/{{}}", "--quick", "--quiet"])
    assert result.exit_code == 1 and f"{first}: missing or unreadable" in result.output
    with pytest.raises(MaskdistError, match="manifest.json not found"):
        open_shard_set(f"pipe:cat {tmp_path}/nothing/{{}}")


def test_urls_for_webdataset(built):
    import webdataset as wds

    shard_set = open_shard_set(built)
    urls = shard_set.urls("train", folds=[0], extra=False)
    dataset = wds.WebDataset(urls, shardshuffle=False)  # no decoder: raw bytes only
    samples = list(dataset)
    assert len(samples) == shard_set.samples("train", folds=[0], extra=False)
    assert all(set(s) >= {"jpg", "json"} and json.loads(s["json"])["fold"] == 0 for s in samples)
    assert shard_set.urls("eval") == [str((built / "eval" / "eval-000000.tar").resolve())] + shard_set.urls("eval")[1:]


# --- images ----------------------------------------------------------------------------------


def test_image_checks():
    rgb = (np.arange(300 * 200 * 3) % 251).astype(np.uint8).reshape(300, 200, 3)
    jpeg = images.encode_jpeg(rgb)
    assert images.decode_rgb(jpeg).shape == (300, 200, 3)
    with pytest.raises(images.ImageError) as err:
        images.decode_rgb(jpeg[:-2])  # only the end-of-image marker missing
    assert err.value.reason == "truncated"
    with pytest.raises(images.ImageError) as err:
        images.decode_rgb(b"")
    assert err.value.reason == "empty"
    data, shape = images.prepare(jpeg, size=100)
    assert shape == (150, 100) and images.check_jpeg(data) == (150, 100)
    assert images.prepare(jpeg, size=512)[1] == (300, 200)  # a shorter side is never enlarged
    assert images.prepare(jpeg, size=None)[1] == (300, 200)
    data, shape = images.prepare(jpeg, size=(120, 100))  # an exact size: aspect not kept
    assert shape == (120, 100) and images.check_jpeg(data) == (120, 100)
    assert images.prepare(jpeg, size=(400, 150))[1] == (400, 150)  # exact means exact, even if one side grows
    assert images.prepare(jpeg)[1] == (224, 224)


# --- image size option ---------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [
    ("224", 224), (256, 256), ("224x224", (224, 224)), (" 128 X 96 ", (128, 96)), ((64, 48), (64, 48)),
    ("original", None), (None, None),
])
def test_parse_image_size(value, expected):
    assert shards_api.parse_image_size(value) == expected
    text = shards_build.image_size_text(expected)
    assert shards_api.parse_image_size(text) == expected  # what the manifest records reads back


@pytest.mark.parametrize("value", ["huge", "8", "224x8", "224x", "x224", "-5"])
def test_parse_image_size_refuses(value):
    with pytest.raises(MaskdistError, match="--image-size"):
        shards_api.parse_image_size(value)


def test_build_at_short_side_and_exact_size(odd_data, tmp_path):
    short, exact = tmp_path / "short", tmp_path / "exact"
    _build(odd_data, short, image_size=48)
    _build(odd_data, exact, image_size="40x32")
    m_short = json.loads((short / "manifest.json").read_text())
    m_exact = json.loads((exact / "manifest.json").read_text())
    n = m_exact["totals"]["eval"] + sum(map(sum, m_exact["totals"]["train"].values()))
    assert (m_short["image"]["short_side"], m_short["image"]["size"], m_short["build"]["image_size"]) == (48, None, 48)
    assert all(min(int(v) for v in k.split("x")) == 48 for k in m_short["image"]["shapes"])
    assert (m_exact["image"]["short_side"], m_exact["image"]["size"], m_exact["build"]["image_size"]) == (None, [40, 32], "40x32")
    assert m_exact["image"]["shapes"] == {"40x32": n}
    text = CliRunner().invoke(main, ["shards", "inspect", str(exact)]).output
    assert "exactly 40x32" in text
    assert CliRunner().invoke(main, ["shards", "verify", str(exact), "--quiet"]).exit_code == 0


# --- the tar reader the stream and verify share ------------------------------------------------


def _tar_bytes(members, fmt=tarfile.PAX_FORMAT) -> bytes:
    """members: (name, data) for files, (name, None, type) for other member types."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for member in members:
            info = tarfile.TarInfo(member[0])
            if member[1] is None:
                info.type = member[2]
                if info.type == tarfile.SYMTYPE:
                    info.linkname = "elsewhere"
                tar.addfile(info)
            else:
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return buf.getvalue()


def _read_members(data: bytes, seekable: bool = True) -> list[tuple[str, bytes, bytes | None]]:
    stream = io.BytesIO(data) if seekable else io.BufferedReader(_Unseekable(data))
    tar = tario.TarReader(stream, "s.tar")
    return [(name, typeflag, tar.read() if typeflag in tario.REGULAR_TYPES and not name.endswith(".skip") else None)
            for name, typeflag, _ in tar]


class _Unseekable(io.RawIOBase):
    """A pipe-like stream that returns at most 700 bytes per read."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), 700, len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


@pytest.mark.parametrize("seekable", [True, False])
def test_tar_reader_matches_tarfile(seekable):
    long_name = "p" * 120 + "_Ünïcode/mask1"  # a pax header carries the path
    members = [("a/k1.jpg", b"\xff\xd8" + bytes(range(256)) * 3), ("a/k1.json", b'{"label": 3}'),
               ("a/k1.skip", b"x" * 5000), (f"{long_name}.jpg", b""), (f"{long_name}.json", b"{}"),
               ("dir", None, tarfile.DIRTYPE), ("b/k2.jpg", b"y" * 512)]
    data = _tar_bytes(members)
    got = [(name.rstrip("/"), typeflag, content) for name, typeflag, content in _read_members(data, seekable)]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        want = [(m.name, m.type, tar.extractfile(m).read() if m.isreg() and not m.name.endswith(".skip") else None)
                for m in tar]
    assert got == want
    assert [g[0] for g in got] == [m[0] for m in members]
    assert shards_api.split_key(f"{long_name}.jpg") == (long_name, "jpg")
    assert shards_api.split_key("a/b.c/key.tar.gz") == ("a/b.c/key", "tar.gz")
    assert shards_api.split_key("a/.hidden") is None and shards_api.split_key("noext") is None


@pytest.mark.parametrize("seekable", [True, False])
def test_tar_reader_refuses_odd_tars(seekable):
    good = _tar_bytes([("k.jpg", b"z" * 1000), ("k.json", b"{}")])

    def refused(data: bytes, match: str) -> None:
        with pytest.raises(shards_api.ShardFormatError, match=match):
            _read_members(data, seekable)

    refused(good[:512 + 1024 + 512], "truncated|end-of-archive")  # cut after the first member
    refused(good[:700], "truncated")  # cut inside the first member's data
    refused(good[:512 + 1024], "end-of-archive")  # cut at a member boundary
    damaged = bytearray(good)
    damaged[10] ^= 0xFF  # inside the first name: the checksum no longer matches
    refused(bytes(damaged), "checksum")
    refused(b"GIF89a" + bytes(2000), "ustar")
    refused(_tar_bytes([("x" * 150 + ".jpg", b"1")], fmt=tarfile.GNU_FORMAT), "GNU long name")
    assert shards_api.ShardFormatError.__mro__[1] is MaskdistError


def test_verify_flags_what_the_stream_cannot_read(built, tmp_path):
    root = _copy_set(built, tmp_path)
    shard = json.loads((root / "manifest.json").read_text())["shards"][0]["path"]
    with tarfile.open(root / shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    # GNU format with a long name: tarfile reads it, the shard reader (and so the stream) does not
    renamed = [(f"{'q' * 110}{i}/{n.split('/', 1)[1]}", d) for i, (n, d) in enumerate(members)]
    (root / shard).write_bytes(_tar_bytes(renamed, fmt=tarfile.GNU_FORMAT))
    result = CliRunner().invoke(main, ["shards", "verify", str(root), "--quiet"])
    assert result.exit_code == 1
    assert any(line.startswith(f"{shard}: not a readable shard") and "GNU long name" in line
               for line in result.output.splitlines()), result.output


def _pre_webdataset_tar(path: Path, samples: list[tuple[str, bytes, dict]]) -> None:
    """A shard as maskdist wrote them before it wrote with webdataset's TarWriter."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, jpeg, meta in samples:
            for name, data in ((f"{key}.jpg", jpeg), (f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))


def test_sets_built_before_the_webdataset_writer_read_and_match_it_byte_for_byte(built, tmp_path):
    """The writer moved to webdataset's TarWriter without a new format version: every shard of a
    set, rewritten the old way from its own samples, has the same bytes; and a set written the old
    way (with an older manifest's image entry) reads, streams and verifies."""
    old = _copy_set(built, tmp_path)
    manifest = json.loads((old / "manifest.json").read_text())
    for shard in manifest["shards"]:
        samples = [(s["key"], s["jpg"], s["json"]) for s in _read_set(built)[shard["path"]]]
        _pre_webdataset_tar(old / shard["path"], samples)
        assert (old / shard["path"]).read_bytes() == (built / shard["path"]).read_bytes(), shard["path"]
    manifest["image"].pop("size")  # sets from before exact sizes had no "size" entry
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert shards_api.verify_shards(old).ok
    from maskdist import streams

    loader = streams.eval_loader(open_shard_set(old), 0, batch_size=4, workers=0, transform=None)
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == sorted(s["key"] for p in manifest["shards"] if p["split"] == "train" and p["fold"] == 0
                                  for s in _read_set(old)[p["path"]])


def test_a_manifest_path_that_is_not_a_shard_path_is_refused(built, tmp_path):
    """Paths go into pipe: commands: anything but the builder's own path grammar is refused."""
    bad = _copy_set(built, tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["shards"][0]["path"] = f"train/fold0/x.tar; touch {tmp_path}/PWNED"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MaskdistError, match="is not a shard path of this format"):
        open_shard_set(f"pipe:cat {bad}/{{}}")
    assert not (tmp_path / "PWNED").exists()
