"""What the machine offers: free host memory, the precision its GPU computes fast, sizes in words.

Read by the volume reader (refuse a file that cannot fit before allocating it) and by the
predictor (estimate a prediction's memory before running it). Linux reports free host
memory in ``/proc/meminfo``; a container's own limit (cgroup v2 ``memory.max``) can be
lower, and then it is the one that counts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from imgx3d.errors import ConfigError

CGROUP = Path("/sys/fs/cgroup")


def _cgroup_free() -> int | None:
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        used = int((CGROUP / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_host_bytes() -> int | None:
    """Host memory a new allocation can take without swapping (None where the OS does not say)."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = None
    cgroup = _cgroup_free()
    if cgroup is not None:
        free = cgroup if free is None else min(free, cgroup)
    return free


def gib(n_bytes: float) -> str:
    """``1.5 GiB``: a size as a user reads it."""
    return f"{n_bytes / 2**30:.2f} GiB"


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX: Intel Cooper Lake, Sapphire Rapids and
    later, AMD Zen 4 and later). Elsewhere oneDNN would emulate bf16, slower than fp32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence asked for by name
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def choose_precision(setting: str, device: torch.device, capability: tuple[int, int] | None = None,
                     cpu_bf16: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` / ``infer.precision`` on ``device`` (None: fp32).

    ``auto``: bf16 where the GPU has bf16 tensor cores (compute capability 8.0, Ampere, and up),
    fp16 (with a gradient scaler in training) below that: ``torch.cuda.is_bf16_supported()``
    also answers yes on V100 / T4 / RTX 20xx, where bf16 is emulated and cuDNN has no bf16
    convolutions. On the CPU: bf16 where it has bf16 instructions (:func:`cpu_computes_bf16`;
    oneDNN's bf16 convolutions, measured 1.7x a training step and 2.3x a window pass of the
    hippocampus U-Net on one thread of this project's AMX CPU, ``benchmarks/training_loop.py``,
    ``benchmarks/inference.py``), fp32 elsewhere.

    Args:
        capability: the CUDA compute capability (default: asked of ``device``).
        cpu_bf16: whether the CPU computes bf16 natively (default: asked of this CPU).
    """
    if setting != "auto":
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]
    if device.type == "cpu":
        return torch.bfloat16 if (cpu_computes_bf16() if cpu_bf16 is None else cpu_bf16) else None
    if device.type != "cuda":
        return None  # not measured elsewhere (Apple's MPS, ...)
    major, minor = capability or torch.cuda.get_device_capability(device)
    return torch.bfloat16 if (major, minor) >= (8, 0) else torch.float16


def autocast(device: torch.device, precision: torch.dtype | None) -> torch.autocast:
    """Autocast to ``precision`` on ``device``'s type; off (fp32) for None, a :func:`choose_precision` answer."""
    return torch.autocast(device.type, dtype=precision or torch.float32, enabled=precision is not None)


def device_tags(device: torch.device, precision: torch.dtype | None) -> dict[str, str]:
    """mlflow tags that say where a run computed, so that comparisons never mix CPU and GPU
    timings unawares: device, GPU name, torch and CUDA versions, precision."""
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "torch_version": torch.__version__, "cuda_version": torch.version.cuda or "none",
            "precision": precision_name(precision)}


def precision_name(precision: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16``: a :func:`choose_precision` answer as the settings spell it."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[precision]


def use_fast_cuda_kernels(device: torch.device) -> None:
    """On CUDA: let cuDNN pick the fastest convolution algorithm for the fixed patch and window
    shapes (``cudnn.benchmark``), and fp32 matrix products and convolutions use TF32 tensor cores
    (Ampere and up; a 10-bit mantissa for the products, fp32 accumulation), as PyTorch's own
    mixed-precision recipes do. Nothing changes on the CPU."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


class OneDNNConv3d(torch.nn.Conv3d):
    """``nn.Conv3d`` whose gradient-free fp32 CPU passes always run oneDNN (``torch.mkldnn_convolution``).

    PyTorch's backend choice (ATen's ``ConvParams::use_mkldnn``) sends an fp32 CPU convolution of
    batch 1 with a 3-wide kernel to its im2col kernel (``slow_conv3d``) unless N·C·D·H exceeds
    20 480 ("for some case, native is faster", a threshold tuned on 2D convolutions). In 3D that
    is every window of a U-Net's deeper levels: on a 2-core AMD EPYC (AVX2) the im2col kernel took
    2-6x oneDNN's time for those layers, and a batch-1 hippocampus U-Net window pass ran 1.9-2.7x faster
    with every convolution on oneDNN (``benchmarks/imgx_inference.py``). The values are the
    same convolution up to fp32 rounding. Training (autograd), autocast, other dtypes and devices
    take PyTorch's own path, as do string paddings and non-zero padding modes.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (input.device.type == "cpu" and input.dtype == torch.float32 and weight.dtype == torch.float32
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")
                and not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))):
            return torch.mkldnn_convolution(input, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


GROUP_NORM_MIN_VOXELS = 1024  # see ChannelsLastInstanceNorm3d


class ChannelsLastInstanceNorm3d(torch.nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` that keeps a channels-last fp32 input channels-last on the CPU, by computing
    it as a group norm of one group per channel.

    PyTorch's instance norm reshapes a channels-last input into a (1, N·C, ...) batch norm: on a
    2-core AVX-512 EPYC that took 5-17x the time of its group norm on fp32 maps of 16-48 channels
    (e.g. 1.3 ms against 0.08 ms for 24 × 20 × 28 × 20), and it returns the default layout, which the
    next channels-last convolution converts back. A group norm with C groups normalises over the same
    voxels per sample and channel, with the same biased variance, eps and affine parameters (the
    same values up to rounding), and its CPU kernel keeps the channels-last order. Measured there
    (``benchmarks/memory_format.py``, idle, medians of 7): a fp32 hippocampus training step 1.08x and
    4 × 64³ window passes 1.15-1.35x faster than with channels-last weights alone. The group-norm kernel is slower
    than the instance norm on maps of few voxels (under ``GROUP_NORM_MIN_VOXELS`` per channel, e.g.
    192 × 5 × 7 × 5) and in bf16 (a bf16 hippocampus training step took 0.82 s against 0.50 s), so
    those, running statistics (``track_running_stats``), other devices and non-3D inputs take the
    instance norm's own path. So does an input without gradient under affine parameters with one:
    PyTorch's CPU group-norm backward (2.13) crashes the process on a channels-last 5D input when only
    the affine parameters need a gradient.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        only_affine_grads = (torch.is_grad_enabled() and not input.requires_grad
                             and any(p.requires_grad for p in self.parameters()))
        if (self.track_running_stats or input.dim() != 5 or input.device.type != "cpu" or only_affine_grads
                or input.dtype != torch.float32 or input[0, 0].numel() < GROUP_NORM_MIN_VOXELS):
            return super().forward(input)
        return torch.nn.functional.group_norm(input, input.shape[1], self.weight, self.bias, self.eps)


def use_onednn_convolutions(module: torch.nn.Module) -> None:
    """Every ``nn.Conv3d`` of ``module`` becomes a :class:`OneDNNConv3d`, in place (a class swap: each
    keeps its parameters, state dict keys, hooks and place); nothing where oneDNN is not built in."""
    if not torch.backends.mkldnn.is_available():
        return
    _swap_class(module, torch.nn.Conv3d, OneDNNConv3d)


def _swap_class(module: torch.nn.Module, stock: type, replacement: type) -> None:
    """Every submodule of exactly class ``stock`` becomes a ``replacement`` (a subclass), in place:
    each keeps its parameters, state dict keys, hooks and place."""
    for sub in module.modules():
        if type(sub) is stock:
            sub.__class__ = replacement


def channels_last_pays_in_inference() -> bool:
    """Whether channels-last weights (:func:`use_fast_cpu_layout`) speed up CPU window passes on this CPU:
    measured 1.02-1.26x for 4 x 64³ windows of two U-Nets on an AVX-512 AMD EPYC, ~10 % on an Intel
    CPU with AMX, and 0.87-0.89x (slower) on an AVX2-only AMD EPYC (``benchmarks/memory_format.py``;
    there a training step still gained 1.06-1.26x). Yes where PyTorch's kernels run AVX-512."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def use_fast_cpu_kernels(module: torch.nn.Module, device: torch.device, training: bool) -> None:
    """On the CPU, in place: :func:`use_onednn_convolutions`, then :func:`use_fast_cpu_layout` for
    training, and for inference where :func:`channels_last_pays_in_inference`. Nothing changes on
    other devices."""
    if device.type != "cpu":
        return
    use_onednn_convolutions(module)
    if training or channels_last_pays_in_inference():
        use_fast_cpu_layout(module, device)


def use_fast_cpu_layout(module: torch.nn.Module, device: torch.device) -> None:
    """On the CPU: every 3D convolution weight of ``module`` in channels-last order (``channels_last_3d``),
    in place. oneDNN then runs the convolutions channels-last, measured ~10 % faster for a training
    step and a window pass of the hippocampus U-Net on an Intel CPU with AMX, and on a quiet 2-core AMD
    EPYC with AVX-512 1.03x for a training step and 1.02-1.26x for 4 x 64³ window passes of two U-Nets
    in fp32 and bf16 (``benchmarks/memory_format.py``; an AVX2-only EPYC: see
    :func:`channels_last_pays_in_inference`); the values do not change, only their order in memory
    (a tuner that timed both layouts on a prediction's first windows and kept the faster measured
    slower end to end there, and was dropped). On AVX-512 CPUs the instance norms become
    :class:`ChannelsLastInstanceNorm3d`, so fp32 activations stay channels-last between the
    convolutions. 2D weights and CUDA stay as they are (not measured there)."""
    if device.type != "cpu":
        return
    for param in module.parameters():
        if param.dim() == 5:
            param.data = param.data.contiguous(memory_format=torch.channels_last_3d)
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return  # the norm swap's gain was measured on AVX-512 only
    _swap_class(module, torch.nn.InstanceNorm3d, ChannelsLastInstanceNorm3d)


def resolve_device(name: str = "auto", what: str = "--device") -> torch.device:
    """``auto`` → CUDA when available, else CPU; a device this machine lacks is a one-line error
    naming ``what`` (the flag or config key that asked for it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{what} {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} {name}: no CUDA device is available here (this torch build: "
                          f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU only'}); use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{what} {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                          "use one of cuda:0 … or auto")
    return device
