"""The network boundary of mixed precision: what leaves a network is float32.

Under ``torch.autocast`` a network computes in bf16 / fp16, and so do its outputs. Arithmetic a
method does on them afterwards (``logit``, ``clamp(1e-4, 1 - 1e-4)``, ``x0_from_eps``, softmax
thresholds, latents and the noise drawn like them) would run in that dtype too, where
``1 - 1e-4`` rounds to 1 in bf16 and a confident probability becomes ``logit = inf``. So every
network a method calls is wrapped once, where it is built, by :func:`float32_outputs`; the
methods then never cast a network output themselves.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def to_float32(output: Any) -> Any:
    """``output`` with every floating tensor in it as float32 (a tensor, a tuple or list, a dict,
    or a diffusers ``BaseOutput``); integer tensors and other values unchanged."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() and output.dtype != torch.float64 else output
    if isinstance(output, dict):  # dicts and diffusers' BaseOutput (an OrderedDict dataclass)
        return type(output)(**{key: to_float32(value) for key, value in output.items()})
    if isinstance(output, (tuple, list)):
        return type(output)(to_float32(value) for value in output)
    return output


def _cast_output(_module: nn.Module, _inputs: Any, output: Any) -> Any:
    return to_float32(output)


def float32_outputs(net: ModuleT) -> ModuleT:
    """Make ``net``'s forward return float32 under any autocast (a forward hook: the weights, their
    names in ``state_dict`` and ``net`` itself are unchanged; copies of ``net`` keep the hook)."""
    net.register_forward_hook(_cast_output)
    return net
