"""The ``maskdist`` command group: a thin click layer over the Python API.

User mistakes raise :class:`maskdist.errors.MaskdistError`; they are printed as one line
and exit with status 2 (or the error's own ``exit_code``), without a traceback. The commands live beside this module, one
module per stage of the flow.
"""
from __future__ import annotations

import os
import sys
import warnings

import click

from maskdist.errors import MaskdistError

INTERRUPTED_EXIT = 130  # Ctrl-C outside training (the shell's 128 + SIGINT)


def _one_line_warning(message, category, filename, lineno, file=None, line=None, _seen=set()):  # noqa: B006 (once per process)
    """Warnings as one line, without the source location, and each message once per run."""
    text = str(message).strip()
    if text in _seen:
        return
    _seen.add(text)
    print(f"warning: {text}", file=file or sys.stderr, flush=True)


class Group(click.Group):
    """A click group that turns MaskdistError into one line on stderr and exit status 2, a run
    stopped for preemption or Ctrl-C (state saved) into its own documented status, and Ctrl-C
    elsewhere into one line and status 130; every worker process it started has ended
    before it returns (:func:`maskdist.system.parallel.shutdown`)."""

    def invoke(self, ctx):
        from maskdist.system import parallel
        from maskdist.train.preemption import Preempted

        warnings.showwarning = _one_line_warning
        try:
            return super().invoke(ctx)
        except MaskdistError as err:
            if not getattr(err, "once_per_machine", False) or int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
                click.echo(f"error: {err}", err=True)
            sys.exit(getattr(err, "exit_code", 2))  # 2, or its own (a dead loader worker: 71)
        except Preempted as stopped:
            click.echo(str(stopped), err=True)
            sys.exit(stopped.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted (Ctrl-C): outputs are written whole or not at all, so nothing half-written was left",
                       err=True)
            sys.exit(INTERRUPTED_EXIT)
        finally:
            parallel.shutdown()


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="maskdist")
def main():
    """maskdist: train face-mask classifiers (18 classes) across many GPUs.

    Flow: synth or your competition folder -> shards build -> train per fold -> predict.
    """
