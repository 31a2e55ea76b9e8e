"""Using trained folds: the ensemble over eval shards or photos and the submission
(``predict``), pseudo-labels for outside images (``pseudo``), and the scores of a
submission or of the out-of-fold predictions (``scoring``).
"""
