"""``maskdist bench compare``: the speed of compare's bootstrap, and its calibration on
simulated OOF predictions whose truth is known.

The simulation draws people as the competition has them (7 photos: 5 masks, 1 incorrect, 1
without; few old people) and, for each experiment, a model's predictions on them. A model
decides a person's gender and age group once for all of that person's photos (a face is
judged the same way on each of its photos; this is what makes the photos of one person
correlated), with a chance of being right that depends on how hard the person is; the mask
is decided per photo. Two experiments that differ only in the seed are two independent
draws of the same model quality; a planted improvement raises the chance of the right age
group. Simulated rather than trained so that hundreds of repeats take seconds; the method
is the one ``compare`` runs on real experiments.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from maskdist.data import labels
from maskdist.infer.compare import SAME, _interval, bootstrap, verdict

PHOTOS = (0, 0, 0, 0, 0, 1, 2)  # mask part of a person's 7 photos: 5 worn, 1 incorrect, 1 not worn
AGE_SHARE = (0.45, 0.45, 0.10)  # young, middle, old: few old people, as in the competition


def simulate_people(rng: np.random.Generator, people: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True 18-class labels, person index and hardness (0..1) of each photo."""
    gender = rng.integers(0, 2, people)
    age = rng.choice(3, size=people, p=AGE_SHARE)
    hardness = rng.beta(2, 5, people)
    mask = np.tile(PHOTOS, people)
    person = np.repeat(np.arange(people), len(PHOTOS))
    y = mask * 6 + gender[person] * 3 + age[person]
    return y, person, hardness


def simulate_model(rng: np.random.Generator, y: np.ndarray, person: np.ndarray, hardness: np.ndarray,
                   age_gain: float = 0.0) -> np.ndarray:
    """One model's predicted labels: gender and age decided per person, the mask per photo."""
    people = len(hardness)
    mask, gender, age = y // 6, (y // 3) % 2, y % 3
    right_gender = rng.random(people) < 0.95 - 0.3 * hardness
    right_age = rng.random(people) < np.clip(0.75 - 0.6 * hardness + age_gain, 0, 1)
    wrong_age = (age + rng.integers(1, 3, len(y))) % 3  # per photo only where the person's age is missed
    pred_age = np.where(right_age[person], age, np.where(age == 1, wrong_age, 1))  # misses go to the middle group
    pred_gender = np.where(right_gender[person], gender, 1 - gender)
    pred_mask = np.where(rng.random(len(y)) < 0.93, mask, (mask + rng.integers(1, 3, len(y))) % 3)
    return pred_mask * 6 + pred_gender * 3 + pred_age


@dataclass
class Calibration:
    repeats: int
    people: int
    resamples: int
    age_gain: float
    seed_only_same: int  # repeats where two seeds of one model got "no detectable difference" (per-person bootstrap)
    planted_detected: int  # repeats where the planted improvement was called "better"
    seed_only_same_per_image: int  # the same seed pairs judged by a naive per-image bootstrap
    planted_gain: float  # the mean macro F1 the planted change gained
    seconds: float

    def describe(self) -> str:
        return (f"calibration on simulated OOF predictions: {self.repeats} repeats of {self.people} people"
                f" ({self.people * len(PHOTOS)} photos), {self.resamples} resamples each, {self.seconds:.1f} s\n"
                f"  two seeds of one model: 'no detectable difference' in {self.seed_only_same}/{self.repeats}"
                f" ({self.seed_only_same / self.repeats:.1%}); a per-image bootstrap would say so in"
                f" {self.seed_only_same_per_image}/{self.repeats} ({self.seed_only_same_per_image / self.repeats:.1%})\n"
                f"  a planted improvement (age right +{self.age_gain:.2f}, macro F1 {self.planted_gain:+.4f} on average):"
                f" 'better' in {self.planted_detected}/{self.repeats} ({self.planted_detected / self.repeats:.1%})")


def calibrate(repeats: int = 200, people: int = 2700, resamples: int = 1000, age_gain: float = 0.08, seed: int = 0) -> Calibration:
    """Repeat the comparison on fresh simulated people: seed-only pairs and a planted gain."""
    started = time.perf_counter()
    same = detected = same_per_image = 0
    gains = []
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        y, person, hardness = simulate_people(rng, people)
        preds = np.stack([simulate_model(rng, y, person, hardness), simulate_model(rng, y, person, hardness),
                          simulate_model(rng, y, person, hardness, age_gain)], axis=1)
        observed, resampled = bootstrap(y, preds, person, resamples, seed=r)
        same += verdict(_interval(resampled["macro_f1"][:, 1] - resampled["macro_f1"][:, 0])) == SAME
        detected += verdict(_interval(resampled["macro_f1"][:, 2] - resampled["macro_f1"][:, 0])) == "better"
        gains.append(float(observed["macro_f1"][2] - observed["macro_f1"][0]))
        _, per_image = bootstrap(y, preds[:, :2], np.arange(len(y)), resamples, seed=r)
        same_per_image += verdict(_interval(per_image["macro_f1"][:, 1] - per_image["macro_f1"][:, 0])) == SAME
    return Calibration(repeats, people, resamples, age_gain, same, detected, same_per_image, float(np.mean(gains)),
                       time.perf_counter() - started)


def bench_speed(rows: int = 18900, experiments: int = 2, resamples: int = 2000, rounds: int = 3, seed: int = 0) -> dict:
    """Seconds of the bootstrap over ``rows`` OOF rows (7 per person): the best of ``rounds``."""
    rng = np.random.default_rng(seed)
    y, person, hardness = simulate_people(rng, max(1, rows // len(PHOTOS)))
    preds = np.stack([simulate_model(rng, y, person, hardness) for _ in range(experiments)], axis=1)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        bootstrap(y, preds, person, resamples, seed)
        times.append(time.perf_counter() - started)
    return {"rows": int(len(y)), "people": int(len(hardness)), "experiments": experiments, "resamples": resamples,
            "classes": labels.NUM_CLASSES, "seconds": min(times), "rounds": times}


def as_dict(calibration: Calibration) -> dict:
    return asdict(calibration)
