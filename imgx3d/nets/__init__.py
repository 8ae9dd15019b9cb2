"""Networks: thin factories over MONAI and diffusers networks (``segmentation``, ``diffusion_unet``,
``spade_generator``, ``dense_hint``), the SD-format latent codec (``latent_codec``) and the float32
boundary every method puts around its networks (``boundary``).

May import: the top-level ``errors`` and ``checkpoint`` (a codec taken from an imgx3d run) only.
"""
