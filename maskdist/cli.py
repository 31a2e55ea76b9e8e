"""The ``maskdist`` command line: a thin click layer over the Python API.

User mistakes raise :class:`maskdist.errors.MaskdistError`; they are printed as one line
and exit with status 2, without a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from maskdist.errors import MaskdistError


class _Group(click.Group):
    """A click group that turns MaskdistError into one line on stderr and exit status 2, and a
    run stopped for preemption (state saved) into its own documented status."""

    def invoke(self, ctx):
        from maskdist.preemption import Preempted

        try:
            return super().invoke(ctx)
        except MaskdistError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except Preempted as stopped:
            click.echo(str(stopped), err=True)
            sys.exit(stopped.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="maskdist")
def main():
    """maskdist: train face-mask classifiers (18 classes) across many GPUs.

    Flow: synth or your competition folder -> shards build -> train per fold -> predict.
    """


# --- synthetic data ---------------------------------------------------------------------


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--people", type=int, default=None, help="Training people (default: 2,700, the competition's count).")
@click.option("--scale", type=float, default=None, help="Scale all person counts by this factor instead of --people.")
@click.option("--eval-people", type=int, default=None, help="Eval people (default: 2/3 of the training people).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=1, show_default=True, help="Processes writing images.")
@click.option("--external", type=int, default=0, show_default=True, help="Also write N outside-style images (age in the file name, no labels).")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at OUT.")
def synth(out, people, scale, eval_people, seed, workers, external, overwrite):
    """Write a synthetic dataset in the competition layout to OUT."""
    from maskdist import synth as synth_api

    summary = synth_api.write_dataset(
        out, people=people, scale=scale, eval_people=eval_people, seed=seed, workers=workers,
        external=external, overwrite=overwrite, progress=True,
    )
    click.echo(summary.describe())


# --- demo -------------------------------------------------------------------------------


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"), show_default=True,
              help="Folder for the demo's data, shards and runs; re-running reuses what is complete.")
@click.option("--people", type=int, default=300, show_default=True, help="Synthetic training people.")
@click.option("--eval-people", type=int, default=120, show_default=True, help="Synthetic eval people.")
@click.option("--folds", type=int, default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--config", default="cpu_fast", show_default=True, help="Train preset or YAML file.")
@click.option("--processes", type=int, default=0, help="CPU processes per fold (default: 2 when two cores are free, else 1).")
@click.option("--epochs", type=int, default=None, help="Override the preset's epochs (fewer: faster, lower scores).")
def demo(workdir, people, eval_people, folds, seed, config, processes, epochs):
    """The whole flow on built-in synthetic data: synth, shards, k folds, ensemble, score."""
    from maskdist.demo import DemoOptions, run_demo

    run_demo(DemoOptions(workdir=workdir, people=people, eval_people=eval_people, folds=folds, seed=seed,
                         config=config, processes=processes, epochs=epochs), echo=click.echo)


# --- layout -----------------------------------------------------------------------------


@main.command()
@click.argument("train_dir", type=click.Path(path_type=Path))
@click.option("--eval", "eval_dir", type=click.Path(path_type=Path), default=None, help="Competition eval folder (info.csv + images/).")
@click.option("--fixes", type=click.Path(path_type=Path), default=None, help="Label-fix CSV; 'published' for the fixes shipped with maskdist.")
@click.option("--extra", multiple=True, type=click.Path(path_type=Path), help="Extra labelled image CSV (repeatable).")
@click.option("--folds", "k", type=int, default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--age-cut", type=int, default=58, show_default=True, help="Old-age cut of the training labels.")
def layout(train_dir, eval_dir, fixes, extra, k, seed, age_cut):
    """Read a competition-style folder and print what was read, skipped and fixed, and the folds."""
    from maskdist import folds as folds_api
    from maskdist import layout as layout_api

    table, report = layout_api.read_train(train_dir, fixes=fixes, extra=extra)
    click.echo(report.describe())
    table = folds_api.assign_folds(table, k=k, seed=seed)
    click.echo(folds_api.describe(table, age_cut=age_cut))
    if eval_dir is not None:
        eval_table, eval_report = layout_api.read_eval(eval_dir)
        click.echo(eval_report.describe())


# --- train (maskdist.train; options from maskdist.config.TrainConfig) ------------------


def _config_options(command):
    """One flag per TrainConfig field; unset flags stay None so YAML values are kept."""
    import dataclasses

    from maskdist import config as config_mod

    for f in reversed(dataclasses.fields(config_mod.TrainConfig)):
        flag = "--" + f.name.replace("_", "-")
        kind = config_mod.field_type(f)
        choices = f.metadata.get("choices")
        help_text = f"{f.metadata['help']} [default: {f.default!r}]"
        if kind is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
        else:
            option = click.option(flag, f.name, type=click.Choice(choices) if choices else kind, default=None, help=help_text)
        command = option(command)
    return command


@main.command()
@click.option("--config", "config_file", default=None,
              help="YAML file of options, or a preset name (recipe, cpu_fast); flags override it.")
@_config_options
def train(config_file, **overrides):
    """Train one fold. Run under `accelerate launch -m maskdist train ...` for several processes."""
    from maskdist import config as config_mod
    from maskdist import parallel

    cfg = config_mod.load(config_file, overrides)
    if cfg.workers > 0:
        parallel.start_forkserver()
    from maskdist import train as train_api

    train_api.train(cfg)


# --- predict, score, oof, pseudo-label (maskdist.predict, .scoring, .pseudo) --------------


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--shards", default=None, help="Shard set whose eval part to predict (folder, URL or pipe:).")
@click.option("--eval-dir", type=click.Path(path_type=Path), default=None, help="A competition eval folder (info.csv + images/) instead of --shards.")
@click.option("--info", "info_csv", type=click.Path(path_type=Path), default=None, help="info.csv of the shard set's eval part (default: the one it was built from).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("submission.csv"), show_default=True)
@click.option("--weights", "weighting", type=click.Choice(["uniform", "f1"]), default="uniform", show_default=True, help="Average folds uniformly or weighted by validation F1.")
@click.option("--tta", type=click.Choice(["none", "hflip"]), default="none", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--precision", type=click.Choice(["no", "bf16", "fp16"]), default="no", show_default=True)
@click.option("--timeout-s", type=int, default=1800, show_default=True, help="Collective-operation timeout (a hung rank becomes an error).")
def predict(runs, shards, eval_dir, info_csv, out, weighting, tta, batch_size, workers, precision, timeout_s):
    """The fold ensemble votes on the eval set and writes the submission.

    RUNS: an experiment folder (all of its fold<K>) or fold run folders one by one.
    """
    from maskdist import parallel

    if workers > 0:
        parallel.start_forkserver()
    from maskdist import predict as predict_api

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

    from maskdist import scoring

    scores = scoring.score_submission(submission, answers)
    click.echo(json.dumps(scores.to_dict()) if as_json else scoring.describe_scores(scores))


@main.command()
@click.argument("experiment", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def oof(experiment, as_json):
    """Cross-validated macro F1: each fold's, and that of all out-of-fold predictions."""
    import json

    from maskdist import scoring

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
    from maskdist import pseudo

    report = pseudo.pseudo_label([runs], images_dir, out, min_confidence, age_from_filename, batch_size, workers,
                                 precision=precision, timeout_s=timeout_s,
                                 part_confidence=pseudo.parse_part_confidence(part_confidence))
    click.echo(report.describe())


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--shards", required=True, help="Shard set (folder, URL or pipe:).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Experiment folder (fold<K> runs + submission).")
@click.option("--config", "config_file", default=None, help="YAML train options for every fold, or a preset name (recipe, cpu_fast).")
@click.option("--processes", type=int, default=1, show_default=True, help="Processes (GPUs, or CPU ranks with --cpu) per fold.")
@click.option("--cpu", is_flag=True, help="CPU DDP (gloo) instead of GPUs.")
@click.option("--parallel-folds", type=int, default=1, show_default=True, help="Folds trained side by side, each on its own GPU subset.")
@click.option("--gpus", default="", help="GPU ids to share out with --parallel-folds, e.g. 0,1,2,3.")
@click.option("--folds", "fold_list", default="", help="Only these folds, e.g. 0,2 (default: all).")
@click.option("--accelerate-config", type=click.Path(dir_okay=False), default=None, help="An accelerate config file (see launch/).")
@click.option("--submission", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Default: OUT/submission.csv.")
@click.option("--tta", type=click.Choice(["none", "hflip"]), default="none", show_default=True)
@click.option("--weights", "weighting", type=click.Choice(["uniform", "f1"]), default="uniform", show_default=True)
@click.option("--answers", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Score the submission against these answers.")
@click.pass_context
def kfold(ctx, shards, out, config_file, processes, cpu, parallel_folds, gpus, fold_list, accelerate_config, submission, tta, weighting, answers):
    """Train every fold, then predict with the ensemble. Extra options are `maskdist train`'s."""
    from maskdist import config as config_mod
    from maskdist import kfold as kfold_api
    from maskdist import scoring

    # The extra options, parsed and checked by `train`'s own parser into typed overrides.
    overrides = train.make_context("maskdist kfold", list(ctx.args), parent=ctx).params
    overrides.pop("config_file", None)
    train_config = config_mod.load(config_file, dict(overrides, shards=shards, out=str(out)))
    plan = kfold_api.KFoldPlan(
        shards=shards, out=out, train=train_config, processes=processes, cpu=cpu, parallel_folds=parallel_folds,
        gpus=[g for g in gpus.split(",") if g], folds=[int(f) for f in fold_list.split(",") if f] or None,
        tta=tta, weighting=weighting, accelerate_config=accelerate_config, submission=submission,
    )
    written = kfold_api.run(plan, echo=click.echo)
    result = scoring.oof_scores(out)
    for fold, scores in sorted(result["folds"].items()):
        click.echo(f"fold {fold}: macro F1 {scores.macro_f1:.4f}")
    click.echo(f"out-of-fold macro F1 {result['oof'].macro_f1:.4f} ({result['samples']} images)")
    if answers:
        from maskdist.predict import probs_path

        versus = scoring.ensemble_and_folds(probs_path(written), answers)
        click.echo(f"ensemble macro F1 on {answers}: {versus['ensemble']:.4f} "
                   f"(single fold models: mean {versus['fold_mean']:.4f})")
    click.echo(f"submission: {written}")


# --- shards (maskdist.shards) -------------------------------------------------------------


@main.group(cls=_Group)
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
@click.option("--quiet", is_flag=True, help="No progress bar.")
def shards_build(train_dir, out, eval_dir, k, seed, age_cut, fixes, extra, image_size, quality, shard_size, workers, overwrite, quiet):
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
            progress=not quiet,
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


# --- bench (maskdist.bench_loader, maskdist.bench_train) ---


@main.group(cls=_Group)
def bench():
    """Benchmarks: measured on this machine, from what was actually read."""


@bench.command("loader")
@click.argument("shards")
@click.option("--workers", type=int, default=2, show_default=True, help="DataLoader workers of the second run (the first uses 1).")
@click.option("--samples", type=int, default=3000, show_default=True, help="Images timed per run (after the first batch).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--alpha", type=float, default=0.0, show_default=True, help="Class mixing: 0 uniform, 0.5 square root, 1 natural.")
@click.option("--folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Training folder the set was built from (default: the manifest's build.train_dir).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def bench_loader_cmd(shards, workers, samples, batch_size, alpha, folder, seed, as_json):
    """Shard stream vs a plain webdataset pipeline (same shards) and a folder-of-JPEGs loader
    (PIL + torchvision, same images).

    SHARDS: a shard set folder, an http(s) URL of one, or `pipe:CMD` with {} for the path inside the set.
    """
    import dataclasses
    import json

    from maskdist import bench_loader as bench_api

    result = bench_api.bench_loader(shards, workers=workers, samples=samples, batch_size=batch_size,
                                    folder=folder, alpha=alpha, seed=seed)
    if as_json:
        data = dataclasses.asdict(result)
        data["ratios"] = {str(r.workers): result.ratio(r.workers) for r in result.stream_runs}
        data["ratios_webdataset"] = {str(r.workers): result.ratio(r.workers, "webdataset") for r in result.stream_runs}
        data["images_per_s"] = {f"{r.name} {r.workers}": r.images_per_s
                                for r in result.stream_runs + result.webdataset_runs + result.baseline_runs}
        click.echo(json.dumps(data, indent=1))
    else:
        click.echo(result.describe())


@bench.command("train")
@click.option("--model", default="efficientnet_b3", show_default=True, help="timm architecture.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--crop", type=int, default=150, show_default=True, help="Input size (square).")
@click.option("--steps", type=int, default=20, show_default=True, help="Timed steps per round and loop.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Alternating rounds of the two loops.")
@click.option("--precision", type=click.Choice(["no", "bf16", "fp16"]), default="no", show_default=True)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile both models.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def bench_train_cmd(model, batch_size, crop, steps, rounds, precision, compile_model, as_json):
    """maskdist's training step vs a bare PyTorch loop (same model, loss, optimiser, precision)."""
    import dataclasses
    import json

    from maskdist import bench_train as bench_api

    result = bench_api.run(model, batch_size=batch_size, crop=crop, steps=steps, rounds=rounds, precision=precision,
                           compile_model=compile_model)
    click.echo(json.dumps(dataclasses.asdict(result) | {"ratio": result.ratio}) if as_json else result.describe())


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise MaskdistError(f"{text!r}: expected comma-separated whole numbers, e.g. 1,2,4") from None
    if not values:
        raise MaskdistError(f"{text!r}: expected at least one number")
    return values


@bench.command("epoch")
@click.argument("shards")
@click.option("--workers", "worker_list", default="1,2", show_default=True, help="Loader worker counts to try, e.g. 1,2,4,8.")
@click.option("--steps", type=int, default=50, show_default=True, help="Timed training steps per worker count.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed steps first (worker start, buffers).")
@click.option("--config", "config_file", default="cpu_fast", show_default=True, help="Train preset or YAML file.")
@click.option("--fold", type=int, default=0, show_default=True)
@click.option("--model", default=None, help="Override the config's timm model.")
@click.option("--batch-size", type=int, default=None, help="Override the config's batch size.")
@click.option("--resize", type=int, default=None, help="Override the config's resize.")
@click.option("--crop", type=int, default=None, help="Override the config's crop (input size).")
@click.option("--precision", type=click.Choice(["no", "bf16", "fp16"]), default=None, help="Override the config's precision.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def bench_epoch_cmd(shards, worker_list, steps, warmup, config_file, fold, model, batch_size, resize, crop, precision, as_json):
    """The real training loop on SHARDS at each worker count vs the same loop fed from memory.

    Prints img/s, the data-wait share and the loader's CPU use per worker count, and the
    ratio to the in-memory ceiling: how many workers this model needs on this machine.
    """
    import dataclasses
    import json

    from maskdist import bench_epoch as bench_api

    overrides = {k: v for k, v in dict(model=model, batch_size=batch_size, resize=resize, crop=crop, precision=precision).items()
                 if v is not None}
    result = bench_api.bench_epoch(shards, workers=_int_list(worker_list), steps=steps, warmup=warmup, config=config_file,
                                   fold=fold, overrides=overrides)
    if as_json:
        data = dataclasses.asdict(result)
        data["images_per_s"] = {str(r.workers): r.images_per_s for r in result.runs}
        data["data_wait_frac"] = {str(r.workers): r.wait_frac for r in result.runs}
        data["loader_cores"] = {str(r.workers): r.loader_cores for r in result.runs}
        data["ratios"] = {str(r.workers): result.ratio(r.workers) for r in result.runs}
        data["ceiling_images_per_s"] = result.ceiling.images_per_s if result.ceiling else None
        data["workers_needed"] = result.workers_needed()
        click.echo(json.dumps(data, indent=1))
    else:
        click.echo(result.describe())


@bench.command("predict")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--shards", required=True, help="Shard set whose eval part to predict.")
@click.option("--info", "info_csv", type=click.Path(path_type=Path), default=None, help="info.csv of the eval part (default: the one it was built from).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--tta", type=click.Choice(["none", "hflip"]), default="none", show_default=True)
@click.option("--precision", type=click.Choice(["no", "bf16", "fp16"]), default="no", show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True, help="Alternating timed rounds of each loop.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def bench_predict_cmd(runs, shards, info_csv, batch_size, workers, tta, precision, rounds, as_json):
    """The fold ensemble's predict vs a bare forward of the same models on the same decoded images."""
    import dataclasses
    import json

    from maskdist import bench_predict as bench_api

    result = bench_api.bench_predict(runs, shards, info_csv, batch_size=batch_size, workers=workers, tta=tta,
                                     precision=precision, rounds=rounds)
    click.echo(json.dumps(dataclasses.asdict(result) | {"ratio": result.ratio}) if as_json else result.describe())


@bench.command("memory", context_settings={"ignore_unknown_options": True})
@click.option("--every", type=float, default=1.0, show_default=True, help="Seconds between samples.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write every sample here.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def bench_memory_cmd(every, csv_path, command):
    """Run COMMAND and sample the memory (RSS) of it and every process it starts, over time.

    Example: maskdist bench memory -- maskdist train --config cpu_fast --shards shards/synth --fold 0 --out runs/m
    """
    from maskdist import bench_memory as bench_api

    trace = bench_api.watch(command, every=every)
    if csv_path:
        trace.write_csv(csv_path)
    click.echo(trace.describe())
    if trace.returncode != 0:
        sys.exit(trace.returncode if 0 < trace.returncode < 256 else 1)


@bench.command("options", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("shards")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder of the runs (re-running continues).")
@click.option("--variants", default=",".join(["recipe", "ema", "parts", "focal+f1", "mixup+cutmix", "drop-path", "strong-augment", "strong"]),
              show_default=True, help="Which variants, comma-separated.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds, comma-separated.")
@click.option("--config", "config_file", default="cpu_fast", show_default=True, help="Base train preset or YAML file.")
@click.option("--fold", type=int, default=0, show_default=True)
@click.option("--markdown", is_flag=True, help="Print the table as markdown.")
@click.pass_context
def bench_options_cmd(ctx, shards, out, variants, seeds, config_file, fold, markdown):
    """Each recipe option alone, and all of them, vs the recipe: validation macro and part F1
    over seeds. Extra options go to every `maskdist train` run (e.g. --epochs 1)."""
    from maskdist import bench_options as bench_api

    result = bench_api.bench_options(shards, out, [v for v in variants.split(",") if v], _int_list(seeds), config_file,
                                     fold, list(ctx.args), echo=click.echo)
    click.echo(result.describe(markdown=markdown))
