"""``maskdist bench ...``: every speed claim as a ratio measured in one run."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from maskdist.cli.base import Group, main
from maskdist.errors import MaskdistError

# --- bench (maskdist.bench) ------------------------------------------------------------------


@main.group(cls=Group)
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

    from maskdist.bench import loader as bench_api

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

    from maskdist.bench import train as bench_api

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

    from maskdist.bench import epoch as bench_api

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
@click.option("--info", "info_csv", type=click.Path(path_type=Path), default=None,
              help="info.csv of the eval part (default: the one it was built from).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--tta", type=click.Choice(["none", "hflip"]), default="none", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "no", "bf16", "fp16"]), default="auto", show_default=True,
              help="Mixed precision; auto: the one the folds were trained with.")
@click.option("--rounds", type=int, default=2, show_default=True, help="Alternating timed rounds of each loop.")
@click.option("--allow-unfinished", is_flag=True, help="Let folds that did not finish their schedule vote.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def bench_predict_cmd(runs, shards, info_csv, batch_size, workers, tta, precision, rounds, allow_unfinished, as_json):
    """The fold ensemble's predict vs a bare forward of the same models on the same decoded images."""
    import dataclasses
    import json

    from maskdist.bench import predict as bench_api

    result = bench_api.bench_predict(runs, shards, info_csv, batch_size=batch_size, workers=workers, tta=tta,
                                     precision=precision, rounds=rounds, allow_unfinished=allow_unfinished)
    click.echo(json.dumps(dataclasses.asdict(result) | {"ratio": result.ratio}) if as_json else result.describe())


@bench.command("onnx")
@click.argument("runs", type=click.Path(path_type=Path))
@click.argument("photos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tta", type=click.Choice(["none", "hflip"]), default="none", show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True, help="Timed rounds of each (alternating).")
@click.option("--allow-unfinished", is_flag=True, help="Let folds that did not finish their schedule in.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def bench_onnx_cmd(runs, photos, tta, batch_size, rounds, allow_unfinished, as_json):
    """The ONNX ensemble under onnxruntime vs the same graph in PyTorch (agreement and img/s), and classify, on CPU."""
    import dataclasses
    import json

    from maskdist.bench import onnx as bench_api

    result = bench_api.bench_onnx([runs], photos, tta, batch_size, rounds, allow_unfinished)
    click.echo(json.dumps(dataclasses.asdict(result) | {"ratio": result.ratio}) if as_json else result.describe())


@bench.command("memory", context_settings={"ignore_unknown_options": True})
@click.option("--every", type=float, default=1.0, show_default=True, help="Seconds between samples.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write every sample here.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def bench_memory_cmd(every, csv_path, command):
    """Run COMMAND and sample the memory (RSS) of it and every process it starts, over time.

    Example: maskdist bench memory -- maskdist train --config cpu_fast --shards shards/synth --fold 0 --out runs/m
    """
    from maskdist.bench import memory as bench_api

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
    from maskdist.bench import options as bench_api

    result = bench_api.bench_options(shards, out, [v for v in variants.split(",") if v], _int_list(seeds), config_file,
                                     fold, list(ctx.args), echo=click.echo)
    click.echo(result.describe(markdown=markdown))


@bench.command("crop")
@click.option("--synth", "synth_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also count the faces found on this `maskdist synth` folder's drawn faces.")
@click.option("--synth-images", type=int, default=210, show_default=True, help="Training photos of --synth to try.")
@click.option("--margins", default="0.2,0.3,0.4,0.5,0.6", show_default=True, help="Crop margins to compare, comma-separated.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Alternating timed rounds (medians are shown).")
def bench_crop_cmd(synth_dir, synth_images, margins, rounds):
    """The installed face detectors on real photos with drawn masks: photos/s per core against
    the build's own work, faces found, boxes' agreement, and what each crop margin keeps."""
    from maskdist.bench import crop as bench_api

    try:
        values = [float(v) for v in margins.split(",") if v.strip()]
    except ValueError:
        raise MaskdistError(f"--margins {margins!r}: expected comma-separated numbers, e.g. 0.3,0.4") from None
    click.echo(bench_api.bench_crop(values, synth_dir, synth_images, rounds).describe())


@bench.command("compare")
@click.option("--rows", type=int, default=18900, show_default=True, help="OOF rows timed (7 photos per person).")
@click.option("--resamples", type=int, default=2000, show_default=True, help="Bootstrap resamples timed.")
@click.option("--repeats", type=int, default=200, show_default=True,
              help="Calibration repeats on simulated OOF predictions (0: time only).")
@click.option("--people", type=int, default=2700, show_default=True, help="People per calibration repeat.")
@click.option("--calibration-resamples", type=int, default=1000, show_default=True, help="Bootstrap resamples per repeat.")
@click.option("--age-gain", type=float, default=0.08, show_default=True,
              help="The planted improvement: the rise in the chance of a person's right age group.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def bench_compare_cmd(rows, resamples, repeats, people, calibration_resamples, age_gain, as_json):
    """`compare`'s bootstrap: its time on ROWS OOF rows, and its calibration on simulated OOF
    predictions (seed-only pairs must get 'no detectable difference', a planted gain 'better')."""
    import json

    from maskdist.bench import compare as bench_api

    speed = bench_api.bench_speed(rows, resamples=resamples)
    calibration = bench_api.calibrate(repeats, people, calibration_resamples, age_gain) if repeats > 0 else None
    if as_json:
        click.echo(json.dumps({"speed": speed, "calibration": bench_api.as_dict(calibration) if calibration else None}))
        return
    click.echo(f"bootstrap of {speed['rows']} OOF rows ({speed['people']} people) x {speed['experiments']} experiments,"
               f" {speed['resamples']} resamples: {speed['seconds']:.2f} s (best of {len(speed['rounds'])})")
    if calibration is not None:
        click.echo(calibration.describe())


@bench.command("cli")
@click.argument("shards", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def bench_cli_cmd(shards, as_json):
    """Time each command's usage error (a real process each), slowest first.

    SHARDS: a shard set folder, for the mistakes checked against its manifest (a fold it lacks)."""
    import json

    from maskdist.bench import cli as bench_api

    rows = bench_api.bench_cli(shards)
    if as_json:
        click.echo(json.dumps(rows))
    else:
        for row in rows:
            click.echo(f"{row['seconds']:6.2f} s (CPU {row['cpu_s']:.2f} s)  {row['case']}"
                       + ("" if row["ok"] else f"  (NOT a one-line usage error: {row['error'][:200]})"))
        slowest = rows[0]
        click.echo(f"slowest: {slowest['case']}, {slowest['seconds']:.2f} s (CPU {slowest['cpu_s']:.2f} s);"
                   f" {sum(r['ok'] for r in rows)}/{len(rows)} one-line usage errors")
    if not all(row["ok"] for row in rows):
        sys.exit(1)
