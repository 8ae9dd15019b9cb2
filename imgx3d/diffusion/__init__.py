"""Diffusion schedules (``schedule``) and reverse-step samplers (``sampler``), apart from networks.

May import: the top-level ``errors`` and ``config`` (a method's ``ScheduleConfig``) only.
"""
