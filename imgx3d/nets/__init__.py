"""Thin factories over MONAI networks."""
