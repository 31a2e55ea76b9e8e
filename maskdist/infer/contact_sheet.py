"""The audit's picture: a contact sheet PNG of the suspects' photos, one row per suspect
person, each photo with its given label and its out-of-fold prediction under it.

The photos come from the training shards (every fold holds its people's images), so the
sheet shows what the models saw. A tile is the stored image resized to ``TILE`` with
:func:`tile_image`; :func:`tile_box` says where each tile lies (tests read them back).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from maskdist.data import labels
from maskdist.errors import MaskdistError
from maskdist.shards.format import IMAGE_EXT
from maskdist.shards.manifest import ShardSet
from maskdist.streams.samples import read_shard
from maskdist.system.fileio import atomic_path

TILE = (96, 128)  # width, height: the photos' 3:4
GAP = 6
HEADER = 18  # the row's title: rank, person, suspicion
CAPTION = 28  # two lines under each tile: given, OOF prediction
MARGIN = 8
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
ALARM = (210, 30, 30)  # RGB: the part the suspicion is about differs from the given label
FONT = cv2.FONT_HERSHEY_SIMPLEX


def sheet_size(rows: int) -> tuple[int, int]:
    """(width, height) of a sheet of ``rows`` people."""
    width = 2 * MARGIN + len(labels.STEMS) * TILE[0] + (len(labels.STEMS) - 1) * GAP
    return width, 2 * MARGIN + rows * (HEADER + TILE[1] + CAPTION + GAP)


def tile_box(row: int, col: int) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` of the tile of person ``row``, photo ``col`` (STEMS order)."""
    top = MARGIN + row * (HEADER + TILE[1] + CAPTION + GAP) + HEADER
    left = MARGIN + col * (TILE[0] + GAP)
    return top, left, top + TILE[1], left + TILE[0]


def tile_image(rgb: np.ndarray) -> np.ndarray:
    return cv2.resize(rgb, TILE, interpolation=cv2.INTER_AREA)


def read_photos(shard_set: ShardSet, keys: Iterable[str], folds: Iterable[int]) -> dict[str, np.ndarray]:
    """RGB images of ``keys`` from the training shards of ``folds``."""
    wanted = set(keys)
    found: dict[str, np.ndarray] = {}
    for shard in shard_set.shards("train", sorted({int(f) for f in folds}), extra=False):
        for sample in read_shard(shard_set, shard):
            if sample["__key__"] in wanted:
                bgr = cv2.imdecode(np.frombuffer(sample[IMAGE_EXT], np.uint8), cv2.IMREAD_COLOR)
                if bgr is not None:
                    found[sample["__key__"]] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if len(found) == len(wanted):
            break
    return found


def _text(sheet: np.ndarray, text: str, x: int, y: int, color=INK) -> None:
    cv2.putText(sheet, text, (x, y), FONT, 0.33, color, 1, cv2.LINE_AA)


def _differs(kind: str, given: int, predicted: int) -> bool:
    g, p = labels.decode(given), labels.decode(predicted)
    part = {"gender": 1, "age": 2, "swap": 0}.get(kind)
    return g != p if part is None else g[part] != p[part]


def draw(suspects: pd.DataFrame, rows: pd.DataFrame, photos: dict[str, np.ndarray], age_cut: int) -> np.ndarray:
    """The sheet (RGB) of ``suspects`` (the audit's person suspects, in order); ``rows`` are
    the audit's OOF rows (key, label, pred, p_pred)."""
    by_key = rows.set_index("key")
    width, height = sheet_size(len(suspects))
    sheet = np.full((height, width, 3), BACKGROUND, np.uint8)
    for r, (_, s) in enumerate(suspects.iterrows()):
        top = tile_box(r, 0)[0]
        _text(sheet, f"#{s['rank']} {s['person']}: {s['kind']} {s['given']} -> {s['proposed']} ({s['evidence']:.2f})",
              MARGIN, top - 5)
        for c, stem in enumerate(labels.STEMS):
            t, left, bottom, right = tile_box(r, c)
            key = f"{s['person']}/{stem}"
            if key in photos:
                sheet[t:bottom, left:right] = tile_image(photos[key])
            if key not in by_key.index:
                continue
            row = by_key.loc[key]
            alarm = _differs(s["kind"], int(row["label"]), int(row["pred"]))
            _text(sheet, f"{labels.short_name(int(row['label']), age_cut)}", left, bottom + 11)
            _text(sheet, f"{labels.short_name(int(row['pred']), age_cut)} {row['p_pred']:.2f}", left, bottom + 23, ALARM if alarm else INK)
    return sheet


def write_png(sheet: np.ndarray, path: Path) -> None:
    ok, data = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:
        raise MaskdistError(f"could not encode {path}")
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.tobytes())


def contact_sheet(suspects: pd.DataFrame, rows: pd.DataFrame, shard_set: ShardSet, age_cut: int, out: Path,
                  people: int = 24) -> tuple[Path, int]:
    """Write the sheet of the first ``people`` distinct suspect people; returns the path and
    how many photos of theirs were found in the shards."""
    chosen = suspects.drop_duplicates("person").head(people)
    keys: Sequence[str] = [f"{p}/{stem}" for p in chosen["person"] for stem in labels.STEMS]
    photos = read_photos(shard_set, keys, chosen["fold"])
    write_png(draw(chosen, rows, photos, age_cut), out)
    return out, len(photos)
