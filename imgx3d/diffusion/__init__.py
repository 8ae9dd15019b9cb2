"""Diffusion schedules (``schedule``) and reverse-step samplers (``sampler``), apart from networks."""
