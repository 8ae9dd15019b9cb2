"""Planning: a dataset's fingerprint (``fingerprint``) and the documented rules that turn it into a
complete config (``planner``), as nnU-Net's experiment planner does, fitted to a compute budget.

May import: ``data``, ``methods`` (their config dataclasses), ``nets`` and the top-level modules.
Imported by the CLI and ``training.workflow`` (``train`` without ``--config`` plans first).
"""
