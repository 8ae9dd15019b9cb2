"""Diffusion schedules (``schedule``) and reverse-step samplers (``sampler``), apart from networks.

May import: the top-level ``errors`` only.
"""
