"""Commands that train: ``train`` (one fold; every flag from TrainConfig), ``kfold`` and ``demo``."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from maskdist.cli import usage
from maskdist.cli.base import main
from maskdist.errors import MaskdistError

# --- train (maskdist.train; options from maskdist.config.TrainConfig) ------------------

PRESET_NAMES = ("cpu_fast", "recipe", "strong")  # the presets in maskdist/presets/ (a test keeps this list true)


class TrainCommand(click.Command):
    """``train``'s options grouped as docs/training.md groups them, each with the default it
    will really get: the preset's value when ``--config`` is given (``--config cpu_fast --help``)."""

    def parse_args(self, ctx, args):
        # --help is handled while the arguments are parsed, so look for --config first.
        for i, arg in enumerate(args):
            if arg == "--config" and i + 1 < len(args):
                ctx.meta["maskdist.config"] = args[i + 1]
            elif arg.startswith("--config="):
                ctx.meta["maskdist.config"] = arg.split("=", 1)[1]
        return super().parse_args(ctx, args)

    def format_options(self, ctx, formatter):
        from maskdist import config as config_mod

        preset = ctx.meta.get("maskdist.config")
        try:
            values = config_mod.load(preset, validate=False).to_dict()
        except MaskdistError:
            preset, values = None, config_mod.TrainConfig().to_dict()
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            name = getattr(param, "name", "")
            group = getattr(param, "maskdist_group", None)
            if group is not None:
                shown = values[name]
                record = (record[0], f"{record[1]} [{'from ' + preset if preset else 'default'}: {shown!r}]")
            sections.setdefault(group or "command", []).append(record)
        for group in ("command", *config_mod.GROUPS):
            if sections.get(group):
                with formatter.section(f"{group} options" if group != "command" else "Options"):
                    formatter.write_dl(sections[group])


def _config_options(command):
    """One flag per TrainConfig field, in its group; unset flags stay None so YAML values are kept."""

    from maskdist import config as config_mod

    for f in reversed(dataclasses.fields(config_mod.TrainConfig)):
        flag = "--" + f.name.replace("_", "-")
        kind = config_mod.field_type(f)
        choices = f.metadata.get("choices")
        if kind is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=f.metadata["help"])
        else:
            option = click.option(flag, f.name, type=click.Choice(choices) if choices else kind, default=None,
                                  help=f.metadata["help"])
        command = option(command)
        command.__click_params__[-1].maskdist_group = f.metadata["group"]
    return command


@main.command(cls=TrainCommand)
@click.option("--config", "config_file", default=None,
              help=f"YAML file of options, or a preset: {', '.join(PRESET_NAMES)}; flags override it.")
@click.option("--print-config", is_flag=True, help="Print the resolved configuration (what config.yaml will hold) and exit.")
@_config_options
def train(config_file, print_config, **overrides):
    """Train one fold. Run under `accelerate launch -m maskdist train ...` for several processes."""
    from maskdist import config as config_mod
    from maskdist.system import parallel

    cfg = config_mod.load(config_file, overrides)
    if print_config:
        click.echo(config_mod.to_yaml(cfg), nl=False)
        return
    usage.check_train(cfg)  # before torch loads: a mistake is one line in a second
    if cfg.workers > 0:
        parallel.start_forkserver()
    from maskdist.train import loop as train_api

    train_api.train(cfg)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--shards", required=True, help="Shard set (folder, URL or pipe:).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Experiment folder (fold<K> runs + submission).")
@click.option("--config", "config_file", default=None,
              help=f"YAML train options for every fold, or a preset: {', '.join(PRESET_NAMES)}.")
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
@click.option("--dry-run", is_flag=True, help="Print each fold's launch (command and environment) and exit.")
@click.option("--full", is_flag=True, help="After the folds, train the full-data model (OUT/all) for their median best epoch.")
@click.pass_context
def kfold(ctx, shards, out, config_file, processes, cpu, parallel_folds, gpus, fold_list, accelerate_config, submission, tta, weighting,
          answers, dry_run, full):
    """Train every fold, then predict with the ensemble. Extra options are `maskdist train`'s."""
    from maskdist import config as config_mod

    # The extra options, parsed and checked by `train`'s own parser into typed overrides.
    overrides = train.make_context("train options", list(ctx.args), parent=ctx).params
    overrides.pop("config_file", None)
    overrides.pop("print_config", None)
    train_config = config_mod.load(config_file, dict(overrides, shards=shards, out=str(out)))
    usage.check_train(dataclasses.replace(train_config, fold="all"))  # the folds are checked against the set by the plan
    from maskdist.infer import scoring
    from maskdist.train import kfold as kfold_api

    plan = kfold_api.KFoldPlan(
        shards=shards, out=out, train=train_config, processes=processes, cpu=cpu, parallel_folds=parallel_folds,
        gpus=[g for g in gpus.split(",") if g], folds=[int(f) for f in fold_list.split(",") if f] or None,
        tta=tta, weighting=weighting, accelerate_config=accelerate_config, submission=submission, full=full,
    )
    if dry_run:
        kfold_api.describe_launches(plan, echo=click.echo)
        return
    written = kfold_api.run(plan, echo=click.echo)
    if written is None:  # folds are left: they may be training elsewhere
        return
    result = scoring.oof_scores(out)
    for fold, scores in sorted(result["folds"].items()):
        click.echo(f"fold {fold}: macro F1 {scores.macro_f1:.4f}")
    click.echo(f"out-of-fold macro F1 {result['oof'].macro_f1:.4f} ({result['samples']} images)")
    if answers:
        from maskdist.infer.predict import probs_path

        versus = scoring.ensemble_and_folds(probs_path(written), answers)
        click.echo(f"ensemble macro F1 on {answers}: {versus['ensemble']:.4f} "
                   f"(single fold models: mean {versus['fold_mean']:.4f}"
                   + (f"; the full-data model alone: {versus['full_data']:.4f}" if "full_data" in versus else "") + ")")
    click.echo(f"submission: {written}")


# --- demo -------------------------------------------------------------------------------


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"), show_default=True,
              help="Folder for the demo's data, shards and runs; re-running reuses what is complete.")
@click.option("--people", type=int, default=300, show_default=True, help="Synthetic training people.")
@click.option("--eval-people", type=int, default=120, show_default=True, help="Synthetic eval people.")
@click.option("--folds", type=int, default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--config", default="cpu_fast", show_default=True, help="Train preset or YAML file.")
@click.option("--processes", type=int, default=0, help="CPU processes per fold (default: 2 with two usable cores or more, else 1).")
@click.option("--epochs", type=int, default=None, help="Override the preset's epochs (fewer: faster, lower scores).")
def demo(workdir, people, eval_people, folds, seed, config, processes, epochs):
    """The whole flow on built-in synthetic data: synth, shards, k folds, ensemble, score."""
    from maskdist.demo import DemoOptions, run_demo

    run_demo(DemoOptions(workdir=workdir, people=people, eval_people=eval_people, folds=folds, seed=seed,
                         config=config, processes=processes, epochs=epochs), echo=click.echo)


# --- weights (maskdist.model.weights) ---------------------------------------------------


@main.group()
def weights():
    """Pretrained weights in the Hugging Face cache (HF_HOME): fetch on a node with network, train offline."""


@weights.command("fetch")
@click.argument("arch")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also copy the weights to this file (to carry to a cluster: --pretrained FILE).")
def weights_fetch(arch, out):
    """Download ARCH's default timm weights (or ARCH.TAG's, or a hub repo ORG/NAME's) into the cache."""
    from maskdist.model import weights as weights_api
    from maskdist.system.fileio import sha256_file

    found = weights_api.fetch(arch, out)
    record = found.record
    click.echo(f"{record['repo_id']} at revision {record['revision']}: {found.path}")
    if out is not None:
        click.echo(f"copied to {out} (sha256 {sha256_file(out)})")


@weights.command("list")
def weights_list():
    """The model repos in the Hugging Face cache, with their sizes and revisions."""
    from maskdist.model import weights as weights_api

    rows = weights_api.cached()
    if not rows:
        click.echo(f"no models in the Hugging Face cache ({weights_api.cache_dir() or 'the default, ~/.cache/huggingface/hub'})")
    for row in rows:
        click.echo(f"{row.repo_id}  {row.size_bytes / 1e6:.1f} MB  revisions: {', '.join(row.revisions)}")
