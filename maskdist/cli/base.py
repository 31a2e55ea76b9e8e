"""The ``maskdist`` command group: a thin click layer over the Python API.

User mistakes raise :class:`maskdist.errors.MaskdistError`; they are printed as one line
and exit with status 2, without a traceback. The commands live beside this module, one
module per stage of the flow.
"""
from __future__ import annotations

import sys

import click

from maskdist.errors import MaskdistError


class Group(click.Group):
    """A click group that turns MaskdistError into one line on stderr and exit status 2, and a
    run stopped for preemption (state saved) into its own documented status."""

    def invoke(self, ctx):
        from maskdist.train.preemption import Preempted

        try:
            return super().invoke(ctx)
        except MaskdistError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except Preempted as stopped:
            click.echo(str(stopped), err=True)
            sys.exit(stopped.exit_code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="maskdist")
def main():
    """maskdist: train face-mask classifiers (18 classes) across many GPUs.

    Flow: synth or your competition folder -> shards build -> train per fold -> predict.
    """
