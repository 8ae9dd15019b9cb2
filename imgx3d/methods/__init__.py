"""Methods: each one file (``unet``, ``imgx``, ``sdseg``, ``pig``, ``siamese``, ``darl``, ``vae``)
behind the roles of :mod:`imgx3d.methods.base` (``Method`` for training; ``Segmenter``,
``Generator``, ``Codec`` for what a trained run can do) and its own complete config dataclass.

May import: ``data``, ``nets``, ``diffusion`` and the top-level ``config``, ``checkpoint``, ``errors`` and
``registry`` (where each method registers by name).
Never a workflow stage (training, inference, evaluation, synthesis).
"""
