"""Evaluation: per-case, per-class metrics of label files (``metrics``), run records and comparison
tables (``records``), comparisons of mlflow runs with paired tests (``compare``) and their plots
and contour overlays (``plots``), and how good a prediction's uncertainty is (``uncertainty``).

May import: ``data`` and the top-level ``config``, ``errors``, ``files``, ``tracking``. Nothing from training,
inference or methods: it scores files and records, whoever made them.
"""
