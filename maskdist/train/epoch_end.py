"""What happens between two epochs: the epoch's figures summed over ranks, BatchNorm
statistics averaged, validation of the live (and EMA) weights, the best model with its card
and out-of-fold rows, the epoch line and its TensorBoard scalars.
"""
from __future__ import annotations

from accelerate import Accelerator

from maskdist.shards import crop as face_crop
from maskdist.system import distributed
from maskdist.system.fileio import atomic_path
from maskdist.train import checkpoint, monitor
from maskdist.train.checkpoint import OOF
from maskdist.train.meters import EpochTally, mean_over_ranks
from maskdist.train.run import Run
from maskdist.train.validation import NONFINITE_CAUSES, nonfinite_rows, oof_frame, sync_buffers, validate


def epoch_figures(run: Run, epoch: int, tally: EpochTally, skipped_history: dict) -> dict:
    """The epoch's loss, images/s and data-wait share over ranks, and the shards skipped in it
    (added to ``skipped_history``); a collective, so every rank calls it."""
    accelerator, world = run.accelerator, run.accelerator.num_processes
    loss = mean_over_ranks(accelerator, tally.loss_sum / max(tally.steps, 1))
    wait = mean_over_ranks(accelerator, tally.wait_s / max(tally.busy_s, 1e-9))
    rate = mean_over_ranks(accelerator, tally.images / max(tally.busy_s, 1e-9)) * world
    skipped = _gather_skipped(accelerator, run.train_data.skipped)
    for path, (reason, samples) in skipped.items():
        skipped_history.setdefault(path, {"reason": reason, "samples": samples, "epochs": []})["epochs"].append(epoch)
    skipped_samples = sum(samples for _reason, samples in skipped.values())
    return {"loss": loss, "wait": wait, "rate": rate, "skipped": skipped,
            "skipped_text": f", skipped {len(skipped)} shard(s) ({skipped_samples} samples)" if skipped else "",
            "scalars": {"train/epoch_loss": loss, "train/epoch_images_per_s": rate, "train/epoch_data_wait_frac": wait,
                        "data/skipped_shards": len(skipped), "data/skipped_samples": skipped_samples}}


def finish_epoch(run: Run, epoch: int, tally: EpochTally, best: dict, skipped_history: dict) -> dict:
    """Close ``epoch``: log it, validate, keep the best model; returns the best so far (the
    same on every rank). ``skipped_history`` gains the shards skipped in this epoch."""
    cfg, accelerator, steps = run.cfg, run.accelerator, run.steps_per_epoch
    epoch_end_step = (epoch + 1) * steps
    figures = epoch_figures(run, epoch, tally, skipped_history)

    sync_buffers(run)
    validated = validate(run, epoch)
    # Weights whose logits are not finite on some sample are no candidate for best: their F1
    # counts those samples as class 0, and their answers cannot be trusted.
    nonfinite = {name: nonfinite_rows(predictions) for name, (predictions, _scores) in validated.items()}
    candidates = [name for name in validated if not nonfinite[name]] or list(validated)
    # The better of the live and the EMA weights is this epoch's candidate for best.
    weights = max(candidates, key=lambda name: validated[name][1].macro_f1)
    predictions, scores = validated[weights]
    improved = scores.macro_f1 > best["macro_f1"] and not nonfinite[weights]
    history = dict(best.get("nonfinite", {}))  # epoch -> samples with non-finite logits, per weights
    if any(nonfinite.values()):
        history[str(epoch)] = {"samples": scores.samples} | {name: n for name, n in nonfinite.items() if n}
    if run.main:
        live = validated["live"][1]
        logged = monitor.score_scalars(live) | monitor.scalars(figures["scalars"]) | {"val/nonfinite_samples": nonfinite["live"]}
        if "ema" in validated:
            logged |= monitor.score_scalars(validated["ema"][1], prefix="val_ema") | {"val_ema/nonfinite_samples": nonfinite["ema"]}
        if any(nonfinite.values()):
            counts = ", ".join(f"{n} of {validated[name][1].samples} samples with the {name} weights" for name, n in nonfinite.items() if n)
            what = "the epoch is not a candidate for best" if nonfinite[weights] else "those weights are not a candidate for best"
            accelerator.print(f"warning: epoch {epoch}: non-finite validation logits (NaN or inf) on {counts}: {what}"
                              f" (likely causes: {NONFINITE_CAUSES})")
        accelerator.log(logged, step=epoch_end_step)
        run.writer.add_image("val/confusion", monitor.confusion_image(scores.confusion), epoch_end_step, dataformats="HWC")
        accelerator.print(
            f"epoch {epoch}: loss {figures['loss']:.4f}, {figures['rate']:.0f} img/s, data wait {100 * figures['wait']:.1f}%, "
            f"val macro F1 {live.macro_f1:.4f} "
            f"(mask {live.part_f1['mask']:.3f}, gender {live.part_f1['gender']:.3f}, age {live.part_f1['age']:.3f})"
            + (f", EMA {validated['ema'][1].macro_f1:.4f}" if "ema" in validated else "")
            + figures["skipped_text"]
            + (f" *best* ({weights})" if improved and run.ema is not None else " *best*" if improved else "")
        )
        if improved:
            best = {"macro_f1": scores.macro_f1, "epoch": epoch, "weights": weights, "part_f1": scores.part_f1,
                    "per_class_f1": scores.per_class_f1, "accuracy": scores.accuracy, "samples": scores.samples}
            save_model(run, cfg.fold_number, epoch, best, skipped_history, confusion=scores.confusion, nonfinite_validation=history)
            with atomic_path(run.run_dir / OOF) as tmp:
                oof_frame(predictions, cfg.fold_number).to_csv(tmp, index=False, float_format="%.6g")
        elif history != best.get("nonfinite", {}):
            checkpoint.update_card(run.run_dir, {"nonfinite_validation": history})  # once a best model has a card
        if history:
            best = best | {"nonfinite": history}  # kept in the resumable state, for the card of a later best
    return distributed.gather_rows([best], accelerator)[0]  # every rank agrees on the best (rank 0's)


def save_model(run: Run, fold, epoch: int, best: dict, skipped_history: dict, **entries) -> None:
    """Save the model of ``best`` (the weights it names: ``live`` or ``ema``) with its card;
    ``entries`` are added to the card."""
    cfg = run.cfg
    metrics = {k: v for k, v in best.items() if k != "nonfinite"}  # the card's own entry holds that
    card = checkpoint.model_card(cfg.model, cfg.resize, cfg.crop, run.mean, run.std, run.shard_set.age_cut, fold, epoch, metrics,
                                 cfg.drop_rate, heads=cfg.heads, pretrained=run.pretrained)
    card |= face_crop.card_entry(run.shard_set.manifest)  # the shards' crop, for predict to repeat
    card.update(weights=best["weights"],  # live or ema: which weights best.safetensors holds
                train_folds=run.train_folds, data=data_summary(skipped_history),
                finished=False,  # True once the fold has trained its every epoch
                epochs=cfg.epochs, **entries)
    checkpoint.save(run.run_dir, run.ema.module if best["weights"] == "ema" else run.module, card)


def _gather_skipped(accelerator: Accelerator, skipped: dict) -> dict:
    """The union over ranks of the shards skipped this epoch: path -> (reason, samples)."""
    merged: dict = {}
    for rows in distributed.gather_rows([dict(skipped)], accelerator):
        for path, value in rows.items():
            merged.setdefault(path, tuple(value))
    return merged


def data_summary(skipped_history: dict) -> dict:
    """What ``model.json`` says about skipped shards: per shard its reason, samples and epochs."""
    return {"skipped_shards": len(skipped_history),
            "skipped_samples": sum(v["samples"] * len(v["epochs"]) for v in skipped_history.values()),
            "skipped": skipped_history}
