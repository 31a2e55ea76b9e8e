"""The ``maskdist`` command line (entry point ``maskdist.cli:main``).

=========== ==================================================================
module      commands
=========== ==================================================================
``base``    the group: one-line errors (exit 2), the preemption exit status
``usage``   the commands' argument checks, made before torch loads
``data``    ``synth``, ``layout``, ``shards build|inspect|verify``
``train``   ``train``, ``kfold``, ``demo``, ``weights fetch|list``
``infer``   ``predict``, ``score``, ``oof``, ``compare``, ``pseudo-label``, ``classify``, ``export``
``bench``   ``bench loader|train|epoch|predict|onnx|memory|options|compare|cli``
``report``  ``report``
=========== ==================================================================
"""
from maskdist.cli import bench, data, infer, report, train  # noqa: F401  (each module adds its commands to main)
from maskdist.cli.base import main

__all__ = ["main"]
