"""Inference: one ``Predictor`` from a checkpoint, a run folder or an mlflow run id to native-grid
label maps (``predictor``); the windows it runs a method through, 3D sliding, 2D slice and the
memory-bounded streaming window (``windows``); batch prediction over files and folders with
locks, read-ahead and atomic writes (``folder``).

May import: ``data``, ``methods``, ``evaluation.plots`` (contour overlays of predictions),
``evaluation.metrics`` (the learned postprocessing scores candidates), ``evaluation.uncertainty`` (the
per-case score of the uncertainty maps) and the top-level ``config``,
``checkpoint``, ``errors``, ``files``, ``tracking``, ``resources``, ``interrupts``, ``progress``.
Never the trainer: training imports inference, not the other way round.
"""
