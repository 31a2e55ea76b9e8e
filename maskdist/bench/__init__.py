"""``maskdist bench ...``: every speed claim as a ratio against a baseline measured in the
same run.

============ ============================================================================
module       measures
============ ============================================================================
``loader``   the shard stream vs a webdataset pipeline and a folder-of-JPEGs loader
``train``    maskdist's training step vs a bare PyTorch loop
``epoch``    the real training loop at several worker counts vs an in-memory ceiling
``predict``  the ensemble's predict vs a bare forward on the same decoded images
``onnx``     the ONNX ensemble under onnxruntime vs PyTorch (agreement, img/s); classify
``memory``   the RSS of a command's whole process tree over time
``options``  each recipe option vs the recipe: validation macro and part F1 over seeds
============ ============================================================================
"""
