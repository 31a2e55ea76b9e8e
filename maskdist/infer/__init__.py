"""Using trained folds: which fold runs vote (``members``), the ensemble of possibly
different models (``ensemble``), the submission (``predict``), photos of any layout
(``classify``), fold models in timm's hub layout or one ONNX graph (``export``), pseudo-labels for outside
images (``pseudo``), scores (``scoring``), the out-of-fold predictions (``oof``) and the
decisions tuned on them (``decisions``), and the label audit (``audit``, ``contact_sheet``).
"""
