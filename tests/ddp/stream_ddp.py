"""Run under a real 2-process CPU launch (accelerate launch / torchrun, ACCELERATE_USE_CPU=1).

Iterates the training stream for two epochs with an all_reduce after every step (unequal
step counts would hang: the launching test turns a hang into a failure with a timeout),
then the evaluation stream of a fold and of the eval split; writes rank<r>.json to OUT.

usage: stream_ddp.py SHARDS OUT [--batch-size B] [--workers K] [--holdout F]
"""
from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object

from maskdist import streams
from maskdist.shards.manifest import open_shard_set


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shards")
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--holdout", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))])
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    assert accelerator.num_processes == 2, accelerator.num_processes
    rank, world = accelerator.process_index, accelerator.num_processes

    shard_set = open_shard_set(args.shards)
    loader, steps = streams.train_loader(
        shard_set, streams.folds_except(shard_set, args.holdout), args.batch_size, rank=rank, world_size=world,
        workers=args.workers, seed=7, transform=None, shuffle_buffer=16)
    result = {"rank": rank, "world": world, "env_rank": os.environ.get("RANK"), "steps_expected": steps,
              "epochs": []}
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        count, keys, sizes = 0, [], set()
        for batch in loader:
            count += 1
            keys.append(batch["key"])
            sizes.add(tuple(batch["image"].shape))
            # A collective per step: a rank with more steps than the other blocks here.
            total = accelerator.reduce(torch.tensor([1.0]), reduction="sum")
            assert total.item() == world
        counts = gather_object([count])
        result["epochs"].append({"steps": count, "all_steps": counts, "keys": keys, "shapes": sorted(sizes)})
    loader.close()

    evals = {}
    for which in (args.holdout, "eval"):
        ev = streams.eval_loader(shard_set, which, batch_size=5, rank=rank, world_size=world, workers=args.workers,
                                transform=None)
        keys, labels, batches = [], [], 0
        for batch in ev:
            batches += 1
            keys += batch["key"]
            labels += (batch["row"] if which == "eval" else batch["label"]).tolist()
        evals[str(which)] = {"keys": keys, "labels": labels, "batches": batches, "len": len(ev),
                             "samples": ev.dataset.samples, "gathered": sorted(gather_object(keys))}
        ev.close()
    result["eval"] = evals
    accelerator.wait_for_everyone()
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    accelerator.end_training()


if __name__ == "__main__":
    main()
