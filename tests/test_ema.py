"""The weight average (train.ema): LitEma's warm-up, buffers live, frozen weights copied, stages restart it."""

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imgx3d.config import load_config
from imgx3d.training.ema import WeightAverage, averaged_state_dict
from imgx3d.training.workflow import train_run
from tests.test_sdseg import TINY_SDSEG


class Coded(nn.Module):
    """A trained weight, a frozen weight and a fitted scale buffer (a latent codec's)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.frozen = nn.Parameter(torch.tensor([3.0]))
        self.register_buffer("scale", torch.tensor(0.0))


def test_average_follows_litemas_warm_up_and_then_the_decay():
    module = Coded()
    average = WeightAverage(module, decay=0.3)
    values = [torch.tensor([2.0, 1.0]), torch.tensor([-1.0, 4.0]), torch.tensor([0.5, 0.5]), torch.tensor([3.0, -3.0])]
    expected = None
    for n, value in enumerate(values):
        module.weight.data.copy_(value)
        average.update(module)
        # the first update copies; then min(decay, (1 + n) / (10 + n)): 2/11, 3/12 = 0.25, then 0.3 (capped)
        d = 0.0 if n == 0 else min(0.3, (1 + n) / (10 + n))
        expected = value.clone() if expected is None else d * expected + (1 - d) * value
    assert average.current_decay() == pytest.approx(0.3)
    torch.testing.assert_close(average.weights[0], expected)
    with average.applied_to(module):
        torch.testing.assert_close(module.weight.data, expected)
    torch.testing.assert_close(module.weight.data, values[-1])  # the training weights come back


def test_buffers_stay_live_and_frozen_weights_are_copied_not_averaged():
    """The codec's fitted scale (0 → 5) and its frozen weights: torch's AveragedModel(use_buffers=True)
    decodes with an averaged scale near 0; the average here uses the live scale and the live frozen weights."""
    module = Coded()
    module.frozen.requires_grad_(False)
    average = WeightAverage(module, decay=0.9999)
    torch_average = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(0.9999), use_buffers=True)
    for step in range(6):
        if step == 1:
            module.scale.fill_(5.0)
            module.frozen.data.fill_(-7.0)  # the codec phase ended with these weights
        module.weight.data.add_(0.1)
        average.update(module)
        torch_average.update_parameters(module)
    assert float(torch_average.module.scale) < 0.1  # the defect this class replaces
    with average.applied_to(module):
        assert float(module.scale) == 5.0
        assert float(module.frozen) == -7.0
        assert not torch.equal(module.weight.data, torch.tensor([1.0, -2.0]) + 5.0)  # still an average


def test_a_new_stage_restarts_the_average_from_the_weights():
    module = Coded()
    average = WeightAverage(module, decay=0.99)
    for _ in range(30):
        module.weight.data.add_(1.0)
        average.update(module, stage=0)
    assert not torch.equal(average.weights[0], module.weight.data)
    module.weight.data.fill_(-3.0)  # re-initialised at the stage boundary (SDSeg's tau from the codec)
    average.update(module, stage=1)
    torch.testing.assert_close(average.weights[0], torch.tensor([-3.0, -3.0]))
    assert average.updates == 1 and average.stage == 1


def test_state_round_trips_and_reads_torchs_averaged_model_state():
    module = Coded()
    average = WeightAverage(module, decay=0.5)
    for _ in range(3):
        module.weight.data.mul_(1.5)
        average.update(module)
    restored = WeightAverage(Coded(), decay=0.5)
    restored.load_state_dict(average.state_dict(), module)
    assert (restored.updates, restored.stage, restored.started) == (3, 0, True)
    torch.testing.assert_close(restored.weights[0], average.weights[0])

    old = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    old.update_parameters(module)
    old.update_parameters(module)
    from_old = WeightAverage(Coded(), decay=0.5)
    from_old.load_state_dict(old.state_dict(), module)
    assert from_old.updates == 2
    torch.testing.assert_close(from_old.weights[0], module.weight.data)
    state = averaged_state_dict(module, average.state_dict())
    torch.testing.assert_close(state["weight"], average.weights[0])
    assert state["scale"] is module.state_dict()["scale"] or torch.equal(state["scale"], module.scale)


def test_sdseg_with_ema_validates_with_the_fitted_codec_scale(msd_dataset, tmp_path):
    """SDSeg trains its codec first, then the denoiser, with train.ema on: best.pt (the average) holds
    the codec exactly as trained and its fitted scale, not an average of them from 0."""
    cfg = load_config(None, [*TINY_SDSEG, "method.codec_steps=3", "train.max_steps=6", "train.val_every=6",
                             "train.ema=0.9999", "data.batch_size=2", "tracking.enabled=false",
                             "train.device=cpu", "data.num_workers=0"])
    train_run(cfg, msd_dataset, tmp_path / "run", test_at_end=False)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)["model"]
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert float(best["codec.scale"]) > 0.5 and float(best["codec.scale"]) == float(last["model"]["codec.scale"])
    for key, value in last["model"].items():
        if key.startswith("codec."):
            assert torch.equal(best[key], value), key  # frozen after its phase: copied, not averaged
    assert last["ema"]["stage"] == 1 and last["ema"]["updates"] == 3  # restarted when the denoiser's stage began
