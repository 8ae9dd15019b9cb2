"""Segmentation methods behind one interface (see :mod:`imgx3d.methods.base`)."""
