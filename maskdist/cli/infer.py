"""Commands that use trained folds: ``predict``, ``score``, ``oof`` and ``pseudo-label``."""
from __future__ import annotations

from pathlib import Path

import click

from maskdist.cli.base import main

# --- predict, score, oof, pseudo-label (maskdist.infer) ----------------------------------


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--shards", default=None, help="Shard set whose eval part to predict (folder, URL or pipe:).")
@click.option("--eval-dir", type=click.Path(path_type=Path), default=None, help="A competition eval folder (info.csv + images/) instead of --shards.")
@click.option("--info", "info_csv", type=click.Path(path_type=Path), default=None,
              help="info.csv of the shard set's eval part (default: the one it was built from).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("submission.csv"), show_default=True)
@click.option("--weights", "weighting", type=click.Choice(["uniform", "f1"]), default="uniform", show_default=True,
              help="Average folds uniformly or weighted by validation F1.")
@click.option("--tta", type=click.Choice(["none", "hflip"]), default="none", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--precision", type=click.Choice(["no", "bf16", "fp16"]), default="no", show_default=True)
@click.option("--timeout-s", type=int, default=1800, show_default=True, help="Collective-operation timeout (a hung rank becomes an error).")
def predict(runs, shards, eval_dir, info_csv, out, weighting, tta, batch_size, workers, precision, timeout_s):
    """The fold ensemble votes on the eval set and writes the submission.

    RUNS: an experiment folder (all of its fold<K>) or fold run folders one by one.
    """
    from maskdist.system import parallel

    if workers > 0:
        parallel.start_forkserver()
    from maskdist.infer import predict as predict_api

    summary = predict_api.predict(runs, out, shards=shards, eval_dir=eval_dir, info_csv=info_csv, weighting=weighting,
                                  tta=tta, batch_size=batch_size, workers=workers, precision=precision, timeout_s=timeout_s)
    if summary["processes"] == 1 or int(__import__("os").environ.get("RANK", "0")) == 0:
        click.echo(f"{summary['images']} images x {summary['models']} models on {summary['processes']} process(es): "
                   f"{summary['images_per_s']:.0f} img/s; wrote {summary['out']} and {summary['probs']}")


@main.command()
@click.argument("submission", type=click.Path(path_type=Path))
@click.argument("answers", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def score(submission, answers, as_json):
    """Macro F1, per-class and part F1, and the confusion matrix of a submission."""
    import json

    from maskdist.infer import scoring

    scores = scoring.score_submission(submission, answers)
    click.echo(json.dumps(scores.to_dict()) if as_json else scoring.describe_scores(scores))


@main.command()
@click.argument("experiment", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def oof(experiment, as_json):
    """Cross-validated macro F1: each fold's, and that of all out-of-fold predictions."""
    import json

    from maskdist.infer import scoring

    result = scoring.oof_scores(experiment)
    if as_json:
        click.echo(json.dumps({"folds": {k: v.to_dict() for k, v in result["folds"].items()}, "oof": result["oof"].to_dict()}))
        return
    for fold, scores in sorted(result["folds"].items()):
        click.echo(f"fold {fold}: macro F1 {scores.macro_f1:.4f} ({scores.samples} images)")
    click.echo(scoring.describe_scores(result["oof"], "out-of-fold: "))


@main.command("pseudo-label")
@click.argument("runs", type=click.Path(path_type=Path))
@click.argument("images_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("pseudo_labels.csv"), show_default=True)
@click.option("--min-confidence", type=float, default=0.5, show_default=True, help="Drop images whose ensemble confidence is lower.")
@click.option("--age-from-filename", default=None, help="Regex with one group capturing the age in years from the file name, e.g. '_(\\d+)\\.'.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--precision", type=click.Choice(["no", "bf16", "fp16"]), default="no", show_default=True)
@click.option("--timeout-s", type=int, default=1800, show_default=True, help="Collective-operation timeout (a hung rank becomes an error).")
@click.option("--part-confidence", default=None,
              help="Per-part thresholds on the chosen part's probability, e.g. mask=0.5,gender=0.9,age=0.8.")
def pseudo_label(runs, images_dir, out, min_confidence, age_from_filename, batch_size, workers, precision, timeout_s,
                 part_confidence):
    """Label outside images with the fold ensemble; the CSV feeds `shards build --extra`."""
    from maskdist.infer import pseudo

    report = pseudo.pseudo_label([runs], images_dir, out, min_confidence, age_from_filename, batch_size, workers,
                                 precision=precision, timeout_s=timeout_s,
                                 part_confidence=pseudo.parse_part_confidence(part_confidence))
    click.echo(report.describe())
