"""A synthetic stand-in for the competition data, in exactly its layout (see DATA.md).

``write_dataset(out, ...)`` writes::

    OUT/train/train.csv              id,gender,race,age,path
    OUT/train/images/<path>/         mask1..mask5, incorrect_mask, normal (.jpg, a few .png/.jpeg)
    OUT/eval/info.csv                ImageID,ans (ans = 0)
    OUT/eval/images/<40-hex>.jpg
    OUT/eval_answers.csv             ImageID,ans with the true labels (never inside eval/)
    OUT/external/<nnnnnn>_<age>.jpg  only with external=N (no labels inside external/)
    OUT/external_answers.csv         file,ans,mask,gender,age (mask and gender as codes)
    OUT/synth.json                   parameters, person and per-class counts, planted quirks
    OUT/label_noise.csv              only with label_noise > 0: the planted label errors (a fix file)

The images are drawn faces: a mask cue (worn / pulled below the nose or onto the chin /
not worn), a noisy, overlapping gender cue (hair length, face width, brows, lips) and a
continuous age cue (grey hair, wrinkles, skin tone) driven by an *apparent* age that carries
per-person noise, so ages near 30 and 60 are genuinely hard. Each person has one consistent
appearance across their seven images. Everything is deterministic from ``seed``: person
traits come from ``default_rng([seed, kind, person])`` and each image from
``default_rng([seed, kind, person, image + 1])``, so the bytes do not depend on ``workers``.

The quirks of DATA.md are planted: mixed extensions, macOS ``._`` junk files, hidden
``.ipynb_checkpoints`` folders, a duplicated id and suffixed ids (from 20 people up).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from maskdist.data import labels as L
from maskdist.data import noise
from maskdist.data.faces import HEIGHT, WIDTH, draw_face, make_traits
from maskdist.data.people import (  # noqa: F401 (the public names stay here too)
    EVAL_FRACTION,
    TRAIN_COUNTS,
    ages,
    default_person_counts,
    expected_class_counts,
    people_of,
    resolve_counts,
    scaled_person_counts,
)
from maskdist.errors import MaskdistError
from maskdist.system import parallel

IMAGES_PER_PERSON = len(L.STEMS)
EXTERNAL_SIZE = 256  # external images are square crops, as scraped photos would be

# Kinds of people; part of every RNG key so train, eval and external never share faces.
TRAIN, EVAL, EXTERNAL = 0, 1, 2

# Extension modes per person: all .jpg, all .png, all .jpeg, mixed.
_EXT_MODES = ("jpg", "png", "jpeg", "mixed")
_EXT_MODE_P = (0.95, 0.025, 0.015, 0.01)

_JUNK_HEAD = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "



def _encode(img: np.ndarray, ext: str, quality: int) -> bytes:
    if ext == "png":
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise MaskdistError(f"could not encode a synthetic .{ext} image")
    return buf.tobytes()


# --- jobs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PersonJob:
    """What one worker call draws: one person's images (files relative to the temp root)."""

    kind: int
    index: int
    gender: int
    age: int  # true age in years
    files: tuple[tuple[str, int, int], ...]  # (relative path, mask, mask_index)


def _write_person(job: PersonJob, seed: int, root: str) -> int:
    """Draw and write one person's images; returns how many were written."""
    traits = make_traits(np.random.default_rng([seed, job.kind, job.index]), job.gender, job.age)
    for i, (rel, mask, mask_index) in enumerate(job.files):
        rng = np.random.default_rng([seed, job.kind, job.index, i + 1])
        img = draw_face(rng, traits, mask, mask_index=mask_index)
        if job.kind == EXTERNAL:  # outside-style: tighter square crop, own size
            side = int(rng.integers(300, 384))
            y0 = int(rng.integers(40, HEIGHT - side - 20))
            x0 = (WIDTH - side) // 2
            img = cv2.resize(img[y0:y0 + side, x0:x0 + side], (EXTERNAL_SIZE, EXTERNAL_SIZE), interpolation=cv2.INTER_AREA)
        ext = rel.rsplit(".", 1)[-1]
        data = _encode(img, ext, int(rng.integers(82, 96)))
        with open(os.path.join(root, rel), "wb") as fh:
            fh.write(data)
    return len(job.files)


def _run_chunk(args: tuple[list[PersonJob], int, str]) -> int:
    jobs, seed, root = args
    return sum(_write_person(job, seed, root) for job in jobs)


# --- planning -----------------------------------------------------------------------------



def _mask_files(prefix: str, exts: list[str]) -> tuple[tuple[str, int, int], ...]:
    files = []
    for i, (stem, mask) in enumerate(L.STEM_TO_MASK.items()):
        mask_index = i if mask == 0 else 0
        files.append((f"{prefix}{stem}.{exts[i]}", mask, mask_index))
    return tuple(files)


@dataclass
class _Plan:
    train_rows: list[dict]
    train_jobs: list[PersonJob]
    eval_jobs: list[PersonJob]
    eval_rows: list[tuple[str, int]]  # (ImageID, true label), info.csv order
    external_jobs: list[PersonJob]
    external_rows: list[tuple[str, int, int, int, int]]
    quirks: dict
    noise_rows: list[tuple] = field(default_factory=list)  # label_noise.csv (see maskdist.data.noise)
    noise: dict = field(default_factory=dict)  # person index -> PlantedError


def _swap_incorrect_normal(files: tuple[tuple[str, int, int], ...]) -> tuple[tuple[str, int, int], ...]:
    """The same drawings with the incorrect_mask and normal file names exchanged."""
    names = [rel for rel, _, _ in files]
    i, j = (k for k, stem in enumerate(L.STEMS) if stem in ("incorrect_mask", "normal"))
    names[i], names[j] = names[j], names[i]
    return tuple((name, mask, index) for name, (_, mask, index) in zip(names, files))


def _plan(seed: int, train_counts, eval_counts, external: int, label_noise: float = 0.0) -> _Plan:
    rng = np.random.default_rng([seed, 9, 0])
    people = people_of(rng, train_counts)
    n = len(people)
    numbers = np.sort(rng.choice(np.arange(1, int(n * 2.6) + 10), size=n, replace=False))
    ids = [f"{k:06d}" for k in numbers]
    quirks: dict = {"duplicate_id": None, "suffixed_ids": [], "ext_people": {}, "junk": []}
    if n >= 20:
        # one id shared by two different people (different folders)
        a = int(rng.integers(n))
        others = [j for j in range(n) if j != a and people[j][0] == people[a][0] and min(people[j][1], 60) != min(people[a][1], 60)]
        others = others or [j for j in range(n) if j != a and people[j] != people[a]]
        b = others[int(rng.integers(len(others)))]
        ids[b] = ids[a]
        quirks["duplicate_id"] = ids[a]
        # suffixed ids "001498-1": the id of another person plus a suffix
        n_suffix = max(2, round(41 / 2700 * n))
        free = [j for j in range(n) if j not in (a, b)]
        picks = rng.choice(free, size=2 * n_suffix, replace=False)
        for p, q in zip(picks[:n_suffix], picks[n_suffix:]):
            ids[int(p)] = f"{numbers[int(q)]:06d}-1"
            quirks["suffixed_ids"].append(ids[int(p)])
    # extensions per person; from 20 people one of each odd mode is planted
    modes = list(rng.choice(len(_EXT_MODES), size=n, p=_EXT_MODE_P))
    if n >= 20:
        for mode, p in zip((1, 2, 3), rng.choice(n, size=3, replace=False)):
            modes[int(p)] = mode
    planted = noise.plant(seed, people, ids, label_noise) if label_noise else {}
    train_rows, train_jobs, noise_rows = [], [], []
    for i, ((gender, age), pid) in enumerate(zip(people, ids)):
        recorded, recorded_gender = min(age, L.METRIC_AGE_CUT), gender
        if i in planted:
            recorded, recorded_gender = planted[i].age, planted[i].gender
        path = f"{pid}_{L.GENDER_NAMES[recorded_gender]}_Asian_{recorded}"
        mode = _EXT_MODES[modes[i]]
        if mode == "mixed":
            exts = list(rng.choice(["jpg", "png", "jpeg"], size=IMAGES_PER_PERSON, p=(0.5, 0.3, 0.2)))
            exts[0], exts[-1] = "jpg", "png"
        else:
            exts = [mode] * IMAGES_PER_PERSON
        if mode != "jpg":
            quirks["ext_people"][path] = mode
        train_rows.append({"id": pid, "gender": L.GENDER_NAMES[recorded_gender], "race": "Asian", "age": recorded, "path": path})
        files = _mask_files(f"train/images/{path}/", exts)
        if i in planted:
            files = _swap_incorrect_normal(files) if planted[i].swapped else files
            noise_rows.append(noise.truth_row(path, planted[i], gender, age))
        train_jobs.append(PersonJob(TRAIN, i, gender, age, files))
    paths = [r["path"] for r in train_rows]
    if len(set(paths)) != len(paths):  # cannot happen by construction; guard the invariant
        raise RuntimeError("synthetic plan produced duplicate folder names")
    # eval: hashed names, rows shuffled
    eval_people = people_of(np.random.default_rng([seed, 9, 1]), eval_counts)
    eval_jobs, eval_rows = [], []
    for i, (gender, age) in enumerate(eval_people):
        files = []
        for k, (_stem, mask) in enumerate(L.STEM_TO_MASK.items()):
            name = hashlib.sha1(f"maskdist-synth:{seed}:{i}:{k}".encode()).hexdigest() + ".jpg"
            files.append((f"eval/images/{name}", mask, k if mask == 0 else 0))
            eval_rows.append((name, L.label_of(mask, gender, min(age, 60))))
        eval_jobs.append(PersonJob(EVAL, i, gender, age, tuple(files)))
    order = np.random.default_rng([seed, 9, 2]).permutation(len(eval_rows))
    eval_rows = [eval_rows[i] for i in order]
    # external: outside-style, mostly unmasked and older
    ext_rng = np.random.default_rng([seed, 9, 3])
    external_jobs, external_rows = [], []
    for i in range(external):
        gender = int(ext_rng.integers(2))
        group = int(ext_rng.choice(3, p=(0.15, 0.2, 0.65)))
        age = int(ages(ext_rng, group, 1)[0])
        mask = int(ext_rng.choice(3, p=(0.15, 0.1, 0.75)))
        name = f"{i + 1:06d}_{age}.jpg"
        external_jobs.append(PersonJob(EXTERNAL, i, gender, age, ((f"external/{name}", mask, int(ext_rng.integers(5))),)))
        external_rows.append((name, L.label_of(mask, gender, age), mask, gender, age))
    return _Plan(train_rows, train_jobs, eval_jobs, eval_rows, external_jobs, external_rows, quirks, noise_rows, planted)


# --- writing ------------------------------------------------------------------------------


@dataclass
class SynthSummary:
    """What ``write_dataset`` wrote."""

    out: Path
    train_people: int
    train_images: int
    eval_people: int
    eval_images: int
    external_images: int
    class_counts: list[int]  # training images per class, true labels with the cut at 60
    seconds: float
    images_per_second: float
    workers: int = 1
    eval_class_counts: list[int] = field(default_factory=list)
    label_noise: dict = field(default_factory=dict)  # synth.json's "label_noise", when planted

    def describe(self) -> str:
        lines = [
            f"synthetic dataset written to {self.out}",
            f"  train: {self.train_people} people, {self.train_images} images; "
            f"eval: {self.eval_people} people, {self.eval_images} images; external: {self.external_images} images",
            f"  {self.train_images + self.eval_images + self.external_images} images in {self.seconds:.1f} s "
            f"({self.images_per_second:.0f} images/s, {self.workers} worker{'s' if self.workers != 1 else ''})",
        ]
        if self.label_noise:
            n = self.label_noise
            lines.append(f"  planted label errors: {n['people']} people ({', '.join(f'{k} {v}' for k, v in n['kinds'].items())}),"
                         f" {n['images']} images ({100 * n['image_share']:.2f}%); truth in {self.out / n['truth']}")
        lines.append("  training images per class (age cut 60, true labels):" if self.label_noise
                     else "  training images per class (age cut 60):")
        for c, n in enumerate(self.class_counts):
            lines.append(f"    {c:2d} {L.class_name(c):<22} {n:6d}")
        return "\n".join(lines)


def _junk(rng: np.random.Generator) -> bytes:
    return _JUNK_HEAD + rng.integers(0, 256, 4070, dtype=np.uint8).tobytes()


def _write_csv(path: Path, header: str, rows) -> None:
    with open(path, "w", newline="") as fh:
        fh.write(header + "\n")
        for row in rows:
            fh.write(",".join(str(v) for v in row) + "\n")



def write_dataset(out, *, people=None, scale=None, eval_people=None, seed=0, workers=1, external=0,
                  overwrite=False, progress=False, label_noise=0.0) -> SynthSummary:
    """Write a synthetic dataset in the competition layout to ``out`` (see the module docstring).

    ``people`` scales the competition's person counts to that many training people, or
    ``scale`` multiplies them; ``eval_people`` defaults to 2/3 of the training people.
    ``label_noise`` plants label errors in that share of training people, with the truth in
    ``OUT/label_noise.csv`` (:mod:`maskdist.data.noise`).
    The folder appears only when complete: it is written to ``OUT.partial-<pid>`` and renamed.
    """
    out = Path(out)
    train_counts = resolve_counts(people, scale)
    n_train = sum(train_counts.values())
    if eval_people is None:
        eval_people = round(n_train * EVAL_FRACTION)
    if int(eval_people) < 0:
        raise MaskdistError(f"invalid eval_people {eval_people}: expected 0 or more")
    if int(workers) < 1:
        raise MaskdistError(f"invalid workers {workers}: expected 1 or more")
    if int(external) < 0:
        raise MaskdistError(f"invalid external {external}: expected 0 or more")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MaskdistError(f"{out} exists; pass --overwrite to replace it, or choose another folder")
    eval_counts = scaled_person_counts(int(eval_people))
    label_noise = noise.check_rate(label_noise)
    seed, workers, external = int(seed), int(workers), int(external)

    start = time.perf_counter()
    plan = _plan(seed, train_counts, eval_counts, external, label_noise)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for sub in ("train/images", "eval/images"):
            (tmp / sub).mkdir(parents=True)
        for row in plan.train_rows:
            (tmp / "train/images" / row["path"]).mkdir()
        if external:
            (tmp / "external").mkdir()
        jobs = plan.train_jobs + plan.eval_jobs + plan.external_jobs
        total_images = sum(len(j.files) for j in jobs)
        chunk = 8
        tasks = [(jobs[i:i + chunk], seed, str(tmp)) for i in range(0, len(jobs), chunk)]
        bar = None
        if progress:
            from tqdm import tqdm

            # disable=None: a bar only on a terminal, not in a log file
            bar = tqdm(total=total_images, unit="img", desc="synth", file=sys.stderr, dynamic_ncols=True, disable=None)
        written = 0
        if workers == 1:
            previous = cv2.getNumThreads()
            cv2.setNumThreads(1)
            try:
                for task in tasks:
                    n = _run_chunk(task)
                    written += n
                    if bar is not None:
                        bar.update(n)
            finally:
                cv2.setNumThreads(previous)
        else:
            with parallel.pool(workers) as pool:
                for n in pool.imap_unordered(_run_chunk, tasks):
                    written += n
                    if bar is not None:
                        bar.update(n)
        if bar is not None:
            bar.close()
        if written != total_images:
            raise RuntimeError(f"wrote {written} of {total_images} synthetic images")
        # CSVs (eval answers and external labels stay outside the folders a model reads)
        _write_csv(tmp / "train/train.csv", "id,gender,race,age,path",
                   ([r["id"], r["gender"], r["race"], r["age"], r["path"]] for r in plan.train_rows))
        _write_csv(tmp / "eval/info.csv", "ImageID,ans", ((name, 0) for name, _ in plan.eval_rows))
        _write_csv(tmp / "eval_answers.csv", "ImageID,ans", plan.eval_rows)
        if external:
            _write_csv(tmp / "external_answers.csv", "file,ans,mask,gender,age", plan.external_rows)
        if label_noise:
            _write_csv(tmp / noise.NOISE_FILE, ",".join(noise.NOISE_COLUMNS), plan.noise_rows)
        # junk: macOS ._ files next to real images, hidden checkpoint folders
        junk_rng = np.random.default_rng([seed, 9, 4])
        junk = []
        n_train_junk = min(len(plan.train_rows), max(2, round(len(plan.train_rows) / 500)))
        for p in junk_rng.choice(len(plan.train_rows), size=n_train_junk, replace=False):
            rel, _, _ = plan.train_jobs[int(p)].files[int(junk_rng.integers(IMAGES_PER_PERSON))]
            folder, name = rel.rsplit("/", 1)
            junk.append(f"{folder}/._{name.rsplit('.', 1)[0]}.jpg")
        if plan.eval_rows:
            n_eval_junk = min(len(plan.eval_rows), max(2, round(len(plan.eval_rows) / 3000)))
            for p in junk_rng.choice(len(plan.eval_rows), size=n_eval_junk, replace=False):
                junk.append(f"eval/images/._{plan.eval_rows[int(p)][0]}")
        for folder in ("train/images/.ipynb_checkpoints", "eval/images/.ipynb_checkpoints"):
            (tmp / folder).mkdir()
            junk.append(f"{folder}/mask1-checkpoint.jpg")
        for rel in junk:
            (tmp / rel).write_bytes(_junk(junk_rng))
        plan.quirks["junk"] = junk

        class_counts = [0] * L.NUM_CLASSES
        for job in plan.train_jobs:
            for _, mask, _ in job.files:
                class_counts[L.label_of(mask, job.gender, min(job.age, 60))] += 1
        eval_class_counts = [0] * L.NUM_CLASSES
        for _, label in plan.eval_rows:
            eval_class_counts[label] += 1
        ages = {}
        for r in plan.train_rows:
            ages[r["age"]] = ages.get(r["age"], 0) + 1
        ext_counts: dict[str, int] = {}
        for job in plan.train_jobs:
            for rel, _, _ in job.files:
                e = rel.rsplit(".", 1)[-1]
                ext_counts[e] = ext_counts.get(e, 0) + 1
        meta = {
            "generator": "maskdist.synth",
            "parameters": {"people": people, "scale": scale, "eval_people": int(eval_people), "seed": seed,
                           "external": external},
            "image_size": {"height": HEIGHT, "width": WIDTH},
            "train_people": len(plan.train_rows),
            "train_images": sum(class_counts),
            "eval_people": len(plan.eval_jobs),
            "eval_images": len(plan.eval_rows),
            "external_images": external,
            "train_person_counts": {f"{L.GENDER_NAMES[g]}/{L.AGE_NAMES[a]}": n for (g, a), n in train_counts.items()},
            "eval_person_counts": {f"{L.GENDER_NAMES[g]}/{L.AGE_NAMES[a]}": n for (g, a), n in eval_counts.items()},
            "train_class_counts": class_counts,
            "eval_class_counts": eval_class_counts,
            "external_class_counts": [sum(1 for r in plan.external_rows if r[1] == c) for c in range(L.NUM_CLASSES)],
            "train_ages": {str(k): ages[k] for k in sorted(ages)},
            "train_extensions": dict(sorted(ext_counts.items())),
            "quirks": plan.quirks,
        }
        if label_noise:  # only then: a dataset without noise keeps its bytes
            meta["parameters"]["label_noise"] = label_noise
            meta["label_noise"] = noise.summary(plan.noise, len(plan.train_rows), label_noise)
        (tmp / "synth.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists() or out.is_symlink():  # overwrite: swap in, then remove the old one
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    n_images = sum(class_counts) + len(plan.eval_rows) + external
    return SynthSummary(
        out=out, train_people=len(plan.train_rows), train_images=sum(class_counts), eval_people=len(plan.eval_jobs),
        eval_images=len(plan.eval_rows), external_images=external, class_counts=class_counts, seconds=seconds,
        images_per_second=n_images / seconds if seconds > 0 else float("inf"), workers=workers,
        eval_class_counts=eval_class_counts, label_noise=meta.get("label_noise", {}),
    )
