"""``maskdist report``: one self-contained page of one or more experiments (plan, fold curves,
out-of-fold scores, calibration, tuned decisions, label audit)."""
