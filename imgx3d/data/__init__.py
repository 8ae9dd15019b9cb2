"""Data: reading and writing volumes, dataset catalogs, presets and transforms."""
