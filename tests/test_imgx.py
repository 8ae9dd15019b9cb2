"""ImgX-DiffSeg: recycling's gradient path, timesteps per mode, deterministic whole-volume prediction."""

import numpy as np
import pytest
import torch

from imgx3d.config import InferConfig
from imgx3d.inference.windows import make_window
from imgx3d.methods.base import build_method

TINY = {"name": "imgx", "channels": [8, 16], "strides": [2]}


def _method(**kw):
    torch.manual_seed(0)
    return build_method({**TINY, **kw}, num_classes=3, in_channels=1)


def _randomised(method):
    """MONAI zero-initialises the output conv; give every weight a value so outputs depend on the noise."""
    with torch.no_grad():
        for p in method.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    return method.eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(2, 1, 8, 8, 8, generator=g), "label": torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g)}


class Recorder(torch.nn.Module):
    """Wraps the network and records each call's timesteps and whether its output carries gradient."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, timesteps):
        out = self.net(x, timesteps)
        self.calls.append((timesteps.clone(), out.requires_grad))
        return out


@pytest.mark.parametrize("mode,passes", [("none", 1), ("next", 2), ("max", 2)])
def test_recycling_passes_and_gradient_path(mode, passes):
    method = _method(recycling=mode)
    method.net = Recorder(method.net)
    loss = method.training_step(_batch(), 0)["loss/model"]
    assert len(method.net.calls) == passes
    if passes == 2:
        (t_r, first_grad), (t, second_grad) = method.net.calls
        assert not first_grad, "the recycling pass must not build a graph"
        assert second_grad
        if mode == "max":
            assert torch.all(t_r == 1000) and torch.all(t < 1000)  # base-chain indices of K-1 and [0, K-1)
        else:
            assert torch.all(t_r == torch.clamp(t + 250, max=1000))
    loss.backward()
    grads = [p.grad for p in method.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_recycled_input_comes_from_the_prediction_not_the_label(monkeypatch):
    """With recycling the trained pass noises the first pass's x0_hat; with 'none' the ground truth."""
    seen = {}
    for mode in ("none", "max"):
        method = _method(recycling=mode)
        real_q = method.train_schedule.q_sample

        def spy(x0, t, noise, real_q=real_q, mode=mode):
            seen.setdefault(mode, []).append(x0.detach().clone())
            return real_q(x0, t, noise)

        monkeypatch.setattr(method.train_schedule, "q_sample", spy)
        method.training_step(_batch(), 0)
    truth = seen["none"][0]
    assert set(truth.unique().tolist()) == {-1.0, 1.0}
    recycled = seen["max"][1]
    assert not torch.equal(recycled, truth) and recycled.abs().max() <= 1.0


def test_predict_is_deterministic_for_a_seed_and_a_distribution():
    method = _randomised(_method())
    window = make_window(InferConfig(overlap=0.5, sw_batch_size=2), [8, 8, 8])
    image = torch.randn(1, 1, 12, 10, 8, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a, b = method.predict(image, window), method.predict(image, window)
        method.cfg.seed = 1
        c = method.predict(image, window)
    assert a.shape == (1, 3, 12, 10, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.allclose(a.sum(1), torch.ones(1, 12, 10, 8), atol=1e-5) and a.min() >= 0


def test_eps_ablation_and_ensemble_and_misaligned_chain():
    eps = _method(prediction="eps", recycling="none")
    assert torch.isfinite(eps.training_step(_batch(), 0)["loss/model"])
    misaligned = _method(train_steps=1001, recycling="none")
    assert misaligned.train_schedule.num_steps == 1001 and misaligned.infer_schedule.num_steps == 5
    ensemble = _randomised(_method(num_samples=3))
    window = make_window(InferConfig(sw_batch_size=1), [8, 8, 8])
    with torch.inference_mode():
        votes = ensemble.predict(torch.randn(1, 1, 8, 8, 8), window)
    assert torch.allclose(votes.sum(1), torch.ones(1, 8, 8, 8))
    assert set((votes * 3).round().unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_monai_diffusion_unet_backbone_trains():
    method = _method(backbone="diffusion_unet", channels=[8, 16], norm_num_groups=8, num_head_channels=8,
                     num_res_units=1)
    batch = _batch()
    optimizer = torch.optim.Adam(method.parameters(), lr=3e-3)
    losses = []
    for step in range(15):
        torch.manual_seed(0)  # the same t and noise every step: the loss of one fixed sample
        loss = method.training_step(batch, step)["loss/model"]
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, f"parameters outside the graph: {missing[:3]}"
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_time_unet_with_one_up_subunit_is_monai_unet_plus_time_conditioning():
    from imgx3d.nets.diffusion_unet import FiLMTimeUNet
    from imgx3d.nets.segmentation import build_segmentation_net

    channels, strides = [8, 16, 32], [2, 2]
    monai_unet = build_segmentation_net("unet", 3, 1, 3, channels, strides, 2, "instance", 0.0, 3)
    film = FiLMTimeUNet(3, 1, 3, channels, strides, num_res_units=2, up_subunits=1)
    conditioning = sum(p.numel() for name, p in film.named_parameters() if "film" in name or "time_mlp" in name)
    assert sum(p.numel() for p in film.parameters()) - conditioning == sum(p.numel() for p in monai_unet.parameters())
    heavier = FiLMTimeUNet(3, 1, 3, channels, strides, num_res_units=2)  # the default: 2 sub-units going up too
    assert sum(p.numel() for p in heavier.parameters()) > sum(p.numel() for p in film.parameters())
    x = torch.randn(1, 1, 16, 16, 16)
    assert film(x, torch.tensor([3])).shape == (1, 3, 16, 16, 16)
    from imgx3d.methods.imgx import ImgXConfig, ImgXDiffSeg

    default = ImgXDiffSeg(ImgXConfig(channels=channels, strides=strides, num_res_units=2), 3, 1).net  # in: 1 + 3
    one_up = FiLMTimeUNet(3, 4, 3, channels, strides, num_res_units=2, up_subunits=1)
    assert sum(p.numel() for p in default.parameters()) == sum(p.numel() for p in one_up.parameters()), \
        "the method's default up path is MONAI's (one sub-unit)"


def test_film_scales_and_shifts_each_channel_and_one_timestep_serves_a_batch():
    """FiLM is ``h * (1 + scale) + shift`` per sample and channel (non-trivial values); a (1,)
    timestep (what prediction passes for a batch of windows) equals that timestep repeated."""
    from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

    from imgx3d.nets.diffusion_unet import FiLMTimeUNet

    torch.manual_seed(0)
    h, scale, shift = torch.randn(2, 4, 3, 5, 2), torch.randn(2, 4, 1, 1, 1), torch.randn(2, 4, 1, 1, 1)
    expected = torch.stack([h[b, c] * (1 + scale[b, c, 0, 0, 0]) + shift[b, c, 0, 0, 0]
                            for b in range(2) for c in range(4)]).view(2, 4, 3, 5, 2)
    torch.testing.assert_close(FiLMTimeUNet._film(h, scale, shift), expected)
    net = FiLMTimeUNet(3, 4, 3, [8, 16, 32], [2, 2], num_res_units=2, up_subunits=1).eval()
    scale0, shift0 = net.conditioning(torch.tensor([1]), torch.float32)[0]
    emb = net.time_mlp(get_timestep_embedding(torch.tensor([1]), 8))
    torch.testing.assert_close(torch.cat([scale0, shift0], 1).flatten(), net.down_films[0](emb).flatten())
    x = torch.randn(3, 4, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor([2])), net(x, torch.tensor([2, 2, 2])))
        assert not torch.allclose(net(x, torch.tensor([2])), net(x, torch.tensor([0]))), "the timestep conditions"


def test_remembered_conditioning_follows_the_timestep_and_every_weight_change():
    """Prediction remembers each timestep's FiLM scales and shifts; the memo must give what a fresh
    computation gives, and be dropped by an optimiser step, ``load_state_dict`` or new storage."""
    from imgx3d.nets.diffusion_unet import FiLMTimeUNet

    torch.manual_seed(1)
    net = FiLMTimeUNet(3, 4, 3, [8, 16, 32], [2, 2], num_res_units=2, up_subunits=1)
    x, t = torch.randn(1, 4, 16, 16, 16), torch.tensor([3])

    def fresh() -> torch.Tensor:  # gradient mode: never remembered
        with torch.enable_grad():
            return net(x, t).detach()

    net.eval()
    with torch.inference_mode():
        first = net(x, t)
        assert len(net._memo) == 1
        torch.testing.assert_close(net(x, t), first)
        assert not torch.allclose(net(x, torch.tensor([0])), first), "a different timestep is not served the memo"
    torch.testing.assert_close(first, fresh())
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05)
    net(x, t).square().mean().backward()
    optimizer.step()
    net.eval()
    with torch.inference_mode():
        stepped = net(x, t)
    assert not torch.allclose(stepped, first)
    torch.testing.assert_close(stepped, fresh())
    other = FiLMTimeUNet(3, 4, 3, [8, 16, 32], [2, 2], num_res_units=2, up_subunits=1).state_dict()
    net.load_state_dict(other)
    with torch.inference_mode():
        torch.testing.assert_close(net(x, t), fresh())
    net.time_mlp[0].weight.data = net.time_mlp[0].weight.data * 3  # new storage
    with torch.inference_mode():
        torch.testing.assert_close(net(x, t), fresh())
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, t)
    assert low.dtype == torch.bfloat16 and net._memo, "autocast's state is part of the key"
    with torch.inference_mode():
        assert net(x, t).dtype == torch.float32


def test_x0_loss_is_dice_plus_cross_entropy_with_weights_one():
    """ImgX-DiffSeg's x0 loss: soft Dice over the foreground classes + cross-entropy, weight 1 each
    (hand-computed here, not through MONAI)."""
    method = _method()
    logits = torch.randn(2, 3, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    method.net.forward = lambda x, t: logits
    label = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=torch.Generator().manual_seed(5))
    loss = method.training_step({"image": torch.rand(2, 1, 8, 8, 8), "label": label}, 0)["loss/model"]
    p = torch.softmax(logits, 1)
    g = torch.nn.functional.one_hot(label[:, 0], 3).movedim(-1, 1).float()
    dims = (2, 3, 4)
    dice = 1 - (2 * (p * g)[:, 1:].sum(dims) + 1e-5) / (p[:, 1:].sum(dims) + g[:, 1:].sum(dims) + 1e-5)
    expected = dice.mean() + torch.nn.functional.cross_entropy(logits, label[:, 0])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_a_run_rebuilt_from_its_config_yaml_alone_predicts_the_same(msd_dataset, tmp_path):
    """config.yaml holds every ImgXConfig field; the method it builds, with best.pt's weights,
    predicts exactly what the checkpoint's own predictor does."""
    import dataclasses

    import yaml

    from imgx3d.checkpoint import load_checkpoint
    from imgx3d.config import load_config
    from imgx3d.inference.predictor import InferSettings, Predictor
    from imgx3d.methods.base import load_method_state
    from imgx3d.methods.imgx import ImgXConfig
    from imgx3d.training.workflow import train_run
    from tests.conftest import TINY_OVERRIDES

    cfg = load_config(None, ["method.name=imgx", *TINY_OVERRIDES, "tracking.enabled=false", "train.max_steps=2",
                             "train.val_every=2", "method.num_res_units=0"])
    run = train_run(cfg, msd_dataset, tmp_path / "run", test_at_end=False).run_dir
    saved = yaml.safe_load((run / "config.yaml").read_text())["method"]
    assert set(saved) == {f.name for f in dataclasses.fields(ImgXConfig)}, "every ImgXConfig field is written"
    rebuilt = load_config(run / "config.yaml")
    checkpoint = load_checkpoint(run)
    assert rebuilt == checkpoint.config
    method = build_method(rebuilt.method, checkpoint.num_classes, checkpoint.in_channels)
    load_method_state(method, checkpoint.weights, "best.pt")
    image = sorted((msd_dataset / "imagesTr").glob("*.nii.gz"))[0]
    ours = Predictor(method, rebuilt, checkpoint.labels, InferSettings.from_config(rebuilt.infer, device="cpu"))
    theirs = Predictor.load(run, device="cpu", postprocess=False)  # the learned postprocessing lives in best.pt only
    np.testing.assert_array_equal(ours.predict_files([image]).labels.array, theirs.predict_files([image]).labels.array)


@pytest.mark.parametrize("loss", ["dice_ce", "dice_focal"])
def test_present_class_dice_leaves_out_the_classes_absent_from_each_sample(loss):
    """dice_over: present (the authors'): sample 0 holds classes 1 and 2, sample 1 only class 1, so its
    class-2 Dice is left out: the Dice term is the mean of three (sample, class) Dice losses, not four."""
    method = _method(loss=loss, dice_over="present")
    reference = _method(loss=loss)
    logits = torch.randn(2, 3, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    label = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=torch.Generator().manual_seed(5))
    label[1][label[1] == 2] = 0
    for m in (method, reference):
        m.net.forward = lambda x, t: logits
    batch = {"image": torch.rand(2, 1, 8, 8, 8), "label": label}
    torch.manual_seed(0)
    present = method.training_step(batch, 0)["loss/model"]
    torch.manual_seed(0)
    everything = reference.training_step(batch, 0)["loss/model"]
    p = torch.softmax(logits, 1)
    g = torch.nn.functional.one_hot(label[:, 0], 3).movedim(-1, 1).float()
    dims = (2, 3, 4)
    dice = 1 - (2 * (p * g)[:, 1:].sum(dims) + 1e-5) / (p[:, 1:].sum(dims) + g[:, 1:].sum(dims) + 1e-5)  # (2, 2)
    assert float(dice[1, 1]) > 0.9  # the absent class, predicted with probability ~1/3: a loss near 1 when counted
    torch.testing.assert_close(present - everything, (dice[0].sum() + dice[1, 0]) / 3 - dice.mean(),
                               rtol=1e-4, atol=1e-6)


def test_x0_estimate_is_twice_the_softmax_minus_one():
    """x0 mode maps the class logits to the mask space by 2·softmax − 1 (not tanh, not a clamp)."""
    method = _method()
    out = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(2)) * 3
    x0 = method._x0_estimate(out, torch.zeros_like(out), torch.zeros(2, dtype=torch.long), method.train_schedule)
    torch.testing.assert_close(x0, 2 * torch.softmax(out, 1) - 1)
    torch.testing.assert_close((x0 + 1).sum(1) / 2, torch.ones(2, 4, 4, 4))
