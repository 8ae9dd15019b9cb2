"""Concurrent window batches on the CPU: the same outputs as one batch at a time, each worker under
the caller's thread-local modes, the caller's thread count back afterwards."""

from __future__ import annotations

import threading

import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from imgx3d.config import InferConfig
from imgx3d.inference.windows import ConcurrentBatches, make_window, streaming_argmax, window_streams


@pytest.fixture
def two_threads():
    """Two intra-op threads for the test (CI has 2 cores; a 1-core runner would run no concurrency)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(3, 1, 3, channels=[4, 8, 16], strides=[2, 2], num_res_units=1).eval()


def test_window_streams_by_device_and_threads(two_threads):
    assert window_streams(torch.device("cpu")) == 2
    assert window_streams(torch.device("cuda")) == 1
    torch.set_num_threads(1)
    assert window_streams(torch.device("cpu")) == 1


def test_batches_split_run_on_two_threads_in_order(two_threads):
    seen: list[tuple[int, int, int]] = []  # (thread, first value, intra-op threads) per call
    together = threading.Barrier(2, timeout=60)  # the first two chunks must run at once (a loaded machine may be slow)

    def fn(x):
        seen.append((threading.get_ident(), int(x[0, 0, 0, 0, 0]), torch.get_num_threads()))
        if int(x[0, 0, 0, 0, 0]) in (0, 3):
            together.wait()  # broken (and the test fails) if the chunks ran one after the other
        return x[:, :1] * 2 + x[:, 1:2]

    windows = torch.arange(7, dtype=torch.float32)[:, None, None, None, None].repeat(1, 2, 2, 2, 2)
    windows[:, 1] += 0.5
    with ConcurrentBatches(fn, 3, 2) as batches:
        assert batches.batch_size == 6
        out = batches(windows)
    assert torch.equal(out, windows[:, :1] * 2 + windows[:, 1:2])  # every window, in order
    assert sorted(first for _, first, _ in seen) == [0, 3, 6]  # chunks of 3, 3, 1
    first_two = {thread for thread, first, _ in seen if first in (0, 3)}
    assert len(first_two) == 2 and threading.get_ident() not in first_two  # two workers at once, not the caller
    assert all(threads == 1 for _, _, threads in seen)  # each on half of the 2 threads
    assert torch.get_num_threads() == 2


def test_one_chunk_runs_in_the_caller_with_all_threads(two_threads):
    seen = []

    def fn(x):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return x

    with ConcurrentBatches(fn, 4, 2) as batches:
        batches(torch.zeros(3, 1, 2, 2, 2))
    assert seen == [(threading.get_ident(), 2)]


def test_workers_run_under_the_callers_modes(two_threads):
    modes = []

    def fn(x):
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"),
                      torch.get_autocast_dtype("cpu")))
        return x

    windows = torch.zeros(4, 1, 2, 2, 2)
    with ConcurrentBatches(fn, 1, 2) as batches:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            batches(windows)
        inferred = modes[:]
        modes.clear()
        with torch.enable_grad():
            batches(windows)
    assert inferred == [(True, False, True, torch.bfloat16)] * 4
    assert [m[:3] for m in modes] == [(False, True, False)] * 4


def test_worker_errors_reach_the_caller_and_threads_are_restored(two_threads):
    def fn(x):
        if x[0].sum() > 0:
            raise ValueError("bad window")
        return x

    windows = torch.zeros(2, 1, 2, 2, 2)
    windows[1] = 1
    with pytest.raises(ValueError, match="bad window"):
        with ConcurrentBatches(fn, 1, 2) as batches:
            batches(windows)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("shape, batch", [((30, 26, 20), 2), ((16, 16, 16), 4)])  # many windows; one window
def test_sliding_window_equals_monai(two_threads, shape, batch):
    net = _net()

    def fn(x):
        return torch.softmax(net(x), 1)

    x = torch.randn(1, 1, *shape)
    window = make_window(InferConfig(overlap=0.5, sw_batch_size=batch), [16, 16, 16])
    with torch.inference_mode():
        reference = sliding_window_inference(x, [16, 16, 16], batch, fn, overlap=0.5, mode="gaussian")
        concurrent = window(fn, x)
    torch.testing.assert_close(concurrent, reference, rtol=0, atol=1e-6)


def test_streaming_with_concurrent_windows_equals_one_at_a_time(two_threads):
    net = _net()

    def fn(x):
        return torch.softmax(net(x), 1)

    x = torch.randn(1, 1, 40, 30, 36)
    with torch.inference_mode():
        alone = streaming_argmax(fn, x, [16, 16, 16], 1, 0.5)
        with ConcurrentBatches(fn, 1, 2) as batches:
            concurrent = streaming_argmax(batches, x, [16, 16, 16], batches.batch_size, 0.5)
    assert torch.equal(concurrent, alone)
