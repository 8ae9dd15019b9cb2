"""Synthesis: ``imgx3d synth`` writes a generator run's image/mask pairs as a dataset (``synth``)
and measures them against real slices (``quality``: Fréchet distance, KID).

May import: ``data``, ``methods``, ``training.checkpoint``, ``evaluation`` and the top-level
modules. Nothing imports it but the CLI.
"""
