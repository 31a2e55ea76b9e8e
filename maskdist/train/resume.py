"""What a run that fails mid-epoch saves, and the command that goes on from it.

A dead loader worker (:class:`~maskdist.system.worker_death.WorkerDied`) or a non-finite loss
(:class:`~maskdist.train.step.NonFiniteLoss`) stops the run before the step it would spoil.
The steps done before it are saved as a resumable state, as a SIGTERM would, where that can
be done: saving is a collective, so a failure that only one rank knows of (its own worker)
saves nothing under several processes; and a state holds no gradients, so a step inside an
accumulation window saves nothing either. Then the last saved state stays, and ``--resume``
continues from it.
"""
from __future__ import annotations

import shlex
import sys
from collections.abc import Callable


def resume_command(argv: list[str] | None = None) -> str:
    """This command again, with ``--resume`` (under a launcher: the same launch with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["maskdist", *args, *([] if "--resume" in args else ["--resume"])])


def stop_after_failure(run, epoch: int, step: int, save: Callable[..., None], why: str, alone: bool = False) -> str:
    """Save the state at ``step`` of ``epoch`` (steps done) when it can be saved here and now;
    ``alone``: only this rank knows of the failure. Returns the clause saying what was saved
    and how to go on, for the one line that reports the failure."""
    again = f"resume with: {resume_command()}"
    if alone and run.accelerator.num_processes > 1:
        return f"this rank cannot save alone (the others are in their next step): the last saved state stays; {again}"
    if step % run.cfg.grad_accum and step != run.steps_per_epoch:
        return (f"step {step} is inside an accumulation window, and a state holds no gradients: the last saved state"
                f" stays; {again}")
    save(why, announce=False)
    return f"saved a resumable state at epoch {epoch} step {step}; {again}"
