"""Training: the method-blind loop (``trainer``), data parallelism under torchrun
(``distributed``), the checkpoint file format (``checkpoint``) and the end-to-end jobs behind
``imgx3d train`` and ``imgx3d demo`` (``workflow``: train, then score the test split).

May import: ``data``, ``methods``, ``inference`` (validation predicts with the one
``Predictor``), ``evaluation`` (scores) and the top-level ``config``, ``errors``, ``tracking``,
``resources``, ``interrupts``. Imported by ``synthesis`` (checkpoints) and ``inference``
(only ``training.checkpoint``: the file format training writes and everyone else reads).
"""
