"""Did a change help? The paired comparison of experiments trained on the same shard set.

Every experiment holds one out-of-fold prediction per training image, so two experiments are
compared on the very same images. The uncertainty comes from a bootstrap **over people**: a
resample draws people with replacement and keeps all of their images (the photos of one
person are correlated, so resampling images would overstate certainty), and the same resample
scores every experiment, so the difference is paired.

The bootstrap is vectorised: each person's counts (true positives, predicted and true
samples per class, and per part) are summed once, and every resample's counts are one matrix
product of the resample's person multiplicities with them. 2,000 resamples of 18,900 rows
take well under a second.

Verdict: "better" when the 95% interval of the difference lies above 0, "worse" below it,
else "no detectable difference". Experiments whose plans (``experiment.yaml``) and training
labels agree in everything but the seed are seed replicates: the spread of their macro F1 is
the seed noise, and a difference no larger than it is never called better (nor worse).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from maskdist.data import labels, layout
from maskdist.errors import MaskdistError

CONFIDENCE = 0.95
BETTER, WORSE, SAME = "better", "worse", "no detectable difference"
# (name, divisor, modulo, classes) of each part of the 18-class label, as metrics.score has them
PARTS = (("mask", 6, 3, 3), ("gender", 3, 2, 2), ("age", 1, 3, 3))
SUBMISSION = "submission.csv"  # where kfold writes an experiment's submission


# --- the vectorised bootstrap ---------------------------------------------------------------

def _one_hot(values: np.ndarray, classes: int) -> np.ndarray:
    out = np.zeros((len(values), classes), dtype=np.float64)
    out[np.arange(len(values)), values] = 1.0
    return out


def _columns(y: np.ndarray) -> np.ndarray:
    """One-hot columns of 18-class labels: the 18 classes, then each part's classes."""
    return np.concatenate([_one_hot(y, labels.NUM_CLASSES)] + [_one_hot((y // d) % m, size) for _n, d, m, size in PARTS], axis=1)


def _row_counts(y_true: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the count columns (:func:`_columns`): the truth's (rows x C'), and per
    experiment its true positives and its predictions (rows x 2 x E x C')."""
    truth = _columns(y_true)
    predicted = np.stack([_columns(preds[:, e]) for e in range(preds.shape[1])], axis=1)
    return truth, np.stack([predicted * truth[:, None, :], predicted], axis=1)


def _f1(tp: np.ndarray, predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    denominator = predicted + truth
    return np.divide(2 * tp, denominator, out=np.zeros(np.broadcast_shapes(tp.shape, truth.shape)), where=denominator > 0)


def _figures(f1: np.ndarray) -> dict[str, np.ndarray]:
    """Macro F1, each part's F1 and the per-class F1 from the F1 of every count column
    (last axis: 18 classes, then each part's classes)."""
    out = {"macro_f1": f1[..., :labels.NUM_CLASSES].mean(axis=-1), "per_class_f1": f1[..., :labels.NUM_CLASSES]}
    start = labels.NUM_CLASSES
    for name, _d, _m, size in PARTS:
        out[name] = f1[..., start:start + size].mean(axis=-1)
        start += size
    return out


def bootstrap(y_true, preds, groups, resamples: int = 2000, seed: int = 0) -> tuple[dict, dict]:
    """The figures of each experiment (``preds``: rows x experiments) on all rows, and on
    ``resamples`` resamples of the groups (people): ``(observed, resampled)``, each a dict of
    macro_f1 / mask / gender / age (``[B,] E``) and per_class_f1 (``[B,] E x 18``)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64).reshape(len(y_true), -1)
    if len(y_true) == 0:
        raise MaskdistError("no rows to compare")
    _, group_index = np.unique(np.asarray(groups), return_inverse=True)
    people = int(group_index.max()) + 1
    truth, counts = _row_counts(y_true, preds)
    # per person: the sum of its rows (rows sorted by person, summed between person starts)
    order = np.argsort(group_index, kind="stable")
    starts = np.searchsorted(group_index[order], np.arange(people))
    person_truth = np.add.reduceat(truth[order], starts, axis=0)
    person_counts = np.add.reduceat(counts[order], starts, axis=0)
    observed = _figures(_f1(person_counts[:, 0].sum(0), person_counts[:, 1].sum(0), person_truth.sum(0)))
    # each resample: how often each person is drawn (people draws with replacement), B x P
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, people, size=(resamples, people)) + (np.arange(resamples) * people)[:, None]
    weights = np.bincount(draws.ravel(), minlength=resamples * people).reshape(resamples, people).astype(np.float64)
    flat = person_counts.reshape(people, -1)
    resampled_counts = (weights @ flat).reshape((resamples,) + counts.shape[1:])
    resampled_truth = (weights @ person_truth)[:, None, :]
    resampled = _figures(_f1(resampled_counts[:, 0], resampled_counts[:, 1], resampled_truth))
    return observed, resampled


def _interval(samples: np.ndarray) -> list[float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    return [float(v) for v in np.percentile(samples, [tail, 100 - tail], axis=0)]


def verdict(interval: Sequence[float]) -> str:
    """Better / worse when the whole interval lies on one side of 0."""
    low, high = interval
    return BETTER if low > 0 else WORSE if high < 0 else SAME


# --- experiments: seeds, sections --------------------------------------------------------------

def _plans(experiments: Sequence[Path]) -> list[dict | None]:
    from maskdist.train.folder import read_plan  # here: the module itself needs no training code

    return [read_plan(Path(e)) for e in experiments]


def seed_groups(experiments: Sequence[Path], train_labels: np.ndarray | None) -> list[list[int]]:
    """Groups (indices, two or more) of experiments whose plans agree in everything but the
    seed, with different seeds, trained on the same labels (``train_labels``: rows x E; the
    shard set's location is a run-only setting, so the labels tell an age cut or label fixes
    apart)."""
    plans = _plans(experiments)
    rest = [None if p is None else {k: v for k, v in p.items() if k != "seed"} for p in plans]
    groups: list[list[int]] = []
    for i, plan in enumerate(rest):
        if plan is None:
            continue
        for group in groups:
            j = group[0]
            same_labels = train_labels is None or np.array_equal(train_labels[:, i], train_labels[:, j])
            if rest[j] == plan and same_labels and plans[i]["seed"] not in [plans[k]["seed"] for k in group]:
                group.append(i)
                break
        else:
            groups.append([i])
    return [g for g in groups if len(g) > 1]


def _section(names: list[str], y_true, preds, groups, unit: str, resamples: int, seed: int,
             replicates: list[list[int]]) -> dict:
    """Each experiment's figures and the paired differences against the first, with their
    intervals and verdicts; the seed noise of the replicate groups on these rows."""
    observed, resampled = bootstrap(y_true, preds, groups, resamples, seed)
    experiments = []
    for e, name in enumerate(names):
        experiments.append({"experiment": name, "macro_f1": float(observed["macro_f1"][e]),
                            "interval": _interval(resampled["macro_f1"][:, e]),
                            "part_f1": {p: float(observed[p][e]) for p, *_ in PARTS},
                            "per_class_f1": [float(v) for v in observed["per_class_f1"][e]]})
    noise = []
    for group in replicates:
        values = [float(observed["macro_f1"][e]) for e in group]
        noise.append({"experiments": [names[e] for e in group], "macro_f1": values, "spread": max(values) - min(values)})
    spread = max((g["spread"] for g in noise), default=None)
    differences = []
    for e in range(1, len(names)):
        diff = {k: resampled[k][:, e] - resampled[k][:, 0] for k in resampled}
        point = {k: observed[k][e] - observed[k][0] for k in observed}
        interval = _interval(diff["macro_f1"])
        by_bootstrap = verdict(interval)
        inside_noise = spread is not None and abs(float(point["macro_f1"])) <= spread
        differences.append({
            "experiment": names[e], "against": names[0],
            "macro_f1": float(point["macro_f1"]), "interval": interval,
            "part_f1": {p: {"difference": float(point[p]), "interval": _interval(diff[p])} for p, *_ in PARTS},
            "per_class_f1": [{"difference": float(point["per_class_f1"][c]), "interval": _interval(diff["per_class_f1"][:, c])}
                             for c in range(labels.NUM_CLASSES)],
            "bootstrap_verdict": by_bootstrap,
            "within_seed_noise": bool(inside_noise),
            "verdict": SAME if inside_noise else by_bootstrap,
        })
    return {"unit": unit, "groups": int(len(np.unique(np.asarray(groups)))), "images": int(len(y_true)),
            "experiments": experiments, "differences": differences,
            "seed_noise": {"groups": noise, "spread": spread}}


def _people(keys: np.ndarray) -> np.ndarray:
    """The person of each sample key ``<person>/<stem>``."""
    return np.array([str(k).split("/", 1)[0] for k in keys])


# --- the eval set ---------------------------------------------------------------------------------

def _eval_labels(path: Path, image_ids: np.ndarray) -> np.ndarray:
    """A submission's (ImageID, ans) or predict's ``.probs.npz`` decisions for ``image_ids``."""
    if path.suffix == ".npz":
        from maskdist.infer.scoring import decided_labels

        with np.load(path) as saved:
            by_id = dict(zip(saved["image_id"].tolist(), decided_labels(saved).tolist()))
    else:
        frame = layout.read_csv(path, ("ImageID", "ans"), "a submission")
        by_id = dict(zip(frame["ImageID"], frame["ans"]))
    missing = [i for i in image_ids if i not in by_id]
    if missing:
        raise MaskdistError(f"{path} lacks {len(missing)} of the answers' images (e.g. {missing[0]}): pass the"
                            " submission of this eval set")
    try:
        values = np.array([int(by_id[i]) for i in image_ids], dtype=np.int64)
    except ValueError:
        raise MaskdistError(f"{path}: column ans must hold class numbers 0..17") from None
    if ((values < 0) | (values >= labels.NUM_CLASSES)).any():
        raise MaskdistError(f"{path}: column ans must hold class numbers 0..17")
    return values


def _eval_section(names, answers: Path, submissions: Sequence[Path], resamples, seed, replicates) -> dict:
    truth = layout.read_csv(answers, ("ImageID", "ans"), "an answers file")
    image_ids = truth["ImageID"].to_numpy()
    try:
        y_true = truth["ans"].astype(int).to_numpy()
    except ValueError:
        raise MaskdistError(f"{answers}: column ans must hold class numbers 0..17") from None
    preds = np.stack([_eval_labels(Path(s), image_ids) for s in submissions], axis=1)
    # the eval answers name no person unless they carry a person column (synth's do not): then
    # each image is its own unit, and the interval is narrower than a per-person one would be
    person_column = next((c for c in ("person", "id") if c in truth.columns), None)
    groups = truth[person_column].to_numpy() if person_column else image_ids
    section = _section(names, y_true, preds, groups, "person" if person_column else "image", resamples, seed, replicates)
    return section | {"answers": str(answers), "submissions": [str(s) for s in submissions]}


def default_submissions(experiments: Sequence[Path]) -> list[Path]:
    """Each experiment's ``submission.csv`` (where kfold writes it), or a one-line error."""
    paths = [Path(e) / SUBMISSION for e in experiments]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MaskdistError(f"{', '.join(missing)} not found: --answers needs a submission of each experiment; predict"
                            " into EXPERIMENT/submission.csv or pass --submission FILE once per experiment, in order")
    return paths


# --- the API ------------------------------------------------------------------------------------

def compare_experiments(run_dirs: Sequence[str | os.PathLike], *, resamples: int = 2000, seed: int = 0,
                        answers: str | os.PathLike | None = None,
                        submissions: Sequence[str | os.PathLike] | None = None,
                        allow_unfinished: bool = False) -> dict:
    """What ``maskdist compare --json`` prints: for the OOF rows (and, with ``answers``, the
    eval set) each experiment's macro, part and per-class F1 with a 95% person-bootstrap
    interval, and the paired differences against the first experiment with verdicts."""
    from maskdist.infer.oof import load_oof

    sources = [Path(r) for r in run_dirs]
    if len(sources) < 2:
        raise MaskdistError("compare needs two or more experiments: maskdist compare A B [C ...]")
    if resamples < 100:
        raise MaskdistError(f"--resamples {resamples} is too few for a 95% interval: use 1000 or more")
    oof = load_oof(sources, allow_unfinished)
    if len(oof.experiments) != len(sources):
        raise MaskdistError("compare takes experiment folders (each with its fold<K> runs), one per experiment:"
                            f" {len(sources)} given, {len(oof.experiments)} experiments found")
    different = [str(e) for i, e in enumerate(oof.experiments) if not np.array_equal(oof.fold_sets[:, i], oof.folds)]
    if different:
        raise MaskdistError(f"{', '.join(different)} split the people into other folds than {oof.experiments[0]}: compare"
                            " experiments trained on the same shard set (same folds, same people)")
    names = [str(e) for e in oof.experiments]
    replicates = seed_groups(oof.experiments, oof.train_labels)
    result = {"resamples": int(resamples), "seed": int(seed), "confidence": CONFIDENCE, "reference": names[0],
              "experiments": names, "seeds": [None if p is None else p.get("seed") for p in _plans(oof.experiments)],
              "seed_replicates": [[names[e] for e in g] for g in replicates],
              "unfinished": oof.unfinished,
              "oof": _section(names, oof.label_true, oof.preds, _people(oof.keys), "person", resamples, seed, replicates),
              "eval": None}
    if answers is not None:
        subs = [Path(s) for s in submissions] if submissions else default_submissions(oof.experiments)
        if len(subs) != len(names):
            raise MaskdistError(f"{len(subs)} --submission given for {len(names)} experiments: pass one per experiment, in order")
        result["eval"] = _eval_section(names, Path(answers), subs, resamples, seed, replicates)
    return result


# --- words --------------------------------------------------------------------------------------

def describe(result: dict) -> str:
    """The comparison as a person reads it: a table per row set, then one verdict line each."""
    lines = []
    for title, section in (("out-of-fold", result["oof"]), ("eval", result["eval"])):
        if section is None:
            continue
        units = (f"{section['images']} images of {section['groups']} people, {result['resamples']} bootstrap resamples of people"
                 if section["unit"] == "person" else f"{section['images']} images without person ids, {result['resamples']}"
                 " bootstrap resamples of images (narrower intervals than per person)")
        lines.append(f"{title}: {units}, 95% intervals")
        lines.append(f"{'experiment':<40} {'macro F1':>8} {'95% interval':>17}   mask   gender age")
        for item in section["experiments"]:
            low, high = item["interval"]
            parts = item["part_f1"]
            lines.append(f"{item['experiment']:<40} {item['macro_f1']:>8.4f} [{low:.4f}, {high:.4f}]  {parts['mask']:.4f}"
                         f" {parts['gender']:.4f} {parts['age']:.4f}")
        for group in section["seed_noise"]["groups"]:
            lines.append(f"seed noise: {', '.join(group['experiments'])} differ only in the seed: macro F1 spread"
                         f" {group['spread']:.4f}")
        for diff in section["differences"]:
            low, high = diff["interval"]
            why = (f" (the bootstrap says {diff['bootstrap_verdict']}, but the difference is inside the seed noise)"
                   if diff["within_seed_noise"] and diff["bootstrap_verdict"] != SAME else "")
            lines.append(f"{diff['experiment']} vs {diff['against']}: {diff['macro_f1']:+.4f} [{low:+.4f}, {high:+.4f}]:"
                         f" {diff['verdict']}{why}")
    for note in result["unfinished"]:
        lines.append(f"note: unfinished fold read: {note}")
    return "\n".join(lines)
