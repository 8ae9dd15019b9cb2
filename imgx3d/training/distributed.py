"""Data-parallel training under ``torchrun``: process group, rank roles and the collectives the trainer needs.

``torchrun --nproc_per_node N -m imgx3d train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
:func:`setup` then joins the process group (NCCL on GPUs, gloo on CPU) and every other
entry point sees a one-process :class:`DistContext` that does nothing. Gradients are
averaged by torch's ``DistributedDataParallel`` (or, for methods with several optimisers,
by :meth:`DistContext.average_gradients`); the ranks share validation, rank 0 alone writes
checkpoints and talks to mlflow, and broadcasts its decisions (stop now, the run folder) so
that every rank takes the same number of steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from imgx3d.methods.base import Method
from imgx3d.progress import prefix_warnings_with_rank

# Ranks wait in a collective while rank 0 validates itself (codecs, generators), writes a checkpoint
# or scores the test split: the default 30-minute collective timeout is too short for large CTs.
COLLECTIVE_TIMEOUT = timedelta(hours=3)


def collective_device(backend: str, cuda_index: int | None = None) -> torch.device:
    """Where a collective's tensors must live: NCCL reduces on this rank's GPU, gloo on the CPU."""
    if backend == "nccl":
        return torch.device("cuda", cuda_index if cuda_index is not None else torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly one-process) training job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: validates, checkpoints, logs, prints."""
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree_to_stop(self, out_of_time: int, signum: int | None) -> tuple[int, int | None]:
        """Rank 0's (why to stop: 0 go on, any other code a reason of the caller's; pending stop
        signal) on every rank, as one small tensor broadcast on the backend's device (no
        pickling); in one process, the values themselves."""
        if not self.enabled:
            return out_of_time, signum
        flags = torch.tensor([int(out_of_time), signum or 0], device=collective_device(dist.get_backend()))
        dist.broadcast(flags, src=0)
        spent, signal_number = flags.tolist()
        return int(spent), signal_number or None

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def mean(self, scalars: dict[str, float]) -> dict[str, float]:
        """Average of per-rank scalars (the same keys on every rank), e.g. running losses."""
        if not self.enabled or not scalars:
            return scalars
        keys = sorted(scalars)
        values = torch.tensor([scalars[k] for k in keys], dtype=torch.float64,
                              device=collective_device(dist.get_backend()))
        dist.all_reduce(values)
        return {k: float(v) / self.world_size for k, v in zip(keys, values.cpu())}

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.enabled:
            dist.barrier()

    def wrap(self, step_fn: Callable[..., dict[str, torch.Tensor]], module: Method,
             device: torch.device, groups: int = 1) -> tuple[Callable[..., dict[str, torch.Tensor]], bool]:
        """``step_fn`` (a method's ``training_step``) made data-parallel.

        One parameter group: through DDP, whose backward averages the gradients while it runs.
        Several groups updated in one step (a GAN's generator and discriminator, DARL): DDP
        allows one backward per forward, so the ranks start from rank 0's weights and the
        trainer averages each group's gradients after its backward (:meth:`average_gradients`).

        Returns:
            The step function, and whether the trainer must average gradients itself.
        """
        if not self.enabled:
            return step_fn, False
        if groups > 1:
            self.broadcast_weights(module)
            return step_fn, True
        # A staged or sparse method (some weights idle in a step) says so in its TrainingPlan; for
        # the rest DDP skips the extra graph traversal.
        return DistributedDataParallel(_StepModule(module, step_fn),
                                       find_unused_parameters=module.plan.find_unused_parameters,
                                       device_ids=[device.index] if device.type == "cuda" else None), False

    def broadcast_weights(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a module)."""
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Average the gradients of ``params`` over the ranks, in one flat all-reduce (the same
        parameters have gradients on every rank: the ranks run the same code on their own batches)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.enabled or not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world_size
        for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)

    def check_same_weights(self, module: nn.Module) -> None:
        """Raise if the ranks' weights have drifted apart (they must stay bit-identical under DDP)."""
        if not self.enabled:
            return
        with torch.no_grad():
            local = [float(p.detach().double().sum()) for p in module.parameters()]
        ranks = self.gather(local)
        if any(r != ranks[0] for r in ranks[1:]):
            raise RuntimeError("distributed training: the ranks' weights differ; gradients were not averaged")


class _StepModule(nn.Module):
    """Presents a method's ``training_step`` as ``forward``, which is what DDP wraps."""

    def __init__(self, module: nn.Module, step_fn: Callable[..., dict[str, torch.Tensor]]):
        super().__init__()
        self.module, self.step_fn = module, step_fn

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        return self.step_fn(batch, step)


def setup(device_name: str = "auto") -> tuple[DistContext, torch.device | None]:
    """Join the torchrun process group when there is one.

    Returns the context and, under torchrun, the device this rank trains on (``cuda:LOCAL_RANK``
    on GPU machines; None leaves the choice to the config).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(), None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    prefix_warnings_with_rank()  # rank 0 alone prints progress; the others' warnings say whose they are
    if os.environ.get("OMP_NUM_THREADS") == "1":  # torchrun's default; augmentation runs on this thread pool
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return DistContext(rank, world_size, local_rank), device


def teardown(ctx: DistContext, finished: bool = True) -> None:
    """Leave the process group.

    Args:
        finished: every rank got through its work. The ranks then meet first, so that none
            shuts down its gloo/NCCL connections while rank 0 is still scoring the test split
            (a rank leaving early was seen to abort in the C++ runtime). After a failure the
            others are not waited for: torchrun stops them.
    """
    if not (ctx.enabled and dist.is_initialized()):
        return
    if finished:
        ctx.barrier()
    dist.destroy_process_group()
