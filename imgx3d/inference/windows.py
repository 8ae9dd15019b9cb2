"""The windows a method runs through: 3D sliding, 2D slice, and memory-bounded streaming.

A :class:`~imgx3d.methods.base.Segmenter` predicts through a window the predictor hands it
(``Window``: ``window(fn, x)`` runs ``fn`` over windows of ``x`` and blends the outputs): a
U-Net calls it once, a diffusion method once per reverse step.

- :func:`make_window`: MONAI's sliding window with gaussian blending (3D methods).
- :func:`predict_by_slices`: the slice window of 2D methods (each batch of slices of the slice
  view is one window; MONAI keeps its ``SliceInferer`` with the other inferers too).
- :func:`streaming_argmax`: the label map of a single-pass method (a
  :class:`~imgx3d.methods.base.WindowSegmenter`) without whole-volume probability maps.
- :class:`ConcurrentBatches`: on the CPU, both sliding windows run two window batches at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference

from imgx3d.config import SliceConfig
from imgx3d.data.geometry import slices_to_volume, to_slice_range, volume_to_slices
from imgx3d.methods.base import Segmenter, Window


def make_window(settings: Any, patch_size: Sequence[int], sw_device: torch.device | None = None,
                output_device: torch.device | None = None) -> Window:
    """The 3D sliding window: MONAI gaussian blending with ``settings``' roi, overlap, batch and blend.

    Args:
        settings: an :class:`~imgx3d.inference.predictor.InferSettings` (or ``infer:`` config).
        patch_size: the window when ``settings.roi_size`` is empty (the training patch).
        sw_device, output_device: where each window runs and where the blended whole-volume
            output is held (MONAI's ``sw_device`` / ``device``); None: the input's device.
    """
    roi = list(settings.roi_size or patch_size)

    def window(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        streams = window_streams(sw_device or x.device)
        with ConcurrentBatches(fn, settings.sw_batch_size, streams) as batches:
            return sliding_window_inference(x, roi, batches.batch_size, batches, overlap=settings.overlap,
                                            mode=settings.blend, sw_device=sw_device, device=output_device)

    return window


def window_streams(device: torch.device) -> int:
    """Window batches a sliding window runs at once on ``device``: 2 on a CPU with 2 or more intra-op
    threads (see :class:`ConcurrentBatches`), else 1 (CUDA queues its kernels on one stream anyway)."""
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


class ConcurrentBatches:
    """A window function that runs ``streams`` window batches at once, each on its own thread with
    ``1 / streams`` of the intra-op threads, for the duration of a ``with`` block.

    Why: a U-Net's convolutions on 64³ windows do not scale across cores. On a 2-core AMD EPYC
    (AVX2, fp32) a batch of 4 windows took 100 ms per window on 1 thread and 60 ms on 2 (1.67x),
    while two threads of 1 intra-op thread each, one batch each, took 51 ms per window; a
    256 x 256 x 128 MONAI sliding window ran 1.13x faster so, with outputs equal to the bit there
    (each window is the same computation; ``benchmarks/inference.py`` times it). The blending stays
    the caller's: MONAI's loop (or :func:`streaming_argmax`) is given ``batch_size`` =
    ``chunk x streams`` windows per call, and gets their outputs back in order.

    A call of one ``chunk`` or fewer windows (a volume of one window, the last batch) runs in the
    calling thread with all its threads. PyTorch keeps grad mode, inference mode and autocast per
    thread, so each worker runs under the caller's.

    Args:
        fn: windows ``(B, C, *roi)`` → outputs ``(B, ...)``.
        chunk: windows per ``fn`` call (``infer.sw_batch_size``).
        streams: batches at once (1: ``fn`` itself, no threads).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], chunk: int, streams: int):
        self.fn, self.chunk, self.streams = fn, max(1, chunk), max(1, streams)
        self.batch_size = self.chunk * self.streams
        self._pool: ThreadPoolExecutor | None = None
        self._threads = 1

    def __enter__(self) -> "ConcurrentBatches":
        if self.streams > 1:
            self._threads = torch.get_num_threads()
            self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="imgx3d-window")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # running batches end (a batch at most each)
            self._pool = None
            torch.set_num_threads(self._threads)

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        chunks = windows.split(self.chunk)
        if self._pool is None or len(chunks) == 1:
            return self.fn(windows)
        per_stream = max(1, self._threads // self.streams)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        cast, cast_dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

        def run(part: torch.Tensor) -> torch.Tensor:
            torch.set_num_threads(per_stream)  # this thread's intra-op threads
            with (torch.inference_mode(inference), torch.set_grad_enabled(grad),
                  torch.autocast("cpu", dtype=cast_dtype, enabled=cast)):
                return self.fn(part)

        try:
            return torch.cat(list(self._pool.map(run, chunks)))
        finally:
            # set_num_threads also sets the count that threads started later begin with: back to the caller's
            torch.set_num_threads(self._threads)


def whole_slice(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The window of a 2D method: each batch of slices is one window (the slice view already resized it)."""
    return fn(x)


def predict_by_slices(method: Segmenter, image: torch.Tensor, cfg: SliceConfig) -> torch.Tensor:
    """Class probabilities ``(1, K, X, Y, Z)`` of a 2D method for one model-space volume ``(1, C, X, Y, Z)``:
    through the slice view of :mod:`imgx3d.data.geometry`, ``cfg.predict_batch`` slices at a time.

    Each batch of slices runs on the method's device and comes back to the volume's (the host,
    on CUDA: volume-sized arrays live there), as MONAI's ``sw_device`` / ``device`` do for windows.
    """
    volume = to_slice_range(image[0], cfg.percentiles)
    slices = volume_to_slices(volume, cfg.axis, cfg.size)
    weight = next(method.parameters(), None)
    device = weight.device if weight is not None else image.device
    outs = [method.predict(slices[i:i + cfg.predict_batch].to(device), whole_slice).to(image.device)
            for i in range(0, slices.shape[0], cfg.predict_batch)]
    return slices_to_volume(torch.cat(outs), cfg.axis, volume.shape[1:])[None]


# The memory-bounded sliding window: the label map of a large volume without its full probability maps.
#
# MONAI's ``sliding_window_inference`` returns (and so holds) float32 probabilities for every
# class and voxel: 4.4 GB for 14 classes on a 512 x 512 x 300 CT, plus its weight map. For a
# single-pass model whose only output is a label map this is unnecessary, so we keep the same
# windows (MONAI's ``dense_patch_slices`` with its scan interval and padding), the same gaussian
# importance map (``compute_importance_map``), but run them in order of their slab along the
# last axis and hold accumulators only for the slab still being covered. As soon as no later
# window reaches a slice, its blended probabilities are final: it is arg-maxed to class indices
# and its accumulators are dropped. Peak memory is that of a ``roi`` deep slab instead of the
# whole volume. MONAI divides the weighted sums by the per-voxel total of the weights; that total
# is the same for every class, so the arg-max of the sums is taken directly (no weight map, no
# division). Results equal MONAI's up to the order of floating-point operations (voxels whose two
# best classes tie within rounding; ``benchmarks/sliding_window.py`` reports the fraction).
FINALIZE_ROWS = 16  # rows (first axis) of the slab finalised per step: bounds the temporaries


def _scan_interval(size: Sequence[int], roi: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI's scan interval (its ``_get_scan_interval`` is private, so restated here):
    ``int(roi * (1 - overlap))`` (at least 1), or ``roi`` where the window spans the axis."""
    return tuple(r if r == s else max(int(r * (1 - overlap)), 1) for s, r in zip(size, roi))


def streaming_argmax(fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, roi: Sequence[int],
                     sw_batch_size: int = 1, overlap: float = 0.25, mode: str = "gaussian",
                     accumulate: torch.dtype = torch.float32) -> torch.Tensor:
    """Class indices ``(X, Y, Z)`` (uint8 up to 256 classes, else int64) of one volume ``(1, C, X, Y, Z)``.

    Args:
        fn: windows ``(B, C, *roi)`` → class probabilities ``(B, K, *roi)``.
        roi, sw_batch_size, overlap, mode: as for MONAI ``sliding_window_inference``.
        accumulate: dtype of the slab accumulators; ``torch.float16`` halves them, and only
            near-ties between the two most probable classes can then flip.
    """
    size, roi = tuple(int(s) for s in image.shape[2:]), tuple(int(r) for r in roi)
    pad = [max(r - s, 0) for r, s in zip(roi, size)]
    if any(pad):  # MONAI pads a volume smaller than the window symmetrically with zeros
        image = F.pad(image, [p for d in reversed(pad) for p in (d // 2, d - d // 2)])
    padded = tuple(int(s) for s in image.shape[2:])
    windows = dense_patch_slices(padded, roi, _scan_interval(padded, roi, overlap))
    weight = compute_importance_map(roi, mode=mode, sigma_scale=0.125, device=image.device, dtype=torch.float32)
    by_slab = [list(g) for _, g in itertools.groupby(sorted(windows, key=lambda w: w[2].start), lambda w: w[2].start)]
    labels = torch.empty(padded, dtype=torch.uint8, device=image.device)
    acc = None  # one window deep: slice j of the buffer is volume slice low + j
    low = 0
    for k, group in enumerate(by_slab):
        for b in range(0, len(group), sw_batch_size):
            batch = group[b:b + sw_batch_size]
            probs = fn(torch.cat([image[(slice(None), slice(None), *w)] for w in batch])).float()
            if acc is None:
                if probs.shape[1] > 256:
                    labels = labels.long()
                acc = probs.new_zeros((probs.shape[1], *padded[:2], roi[2]), dtype=accumulate)
            for w, p in zip(batch, probs):
                acc[(slice(None), w[0], w[1], slice(w[2].start - low, w[2].stop - low))].addcmul_(p, weight)
        final = (by_slab[k + 1][0][2].start if k + 1 < len(by_slab) else padded[2]) - low  # no later window reaches
        rest = roi[2] - final
        # A block of rows at a time (small temporaries), each visited once: arg-max its final slices, shift the
        # rest to the front, zero the freed end. The slab's last axis is the innermost, so a block is a run of
        # whole rows in memory; going slice by slice instead re-reads the whole slab for every slice.
        for x in range(0, padded[0], FINALIZE_ROWS):
            block = acc[:, x:x + FINALIZE_ROWS]
            labels[x:x + FINALIZE_ROWS, :, low:low + final] = block[..., :final].max(0).indices.to(labels.dtype)
            if rest:
                block[..., :rest] = block[..., final:].clone()
            block[..., rest:] = 0
        low += final
    return labels[tuple(slice(d // 2, d // 2 + s) for d, s in zip(pad, size))]
