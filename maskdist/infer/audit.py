"""A label audit from the out-of-fold predictions: suspects per image and per person, ranked
by evidence, and the fixes that accepting them means.

Every training image's OOF probability comes from the one fold model that never trained on
it, so a low probability for the given label is evidence against the label, not memory of it.
The method is maskdist's own (the ideas of confident learning, Northcutt et al. 2021; the
cleanlab library is AGPL-3.0 and is not used):

* **per image**: each class c gets the threshold ``t_c``, the mean probability of c over the
  images labelled c. An image labelled y is a suspect when ``p_y < t_y`` and another class j
  reaches its own threshold ``p_j >= t_j`` (the most probable such j is the proposal); ranked
  by ``p_j - p_y``.
* **per person** (the competition's errors are whole people), on the part probabilities of
  their seven photos (mask, gender and age group summed out of the 18 classes), averaged:
  - ``gender``: evidence is the other gender's mean probability;
  - ``age``: evidence is the expected distance in groups between the recorded group and the
    predicted one (a jump of two groups weighs twice); the proposal is the most probable
    other group;
  - ``swap``: the ``incorrect_mask`` photo looks unmasked and the ``normal`` one incorrect:
    ``P(swap) = a / (a + b)`` with ``a = P_inc(not worn) P_norm(incorrect)`` and
    ``b = P_inc(incorrect) P_norm(not worn)``.

  A person suspect is flagged (and goes into the fixes file) when its evidence reaches the
  kind's :data:`MIN_EVIDENCE`. The defaults ask for strong evidence, because a wrong fix
  costs as much as a missed one: they were chosen on one synthetic experiment and measured
  on another (docs/audit.md). Every candidate stays in the ranked CSV.

* **the floor**: evidence is only as good as the models. Each kind reads one part of the
  prediction (swap the mask, gender the gender, age the age group), and is judged only when
  the models' OOF F1 of that part (blended argmax against the training labels) reaches
  :data:`MIN_PART_F1`. Below it nothing of that kind is flagged or written to the fixes file,
  and the summary says which part was too weak and its F1.

Labels are the training labels (the shard set's age cut), the ones the models learnt. An age
fix writes a representative age of the proposed group (the photos show a group, not an age):
:data:`GROUP_AGE`, or the middle of 30 .. cut-1.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from maskdist import metrics
from maskdist.data import labels
from maskdist.errors import MaskdistError
from maskdist.infer.oof import OofSet

FIX_COLUMNS = ("person", "gender", "age", "swap_incorrect_normal")  # what --fixes reads
KINDS = ("gender", "age", "swap")
GROUP_AGE = {0: 24, 2: 60}  # the age written for a proposed young / old group
PEOPLE_COLUMNS = ("rank", "person", "kind", "given", "proposed", "evidence", "flagged", "fold", "images")
MIN_EVIDENCE = {"gender": 0.9, "age": 1.25, "swap": 0.9}
PART_OF = {"gender": "gender", "age": "age", "swap": "mask"}  # the part of the prediction each kind reads
# The floor of a part's OOF F1 under which its kind of suspicion is not judged, chosen by
# measurement on `synth --label-noise` experiments (docs/kfold.md, "When the models are too
# weak to judge"): each floor lies just above the highest F1 at which that kind's flags were
# measured to be mostly wrong, since a wrong fix costs as much as a missed one.
# mask: swaps were 0 of 12 right at mask F1 0.337; 4 of 4 at 0.607, 9 of 11 at 0.826, 26 of 27 at 0.99;
# age: 11 of 23 right at age F1 0.56 with 3% of people mislabelled (5 of 6 at 0.526 and 6 of 6
# at 0.569 with 10%: refused, conservatively, as precision falls with the share of errors);
# gender: 1 of 3 right at gender F1 0.79, 0 of 1 at 0.63 (two classes: chance alone gives ~0.5).
MIN_PART_F1 = {"mask": 0.5, "gender": 0.85, "age": 0.6}
IMAGE_COLUMNS = ("rank", "key", "person", "stem", "given", "proposed", "p_given", "p_proposed", "margin", "fold")


def age_of_group(group: int, age_cut: int) -> int:
    return GROUP_AGE.get(group, (labels.YOUNG_CUT + age_cut - 1) // 2)


@dataclass
class Audit:
    people: pd.DataFrame  # person suspects, ranked (flagged first, then by evidence)
    images: pd.DataFrame  # image suspects, ranked by margin
    age_cut: int
    rows: pd.DataFrame  # every OOF row: key, person, stem, fold, label, pred, probabilities
    part_f1: dict  # part -> the blended OOF F1 of that part, against the training labels

    @property
    def too_weak(self) -> dict:
        """kind -> (part, its OOF F1, the floor) for the kinds not judged: their part's F1 is under the floor."""
        return {kind: (part, self.part_f1[part], MIN_PART_F1[part]) for kind, part in PART_OF.items()
                if self.part_f1[part] < MIN_PART_F1[part]}

    @property
    def flagged(self) -> pd.DataFrame:
        return self.people[self.people["flagged"]]

    def fixes(self) -> pd.DataFrame:
        """The flagged suspects as a label-fix table (one row per person, ``--fixes`` format)."""
        rows = {}
        for _, s in self.flagged.iterrows():
            row = rows.setdefault(s["person"], dict.fromkeys(FIX_COLUMNS, "") | {"person": s["person"]})
            if s["kind"] == "gender":
                row["gender"] = s["proposed"]
            elif s["kind"] == "age":
                row["age"] = str(age_of_group(labels.AGE_NAMES.index(s["proposed"]), self.age_cut))
            else:
                row["swap_incorrect_normal"] = "1"
        return pd.DataFrame(list(rows.values()), columns=list(FIX_COLUMNS))


def _image_suspects(rows: pd.DataFrame, probs: np.ndarray, given: np.ndarray) -> pd.DataFrame:
    n = len(given)
    thresholds = np.array([probs[given == c, c].mean() if (given == c).any() else 1.0 for c in range(labels.NUM_CLASSES)])
    above = probs >= thresholds[None, :]
    above[np.arange(n), given] = False
    candidate = np.where(above, probs, -1.0).argmax(axis=1)
    p_given = probs[np.arange(n), given]
    p_other = probs[np.arange(n), candidate]
    suspect = above.any(axis=1) & (p_given < thresholds[given])
    out = pd.DataFrame({"key": rows["key"], "person": rows["person"], "stem": rows["stem"], "given": given,
                        "proposed": candidate, "p_given": p_given, "p_proposed": p_other, "margin": p_other - p_given,
                        "fold": rows["fold"]})[suspect]
    out = out.sort_values(["margin", "key"], ascending=[False, True]).reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out


def _person_suspects(rows: pd.DataFrame, probs: np.ndarray, given: np.ndarray, min_evidence: dict, judged: set) -> pd.DataFrame:
    cube = probs.reshape(-1, 3, 2, 3)
    parts = {"mask": cube.sum(axis=(2, 3)), "gender": cube.sum(axis=(1, 3)), "age": cube.sum(axis=(1, 2))}
    frame = rows[["person", "stem", "fold"]].assign(mask=given // 6, gender=(given // 3) % 2, group=given % 3)
    for name, values in parts.items():
        for v in range(values.shape[1]):
            frame[f"{name}{v}"] = values[:, v]
    people = frame.groupby("person", sort=True).agg(
        fold=("fold", "first"), images=("stem", "size"), gender=("gender", "first"), group=("group", "first"),
        **{f"gender{v}": (f"gender{v}", "mean") for v in range(2)}, **{f"age{v}": (f"age{v}", "mean") for v in range(3)})
    found = []
    index = people.index.to_numpy()
    mean_gender = people[["gender0", "gender1"]].to_numpy()
    g = people["gender"].to_numpy()
    for i in range(len(people)):
        found.append((index[i], "gender", labels.GENDER_NAMES[g[i]], labels.GENDER_NAMES[1 - g[i]], float(mean_gender[i, 1 - g[i]])))
    mean_age = people[["age0", "age1", "age2"]].to_numpy()
    a = people["group"].to_numpy()
    distance = (mean_age * np.abs(np.arange(3)[None, :] - a[:, None])).sum(axis=1)
    alternative = np.where(np.arange(3)[None, :] == a[:, None], -1.0, mean_age).argmax(axis=1)
    for i in range(len(people)):
        found.append((index[i], "age", labels.AGE_NAMES[a[i]], labels.AGE_NAMES[alternative[i]], float(distance[i])))
    mask = parts["mask"]
    incorrect = rows["stem"].to_numpy() == "incorrect_mask"
    normal = rows["stem"].to_numpy() == "normal"
    inc = pd.DataFrame(mask[incorrect], index=rows["person"].to_numpy()[incorrect])
    nor = pd.DataFrame(mask[normal], index=rows["person"].to_numpy()[normal])
    both = inc.index.intersection(nor.index)
    a_swap = inc.loc[both, 2].to_numpy() * nor.loc[both, 1].to_numpy()
    b_keep = inc.loc[both, 1].to_numpy() * nor.loc[both, 2].to_numpy()
    p_swap = a_swap / np.maximum(a_swap + b_keep, 1e-12)
    for person, p in zip(both, p_swap):
        found.append((person, "swap", "as named", "incorrect_mask<->normal", float(p)))
    out = pd.DataFrame(found, columns=["person", "kind", "given", "proposed", "evidence"])
    out["flagged"] = (out["evidence"] >= out["kind"].map(min_evidence)) & out["kind"].isin(judged)
    out = out.merge(people[["fold", "images"]], left_on="person", right_index=True)
    # the top of the ranking: every flagged suspect, strongest first; then the unflagged ones
    out = out.sort_values(["flagged", "evidence", "person", "kind"], ascending=[False, False, True, True]).reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out[list(PEOPLE_COLUMNS)]


def audit(oof: OofSet, age_cut: int | None = None, min_evidence: dict | None = None) -> Audit:
    """Suspects of ``oof`` (the experiments' equal-weight blend when there are several);
    ``min_evidence`` overrides :data:`MIN_EVIDENCE` per kind."""
    unknown = set(min_evidence or {}) - set(KINDS)
    if unknown:
        raise MaskdistError(f"--min-evidence: unknown kind(s) {', '.join(sorted(unknown))}: choose among {', '.join(KINDS)}")
    min_evidence = MIN_EVIDENCE | dict(min_evidence or {})
    if age_cut is None:
        age_cut = int(oof.runs[0].card.get("age_cut", labels.METRIC_AGE_CUT))
    probs = oof.probs.mean(axis=1)
    keys = pd.Series(oof.keys)
    split = keys.str.rsplit("/", n=1)
    if not split.map(len).eq(2).all():
        raise MaskdistError("the OOF keys are not <person>/<stem>: the audit reads a competition-layout shard set")
    rows = pd.DataFrame({"key": keys, "person": split.str[0], "stem": split.str[1], "fold": oof.folds, "label": oof.label})
    part_f1 = metrics.score(oof.label, probs.argmax(axis=1)).part_f1
    judged = {kind for kind, part in PART_OF.items() if part_f1[part] >= MIN_PART_F1[part]}
    people = _person_suspects(rows, probs, oof.label, min_evidence, judged)
    images = _image_suspects(rows, probs, oof.label)
    rows = rows.assign(pred=probs.argmax(axis=1), p_pred=probs.max(axis=1), p_label=probs[np.arange(len(probs)), oof.label])
    return Audit(people, images, age_cut, rows, part_f1)


def planted(truth_csv: Path) -> set[tuple[str, str]]:
    """``(person, kind)`` of a label-fix file (``synth --label-noise``'s truth, or any fixes file)."""
    from maskdist.data import layout

    table = layout.read_csv(Path(truth_csv), ("person",), "a label-fix file")
    found = set()
    for _, row in table.iterrows():
        for kind, column in (("gender", "gender"), ("age", "age"), ("swap", "swap_incorrect_normal")):
            if str(row.get(column, "")).strip():
                found.add((row["person"].strip(), kind))
    return found


def precision_recall(result: Audit, truth: set[tuple[str, str]]) -> dict:
    """The flagged suspects against the truth, overall and per kind; and at the top k = the
    number of planted errors (precision = recall there). Precision is None where nothing was flagged."""
    flagged = set(zip(result.flagged["person"], result.flagged["kind"]))
    hits = flagged & truth
    out = {"planted": len(truth), "flagged": len(flagged), "found": len(hits),
           "precision": len(hits) / len(flagged) if flagged else None, "recall": len(hits) / len(truth) if truth else 0.0}
    top = set(zip(result.people["person"].head(len(truth)), result.people["kind"].head(len(truth))))
    out["precision_at_planted"] = len(top & truth) / len(truth) if truth else 0.0
    out["kinds"] = {}
    for kind in KINDS:
        t = {x for x in truth if x[1] == kind}
        f = {x for x in flagged if x[1] == kind}
        out["kinds"][kind] = {"planted": len(t), "flagged": len(f), "found": len(t & f),
                              "precision": len(t & f) / len(f) if f else None, "recall": len(t & f) / len(t) if t else 0.0}
    return out


def shards_of(oof: OofSet) -> str:
    """The shard set the folds trained on (their ``config.yaml``)."""
    from maskdist import config as config_mod
    from maskdist.train.checkpoint import CONFIG

    try:
        return config_mod.load(oof.runs[0].run_dir / CONFIG).shards
    except MaskdistError:
        raise MaskdistError(f"{oof.runs[0].run_dir / CONFIG} cannot be read: pass --shards (the set the folds trained on)") from None


def run_audit(sources, out: str | Path | None = None, shards: str | None = None, people: int = 24,
              truth: str | Path | None = None, min_evidence: dict | None = None, allow_unfinished: bool = False) -> dict:
    """Audit the experiment(s) and write ``OUT`` (default ``<experiment>/audit``):
    ``suspects.csv`` (person suspects, ranked), ``image_suspects.csv``, ``fixes.csv`` (the
    flagged suspects, for ``--fixes``; not written, and an earlier one removed, when no kind
    is judged), ``contact_sheet.png`` and ``audit.json`` (the summary; with ``truth``, a
    label-fix file of known errors, precision and recall)."""
    from maskdist.infer.contact_sheet import contact_sheet
    from maskdist.infer.oof import load_oof
    from maskdist.shards.manifest import open_shard_set
    from maskdist.system.fileio import atomic_path, atomic_write_json

    oof = load_oof(sources, allow_unfinished)
    result = audit(oof, min_evidence=min_evidence)
    out = Path(out) if out is not None else oof.experiments[0] / "audit"
    out.mkdir(parents=True, exist_ok=True)
    judged_any = len(result.too_weak) < len(KINDS)
    tables = {"suspects.csv": result.people, "image_suspects.csv": result.images} | ({"fixes.csv": result.fixes()} if judged_any else {})
    for name, frame in tables.items():
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.4f")
    if not judged_any:
        (out / "fixes.csv").unlink(missing_ok=True)  # an earlier audit's fixes must not be taken for this one's
    shown = result.flagged if len(result.flagged) else result.people
    sheet, photos = contact_sheet(shown, result.rows, open_shard_set(shards or shards_of(oof)), result.age_cut,
                                  out / "contact_sheet.png", people)
    summary = {"experiments": [str(e) for e in oof.experiments], "rows": len(result.rows), "people": int(result.rows["person"].nunique()),
               "flagged": {k: int((result.flagged["kind"] == k).sum()) for k in KINDS},
               "fixes": len(result.fixes()) if judged_any else None, "part_f1": result.part_f1, "min_part_f1": MIN_PART_F1,
               "too_weak": {kind: {"part": part, "f1": f1, "floor": floor} for kind, (part, f1, floor) in result.too_weak.items()},
               "image_suspects": len(result.images), "min_evidence": MIN_EVIDENCE | dict(min_evidence or {}),
               "sheet": {"path": str(sheet), "people": min(people, shown["person"].nunique()), "photos": photos},
               "unfinished": oof.unfinished, "out": str(out)}
    if truth is not None:
        summary["truth"] = str(truth)
        summary["against_truth"] = precision_recall(result, planted(Path(truth)))
    atomic_write_json(out / "audit.json", summary)
    return summary


def _share(value: float | None) -> str:
    return "- (nothing flagged)" if value is None else f"{value:.3f}"


def describe(summary: dict) -> str:
    flagged = summary["flagged"]
    fixes = (f"{summary['fixes']} people in fixes.csv" if summary["fixes"] is not None
             else "no fixes.csv: no part of the models is strong enough to judge")
    lines = [f"audit of {summary['people']} people ({summary['rows']} OOF images) -> {summary['out']}"]
    lines += [f"  {kind} suspicions not judged: the models' OOF {w['part']} F1 is {w['f1']:.3f}, under the floor"
              f" {w['floor']:.2f} where the evidence means something; train stronger models" for kind, w in summary["too_weak"].items()]
    lines += [f"  flagged: gender {flagged['gender']}, age {flagged['age']}, swap {flagged['swap']} "
              f"(min evidence {summary['min_evidence']}); {fixes}",
              f"  image suspects: {summary['image_suspects']}; contact sheet: {summary['sheet']['people']} people,"
              f" {summary['sheet']['photos']} photos"]
    if summary["fixes"]:
        lines.append("  accept them: shards build ... --fixes " + str(Path(summary["out"]) / "fixes.csv"))
    if "against_truth" in summary:
        t = summary["against_truth"]
        lines.append(f"  against {summary['truth']}: precision {_share(t['precision'])}, recall {t['recall']:.3f}"
                     f" ({t['found']} of {t['planted']} planted errors in {t['flagged']} flagged); precision at the top"
                     f" {t['planted']}: {t['precision_at_planted']:.3f}")
        lines += [f"    {k}: precision {_share(v['precision'])}, recall {v['recall']:.3f} ({v['found']}/{v['planted']}, {v['flagged']} flagged)"
                  for k, v in t["kinds"].items()]
    lines += [f"  unfinished fold: {u}" for u in summary["unfinished"]]
    return "\n".join(lines)
