"""imgx3d: 3D volumetric medical image segmentation with diffusion models.

The Python API, what the CLI does, callable from a notebook or a service::

    import nibabel as nib
    from imgx3d import Predictor, evaluate, plan, train

    planned = plan("path/to/MyDataset", budget="30m")  # .config() is the config; or load_config("configs/….yaml")
    result = train(planned, "path/to/MyDataset")                 # races the plan's rivals, if any; then scores
    predictor = Predictor.load(result.run_dir)
    labels = predictor.predict(nib.load("case.nii.gz"))         # a Nifti1Image on the input's grid
    rows, summary = evaluate("predictions/", "references/")

The names load on first use, so ``import imgx3d`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Predictor", "evaluate", "load_config", "plan", "train", "__version__"]

# public name → (module, attribute)
_EXPORTS = {
    "Predictor": ("imgx3d.inference.predictor", "Predictor"),
    "train": ("imgx3d.training.race", "train"),
    "plan": ("imgx3d.planning", "plan_dataset"),
    "evaluate": ("imgx3d.evaluation.metrics", "evaluate_folders"),
    "load_config": ("imgx3d.config", "load_config"),
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'imgx3d' has no attribute {name!r}")
    import importlib

    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(module), attribute)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
