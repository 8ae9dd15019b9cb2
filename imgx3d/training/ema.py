"""The moving average of a method's weights (``train.ema``), as LDM's ``LitEma`` keeps it.

Hand-written rather than torch's ``AveragedModel``, for three reasons that each gave wrong or
slow results:

- ``AveragedModel(use_buffers=True)`` averages buffers too. A latent codec's fitted ``scale``
  buffer (set once from 0 to ~5) was averaged from 0, so at decay 0.9999 the averaged model
  decoded with a scale of ~0.05 for thousands of steps. Buffers are not averaged here: the
  averaged weights are used with the live buffers.
- A stage that freezes a network (the codec trained first, then frozen) would keep averaging its
  half-trained early weights for ~1/(1 − decay) steps. A parameter that does not train
  (``requires_grad`` False) is copied, not averaged, and each new training stage restarts the
  average's warm-up.
- ``AveragedModel`` keeps its update counter as a device tensor (a host sync per update on a
  GPU). The counter is a Python int here, and one fused ``torch._foreach_lerp_`` updates all
  averaged weights.

The decay warms up as LitEma's, ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates of a stage,
except that the first update of a stage (``n = 0``) copies the weights (LitEma's 0.1 there would
keep a tenth of the weights from before ``train.ema_start``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """An exponential moving average of ``method``'s parameters.

    Args:
        method: the module whose parameters are averaged (the order of ``parameters()`` is the key).
        decay: the target decay (e.g. 0.9999).
    """

    def __init__(self, method: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0  # since the current stage began
        self.stage = 0
        self.started = False
        with torch.no_grad():
            self.weights = [p.detach().clone() for p in method.parameters()]

    def current_decay(self) -> float:
        """The decay of the next update (LitEma's warm-up)."""
        return 0.0 if self.updates == 0 else min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, method: nn.Module, stage: int = 0) -> None:
        """One update after an optimisation step; ``stage``: the index of the training stage the step
        belonged to (a new stage restarts the warm-up)."""
        if stage != self.stage:
            self.stage, self.updates = stage, 0
        live = list(method.parameters())
        averaged = [a for a, p in zip(self.weights, live, strict=True) if p.requires_grad]
        trained = [p.detach() for p in live if p.requires_grad]
        if averaged:
            torch._foreach_lerp_(averaged, trained, 1.0 - self.current_decay())
        for a, p in zip(self.weights, live):
            if not p.requires_grad:
                a.copy_(p)
        self.updates += 1
        self.started = True

    @contextlib.contextmanager
    def applied_to(self, method: nn.Module) -> Iterator[None]:
        """Inside the block ``method`` holds the averaged weights (its live buffers stay); its own
        weights come back after it. Before the first update: the method unchanged."""
        if not self.started:
            yield
            return
        live = list(method.parameters())
        with torch.no_grad():
            saved = [p.detach().clone() for p in live]
            for p, a in zip(live, self.weights, strict=True):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(live, saved):
                    p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        """The average and its counters (in ``last.pt``: a resume continues the average exactly)."""
        return {"decay": self.decay, "updates": self.updates, "stage": self.stage, "started": self.started,
                "weights": list(self.weights)}

    def load_state_dict(self, state: dict[str, Any], method: nn.Module) -> None:
        """Restore :meth:`state_dict`, or the ``AveragedModel`` state of checkpoints written before
        this class (``module.<name>`` weights and ``n_averaged``)."""
        if "n_averaged" in state:
            names = [name for name, _ in method.named_parameters()]
            weights = [state[f"module.{name}"] for name in names]
            self.updates, self.stage = int(state["n_averaged"]), 0
            self.started = self.updates > 0
        else:
            weights = state["weights"]
            self.updates, self.stage, self.started = int(state["updates"]), int(state["stage"]), bool(state["started"])
        if len(weights) != len(self.weights):
            raise ValueError(f"the saved weight average holds {len(weights)} tensors, the method {len(self.weights)}")
        with torch.no_grad():
            for a, w in zip(self.weights, weights):
                a.copy_(w)


def averaged_state_dict(method: nn.Module, ema_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``method``'s state dict with its parameters replaced by a saved average's (``last.pt``'s ``ema``)."""
    average = WeightAverage(method, ema_state.get("decay", 0.0))
    average.load_state_dict(ema_state, method)
    state = dict(method.state_dict())
    for (name, _), weight in zip(method.named_parameters(), average.weights, strict=True):
        state[name] = weight
    return state
