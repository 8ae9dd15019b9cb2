"""imgx3d: 3D volumetric medical image segmentation with diffusion models."""

__version__ = "0.1.0"
