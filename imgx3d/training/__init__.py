"""Training: the method-blind loop (``trainer``), data parallelism under torchrun (``distributed``)
and the end-to-end jobs behind ``imgx3d train`` and ``imgx3d demo`` (``workflow``: train, then
score the test split). Checkpoints are written through :mod:`imgx3d.checkpoint`.

May import: ``data``, ``methods``, ``inference`` (validation predicts with the one ``Predictor``),
``evaluation`` (scores), ``planning`` (the race and ``study`` plan their candidates) and the top-level
``config``, ``checkpoint``, ``errors``, ``files``, ``interrupts``, ``progress``, ``registry``,
``resources``, ``tracking``. Imported by the CLI only (and the benchmark scripts).
"""
