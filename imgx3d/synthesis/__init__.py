"""Synthesis: ``imgx3d synth`` writes a generator run's image/mask pairs as a dataset (``synth``)
and measures them against real slices (``quality``: Fréchet distance, KID).

May import: ``data``, ``methods``, ``evaluation`` and the top-level ``checkpoint`` (a generator run
is read from its checkpoint), ``config``, ``errors``, ``files``, ``interrupts``, ``progress``, ``resources``. Nothing imports it but the CLI and benchmarks.
"""
