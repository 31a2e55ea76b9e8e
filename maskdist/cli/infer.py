"""Commands that use trained folds: ``predict``, ``score``, ``oof``, ``compare``, ``audit``, ``pseudo-label``, ``classify``, ``export``."""
from __future__ import annotations

from pathlib import Path

import click

from maskdist.cli import usage
from maskdist.cli.base import main
from maskdist.errors import plural, rate

# --- predict, score, oof, audit, pseudo-label (maskdist.infer) ---------------------------

PRECISION_HELP = "Mixed precision; auto: the one the folds were trained with (their config.yaml)."
DECISIONS_HELP = ("tuned: the decisions `maskdist oof RUNS --tune` wrote into the experiment, when it has them (else the"
                  " argmax); argmax: the most probable class; or a decisions file.")
UNFINISHED_HELP = "Let folds that did not finish their schedule vote (the outputs record them)."
NONFINITE_HELP = ("Go on when a model gives non-finite output (NaN or inf): the images it could not compute are voted by the"
                  " other models, or kept without an answer, and marked in the outputs (default: stop, nothing written).")


def _vote_options(command):
    """The options of the commands the ensemble votes in (predict, classify)."""
    options = [
        click.option("--weights", "weighting", type=click.Choice(["uniform", "f1"]), default="uniform", show_default=True,
                     help="Average each experiment's folds uniformly or weighted by validation F1."),
        click.option("--decisions", default="tuned", show_default=True, help=DECISIONS_HELP),
        click.option("--tta", type=click.Choice(["none", "hflip"]), default="none", show_default=True),
        click.option("--batch-size", type=int, default=64, show_default=True),
        click.option("--workers", type=int, default=2, show_default=True),
        click.option("--precision", type=click.Choice(["auto", "no", "bf16", "fp16"]), default="auto", show_default=True,
                     help=PRECISION_HELP),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--shards", default=None, help="Shard set whose eval part to predict (folder, URL or pipe:).")
@click.option("--eval-dir", type=click.Path(path_type=Path), default=None, help="A competition eval folder (info.csv + images/) instead of --shards.")
@click.option("--info", "info_csv", type=click.Path(path_type=Path), default=None,
              help="info.csv of the shard set's eval part (default: the one it was built from).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("submission.csv"), show_default=True)
@_vote_options
@click.option("--timeout-s", type=int, default=1800, show_default=True, help="Collective-operation timeout (a hung rank becomes an error).")
@click.option("--allow-unfinished", is_flag=True, help=UNFINISHED_HELP)
@click.option("--full-weight", type=float, default=None,
              help="The full-data model's share of its experiment's vote, 0..1 (default: as one fold's).")
@click.option("--allow-nonfinite", is_flag=True, help=NONFINITE_HELP)
def predict(runs, shards, eval_dir, info_csv, out, weighting, decisions, tta, batch_size, workers, precision, timeout_s,
            allow_unfinished, full_weight, allow_nonfinite):
    """The ensemble votes on the eval set and writes the submission.

    RUNS: experiment folders (all of their fold<K>; several experiments vote together) or
    run folders one by one; the full-data model (RUNS/all) votes when named, alone or
    beside its experiment's folds.
    """
    from maskdist.system import parallel

    usage.check_launch_devices()
    usage.check_eval_source(shards, eval_dir)
    usage.check_runs(runs)
    if info_csv is not None:
        usage.check_inputs([info_csv], "--info")

    if workers > 0:
        parallel.start_forkserver()
    from maskdist.infer import predict as predict_api

    summary = predict_api.predict(runs, out, shards=shards, eval_dir=eval_dir, info_csv=info_csv, weighting=weighting,
                                  tta=tta, batch_size=batch_size, workers=workers, precision=precision, timeout_s=timeout_s,
                                  decisions=decisions, allow_unfinished=allow_unfinished, full_weight=full_weight,
                                  allow_nonfinite=allow_nonfinite)
    if summary["processes"] == 1 or _is_main():
        for note in summary["notes"]:
            click.echo(f"note: {note}", err=True)
        for line in summary["nonfinite_lines"]:
            click.echo(line, err=True)
        precision = "full precision" if summary["precision"] == "no" else f"{summary['precision']} mixed precision"
        click.echo(f"{plural(summary['images'], 'image')} x {plural(summary['models'], 'model')} on"
                   f" {plural(summary['processes'], 'process', 'processes')} ({precision}, TTA {tta}, {weighting} weights):"
                   f" {rate(summary['images'], summary['seconds'])}; decisions {summary['decisions']};"
                   f" wrote {summary['out']}, {summary['probs']} and {summary['record']}")


@main.command()
@click.argument("submission", type=click.Path(path_type=Path))
@click.argument("answers", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def score(submission, answers, as_json):
    """Macro F1, per-class and part F1, and the confusion matrix of a submission."""
    import json

    usage.check_inputs([submission, answers], "file")
    from maskdist.infer import scoring

    scores = scoring.score_submission(submission, answers)
    warning = scoring.placeholder_warning(answers)
    if warning:
        click.echo(warning, err=True)
    click.echo(json.dumps(scores.to_dict()) if as_json else scoring.describe_scores(scores))


@main.command()
@click.argument("experiments", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tune", is_flag=True, help="Tune decisions (and, for several experiments, their weights) on the OOF predictions"
              " and write them into the experiment, with the nested (honest) figure.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where --tune writes (default: EXPERIMENT/decisions.json; decisions-with-<B>.json for several).")
@click.option("--force", is_flag=True, help="Write the tuned decisions even when their nested gain is not positive.")
@click.option("--allow-unfinished", is_flag=True, help="Read the OOF predictions of folds that did not finish (recorded).")
@click.option("--allow-nonfinite", is_flag=True, help="Score and tune without the OOF rows whose probabilities are not finite"
              " (NaN or inf), naming them (default: stop).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def oof(experiments, tune, out, force, allow_unfinished, allow_nonfinite, as_json):
    """Cross-validated macro F1 (each fold's, and that of all out-of-fold predictions); with
    --tune, decisions tuned for macro F1 on them."""
    import json

    usage.check_runs(experiments)
    from maskdist.infer import oof as oof_api, scoring

    result = oof_api.oof_scores(list(experiments), allow_unfinished, allow_nonfinite)
    tuned = oof_api.tune_decisions(list(experiments), out, force, allow_unfinished, allow_nonfinite) if tune else None
    if as_json:
        data = {"folds": {k: v.to_dict() for k, v in result["folds"].items()}, "oof": result["oof"].to_dict(),
                "unfinished": result["unfinished"], "ignored": result["ignored"], "mixed_plans": result["mixed_plans"],
                "nonfinite": result["nonfinite"]}
        if "blend" in result:
            data["blend"] = result["blend"].to_dict()
            data["experiments"] = {k: v["oof"].macro_f1 for k, v in result["experiments"].items()}
        if tuned is not None:
            data["decisions"] = tuned
        click.echo(json.dumps(data))
        return
    for note in result["unfinished"]:
        click.echo(f"note: unfinished fold read: {note}", err=True)
    for note in result["ignored"] + result["mixed_plans"]:
        click.echo(f"note: {note}", err=True)
    if result["nonfinite"]:
        click.echo(f"warning: {len(result['nonfinite'])} OOF row(s) with non-finite probabilities left out of every figure"
                   " (--allow-nonfinite):", err=True)
        for row in result["nonfinite"]:
            click.echo(f"  {row['key']}: {row['why']}", err=True)
    for fold, scores in sorted(result["folds"].items()):
        click.echo(f"fold {fold}: macro F1 {scores.macro_f1:.4f} ({scores.samples} images)")
    click.echo(scoring.describe_scores(result["oof"], "out-of-fold: "))
    for name, item in result.get("experiments", {}).items():
        click.echo(f"{name}: out-of-fold macro F1 {item['oof'].macro_f1:.4f}")
    if "blend" in result:
        click.echo(f"equal-weight blend of {len(result['experiments'])} experiments: out-of-fold macro F1 {result['blend'].macro_f1:.4f}")
    if tuned is not None:
        click.echo(oof_api.describe_tuned(tuned))


@main.command()
@click.argument("experiments", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--answers", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The eval set's answers (ImageID,ans): the same figures on the eval set, from each experiment's submission.")
@click.option("--submission", "submissions", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="With --answers: a submission CSV or predict's .probs.npz, once per experiment in order"
              " (default: EXPERIMENT/submission.csv).")
@click.option("--resamples", type=int, default=2000, show_default=True, help="Bootstrap resamples (of people).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap resamples.")
@click.option("--allow-unfinished", is_flag=True, help="Read the OOF predictions of folds that did not finish (recorded).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def compare(experiments, answers, submissions, resamples, seed, allow_unfinished, as_json):
    """Did a change help? Paired differences against the first experiment, with 95% intervals
    from a bootstrap over people, and a verdict each.

    EXPERIMENTS: two or more experiment folders trained on the same shard set (same folds,
    same people)."""
    import json

    usage.check_runs(experiments)
    usage.check_inputs([p for p in [answers, *submissions] if p is not None], "file")
    from maskdist.infer import compare as compare_api

    result = compare_api.compare_experiments(list(experiments), resamples=resamples, seed=seed, answers=answers,
                                             submissions=list(submissions) or None, allow_unfinished=allow_unfinished)
    click.echo(json.dumps(result) if as_json else compare_api.describe(result))


@main.command()
@click.argument("experiments", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Output folder (default: EXPERIMENT/audit).")
@click.option("--shards", default=None, help="The shard set the folds trained on, for the photos (default: the folds' config.yaml).")
@click.option("--people", type=int, default=24, show_default=True, help="Suspect people on the contact sheet.")
@click.option("--min-evidence", default=None, help="Per-kind evidence to flag a suspect, e.g. gender=0.9,age=1.25,swap=0.9.")
@click.option("--truth", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A label-fix file of known errors (synth --label-noise writes label_noise.csv): print precision and recall.")
@click.option("--allow-unfinished", is_flag=True, help="Read the OOF predictions of folds that did not finish (recorded).")
def audit(experiments, out, shards, people, min_evidence, truth, allow_unfinished):
    """Rank label suspects (per image and per person) from the OOF predictions; write a CSV, a
    contact sheet PNG of the suspects' photos and a fixes file for `shards build --fixes`.

    A kind of suspicion (gender, age, swap) is judged only when the models' OOF F1 of its part
    (gender, age, mask) reaches a floor (docs/kfold.md); weaker parts are named and give no fixes."""
    usage.check_runs(experiments)
    if truth is not None:
        usage.check_inputs([truth], "--truth")
    from maskdist.infer import audit as audit_api
    from maskdist.infer.pseudo import parse_part_confidence

    thresholds = parse_part_confidence(min_evidence, "--min-evidence", "gender=0.9,age=1.25,swap=0.9") if min_evidence else None
    summary = audit_api.run_audit(list(experiments), out, shards, people, truth, thresholds, allow_unfinished)
    click.echo(audit_api.describe(summary))


@main.command("pseudo-label")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.argument("images_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("pseudo_labels.csv"), show_default=True)
@click.option("--min-confidence", type=float, default=0.5, show_default=True, help="Drop images whose ensemble confidence is lower.")
@click.option("--age-from-filename", default=None, help="Regex with one group capturing the age in years from the file name, e.g. '_(\\d+)\\.'.")
@click.option("--decisions", default="tuned", show_default=True, help=DECISIONS_HELP)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "no", "bf16", "fp16"]), default="auto", show_default=True, help=PRECISION_HELP)
@click.option("--timeout-s", type=int, default=1800, show_default=True, help="Collective-operation timeout (a hung rank becomes an error).")
@click.option("--part-confidence", default=None,
              help="Per-part thresholds on the chosen part's probability, e.g. mask=0.5,gender=0.9,age=0.8.")
@click.option("--allow-unfinished", is_flag=True, help=UNFINISHED_HELP)
@click.option("--allow-nonfinite", is_flag=True, help=NONFINITE_HELP)
def pseudo_label(runs, images_dir, out, min_confidence, age_from_filename, decisions, batch_size, workers, precision, timeout_s,
                 part_confidence, allow_unfinished, allow_nonfinite):
    """Label outside images with the ensemble; the CSV feeds `shards build --extra`.

    RUNS: one or more experiment folders (or fold run folders), then IMAGES_DIR."""
    usage.check_runs(runs)
    usage.check_inputs([images_dir], "IMAGES_DIR")
    from maskdist.infer import pseudo

    report = pseudo.pseudo_label(list(runs), images_dir, out, min_confidence, age_from_filename, batch_size, workers,
                                 precision=precision, timeout_s=timeout_s, decisions=decisions, allow_unfinished=allow_unfinished,
                                 part_confidence=pseudo.parse_part_confidence(part_confidence), allow_nonfinite=allow_nonfinite)
    click.echo(report.describe())


@main.command()
@click.argument("runs", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the CSV here (path, class, mask, gender, age, probability); default: print it.")
@_vote_options
@click.option("--allow-unfinished", is_flag=True, help=UNFINISHED_HELP)
@click.option("--allow-nonfinite", is_flag=True, help=NONFINITE_HELP)
def classify(runs, inputs, out, weighting, decisions, tta, batch_size, workers, precision, allow_unfinished, allow_nonfinite):
    """Classify photos (any layout) with the ensemble of RUNS.

    RUNS: an experiment folder (or a fold run folder); then PHOTO or FOLDER, one or more.
    Unreadable files are named and skipped."""
    from maskdist.system import parallel

    usage.check_inputs(inputs, "photo or folder")
    usage.check_runs([runs])
    if workers > 0:
        parallel.start_forkserver()
    from maskdist.infer import classify as classify_api

    result = classify_api.classify([runs], inputs, out, tta=tta, weighting=weighting, decisions=decisions, batch_size=batch_size,
                                   workers=workers, precision=precision, allow_unfinished=allow_unfinished,
                                   allow_nonfinite=allow_nonfinite)
    if out is None:
        click.echo(result.rows.to_csv(index=False), nl=False)
    click.echo(result.describe(out), err=True)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["timm", "onnx"]), required=True,
              help="timm: each fold model in timm's hub layout (a folder each); onnx: the whole ensemble as one graph.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="timm: a folder (one sub-folder per fold); onnx: a .onnx file.")
@click.option("--tta", type=click.Choice(["none", "hflip"]), default="none", show_default=True, help="onnx: TTA inside the graph.")
@click.option("--weights", "weighting", type=click.Choice(["uniform", "f1"]), default="uniform", show_default=True,
              help="onnx: average each experiment's folds uniformly or weighted by validation F1.")
@click.option("--decisions", default="tuned", show_default=True, help="onnx: the decisions behind the label output. " + DECISIONS_HELP)
@click.option("--allow-unfinished", is_flag=True, help=UNFINISHED_HELP)
@click.option("--allow-nonfinite", is_flag=True, help="Export a model whose weights or output are not finite (NaN or inf),"
              " recorded in the export (default: stop, nothing exported).")
def export(runs, fmt, out, tta, weighting, decisions, allow_unfinished, allow_nonfinite):
    """Fold models out of RUNS: timm's hub layout, or one ONNX graph of the ensemble.

    RUNS: experiment folders (all of their fold<K>) or fold run folders."""
    usage.check_runs(runs)
    if fmt == "onnx":
        usage.require_extra("onnx", "export --format onnx")
    from maskdist.infer import export as export_api, members

    for note in members.unnamed_full_data(runs, members.find_members(runs, allow_unfinished=True), "is not exported"):
        click.echo(f"note: {note}", err=True)  # as predict says it: an experiment folder exports its folds only
    if fmt == "timm":
        for folder in export_api.export_timm(list(runs), out, allow_unfinished, allow_nonfinite):
            click.echo(f"wrote {folder} (timm.create_model('local-dir:{folder}'))")
        return
    done = export_api.export_onnx(list(runs), out, tta, weighting, decisions, allow_unfinished, allow_nonfinite)
    photo = "the face crop" if done["face_crop"] else "the photo"
    click.echo(f"wrote {done['out']}: {done['models']} model(s), input uint8 RGB NHWC {done['crop']}x{done['crop']} ({photo} squashed"
               f" to {done['resize']}x{done['resize']}, bilinear, centre crop {done['crop']}), TTA {done['tta']}, decisions {done['decisions']}")
