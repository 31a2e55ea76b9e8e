"""Non-finite model outputs (NaN or inf) at inference: found, named, and refused or marked.

A model whose output is not finite on some input has broken weights (a NaN bias, BatchNorm
statistics gone wrong), so its answers on the other inputs cannot be trusted either. Every
command that votes (predict, classify, pseudo-label) names each such model and every image it
could not compute, and stops before writing unless ``--allow-nonfinite`` is given; then an
image is voted by the models that did give a finite output (:func:`maskdist.infer.ensemble.mix`),
or kept without an answer when none did, and marked either way: no row disappears.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from maskdist.errors import MaskdistError

ALLOW_OPTION = "--allow-nonfinite"
CAUSES = "a learning rate too high, fp16 overflow (try --precision bf16 or no), or broken pretrained weights"


@dataclass
class NonFinite:
    """What the models could not compute: per model the images it gave non-finite output for,
    and per image why."""

    models: dict = field(default_factory=dict)  # run folder -> images with non-finite output from it
    rows: list = field(default_factory=list)  # (key, why), one per image some model could not compute
    unanswered: list = field(default_factory=list)  # keys no model gave a finite output for

    def __bool__(self) -> bool:
        return bool(self.models)

    def to_dict(self) -> dict:
        return {"models": dict(self.models), "rows": [{"key": k, "why": why} for k, why in self.rows],
                "unanswered": list(self.unanswered)}

    def renamed(self, names: dict) -> NonFinite:
        """The same report with each key given its name in ``names`` (an eval image's ImageID)."""
        return NonFinite(dict(self.models), [(names.get(k, k), why) for k, why in self.rows],
                         [names.get(k, k) for k in self.unanswered])

    def describe_models(self, total: int, what: str = "image(s)") -> str:
        return "; ".join(f"{run} on {n} of {total} {what}" for run, n in self.models.items())


def find(ensemble, votes) -> NonFinite:
    """The non-finite outputs among ``votes`` (:class:`maskdist.infer.ensemble.Votes`)."""
    report = NonFinite()
    for key in sorted(votes.nonfinite):
        probs = votes.nonfinite[key]
        bad = [j for j in range(len(ensemble.members)) if not np.isfinite(probs[j]).all()]
        for j in bad:
            run = str(ensemble.members[j].run_dir)
            report.models[run] = report.models.get(run, 0) + 1
        names = ", ".join(str(ensemble.members[j].run_dir) for j in bad)
        if len(bad) == len(ensemble.members):
            report.unanswered.append(key)
            report.rows.append((key, f"non-finite output (NaN or inf) of {names}: no answer"))
        else:
            report.rows.append((key, f"non-finite output (NaN or inf) of {names}: voted by the other"
                                     f" {len(ensemble.members) - len(bad)} model(s)"))
    return report


KEPT = "each of these rows voted by the other models or left without an answer, and marked"


def check(report: NonFinite, total: int, allow: bool, what: str = "image(s)", kept: str = KEPT) -> None:
    """Refuse in one line, naming each model, unless ``allow``; ``kept``: what ``--allow-nonfinite`` does."""
    if not report or allow:
        return
    examples = ", ".join(k for k, _ in report.rows[:3])
    raise MaskdistError(f"non-finite output (NaN or inf) from {report.describe_models(total, what)} (e.g. {examples}):"
                        f" the model's weights are broken, so none of its answers can be trusted; retrain it (likely causes:"
                        f" {CAUSES}); nothing was written. {ALLOW_OPTION} writes the outputs anyway, {kept}")


def warning_lines(report: NonFinite, total: int, where: str, what: str = "image(s)", limit: int = 10) -> list[str]:
    """What a command prints when ``--allow-nonfinite`` let it go on: the models, then the rows."""
    if not report:
        return []
    lines = [f"warning: non-finite output (NaN or inf) from {report.describe_models(total, what)} ({ALLOW_OPTION}):"
             f" {len(report.rows)} {what} marked, {len(report.unanswered)} without an answer; all listed in {where}"]
    lines += [f"  {key}: {why}" for key, why in report.rows[:limit]]
    if len(report.rows) > limit:
        lines.append(f"  ... and {len(report.rows) - limit} more in {where}")
    return lines
