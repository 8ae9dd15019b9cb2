"""Data: reading and writing volumes (``io``), dataset catalogs and splits (``catalog``),
intensity presets (``presets``), the one native ⇄ model-space map (``geometry``), label values
(``labels``), augmentation and patch / slice sampling (``transforms``, ``slices``) and the
procedural demo and vessel data (``demo``, ``vessels``).

May import: the top-level ``config``, ``errors``, ``files`` and ``resources`` (the memory a volume
needs to read) only; nothing from the stages above it.
"""
