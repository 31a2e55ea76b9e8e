"""Samples before they are shards: the 18-class code, the competition layout, person folds,
robust image decoding, the synthetic stand-in and the transforms.

=============== =====================================================================
module          one job
=============== =====================================================================
``labels``      the 18-class code and its parts; age cuts
``layout``      read a competition-style folder (and extra CSVs) into one table; fixes
``folds``       person-level stratified k-fold
``images``      decode any input image to RGB, resize, re-encode (the shard builder's)
``transforms``  decode and albumentations presets, uint8 until the device
``faces``       drawn faces of the synthetic data
``synth``       the synthetic dataset in the competition layout
=============== =====================================================================
"""
