import copy
import json
import math

import numpy as np
import pytest
import torch

from imgx3d.config import load_config
from imgx3d.errors import ConfigError
from imgx3d.methods.base import build_method
from imgx3d.training.trainer import Trainer
from imgx3d.training.workflow import train_run
from tests.conftest import TINY_OVERRIDES


def _cfg(*extra):
    return load_config(None, ["method.name=unet", "tracking.enabled=false", *TINY_OVERRIDES, *extra])


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_resume_reproduces_the_uninterrupted_run_exactly(msd_dataset, tmp_path, monkeypatch):
    full = train_run(_cfg(), msd_dataset, tmp_path / "full", test_at_end=False)
    assert full.steps == 6

    real_step = Trainer.step

    def crash_after_checkpoint(self, batch):
        if self.state.step == 4:  # last.pt was written at step 3; step 4 is lost work
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "step", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_run(_cfg(), msd_dataset, tmp_path / "broken", test_at_end=False)
    monkeypatch.setattr(Trainer, "step", real_step)
    resumed = train_run(_cfg(), msd_dataset, resume=tmp_path / "broken", test_at_end=False)
    assert resumed.steps == 6 and resumed.run_dir == tmp_path / "broken"

    a, b = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "broken" / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.best_val_dice == full.best_val_dice


def test_early_stopping_and_time_budget(msd_dataset, tmp_path):
    stopped = train_run(_cfg("train.max_steps=40", "train.val_every=1", "train.patience=2", "train.lr=1e-9"),
                        msd_dataset, tmp_path / "es", test_at_end=False)
    assert stopped.stop_reason == "early stopping" and stopped.steps < 40
    budget = train_run(_cfg("train.max_steps=100000", "train.max_minutes=0.05"), msd_dataset, tmp_path / "tb",
                       test_at_end=False)
    assert budget.stop_reason == "time budget" and budget.steps < 100000
    assert (tmp_path / "tb" / "best.pt").is_file() and (tmp_path / "tb" / "last.pt").is_file()


def test_training_lowers_the_loss_and_scores_the_test_split(msd_dataset, tmp_path, monkeypatch):
    real_step, losses = Trainer.step, []
    monkeypatch.setattr(Trainer, "step", lambda self, batch: losses.append(real_step(self, batch)["loss/model"])
                        or {"loss/model": losses[-1]})
    result = train_run(_cfg("train.max_steps=60", "train.val_every=30", "train.lr=0.01"), msd_dataset, tmp_path / "r")
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.75 * first, f"the loss fell from {first:.3f} to only {last:.3f}"
    history = torch.load(tmp_path / "r" / "last.pt", weights_only=False)["train_state"]["history"]
    assert [h["step"] for h in history] == [30, 60]
    assert result.test_summary["cases"] == 2
    # Trivial predictors on these volumes (a radius-4 sphere and a 4^3 cube in 20x24x16): all
    # background scores Dice 0; a constant class map 0.067 (sphere) / 0.013 (cube), 0.04 mean.
    # 60 steps find the sphere (mean foreground Dice 0.46 measured, val 0.45): the floor is 7x
    # the constant map's score.
    assert result.test_summary["foreground_mean"]["dice"] > 0.3, result.test_summary
    assert result.best_val_dice > 0.3
    assert (tmp_path / "r" / "test_metrics" / "metrics.csv").is_file()
    # train.test_uncertainty (default): the test split's uncertainty scored beside its Dice
    scored = json.loads((tmp_path / "r" / "test_metrics" / "uncertainty.json").read_text())
    assert scored["cases"] == 2 and [r["case"] for r in scored["per_case"]] == sorted(json.loads((tmp_path / "r" / "split.json").read_text())["test"])
    assert 0.5 < scored["error_auc"] <= 1.0, "the entropy finds the errors better than chance"
    assert 0.0 <= scored["ece"] < 0.5
    assert result.test_summary["uncertainty"]["error_auc"] == scored["error_auc"]
    assert "uncertainty (2 cases): calibration error" in (tmp_path / "r" / "test_metrics" / "table.txt").read_text()


def test_lr_schedule_over_steps_or_budget():
    from imgx3d.training.trainer import lr_factor

    cfg = _cfg("train.max_steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.0",
               "train.max_minutes=10").train
    assert lr_factor(cfg, 0, 0.0) == pytest.approx(0.1)            # warmup
    assert lr_factor(cfg, 55, 0.0) == pytest.approx(0.5)           # half-way through the cosine
    assert lr_factor(cfg, 55, 590.0) == pytest.approx(0.5)         # 'steps': time does not matter
    cfg.schedule_over = "budget"
    assert lr_factor(cfg, 55, 540.0) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))
    assert lr_factor(cfg, 20, 600.0) == pytest.approx(0.0)         # budget spent: annealed


@pytest.mark.parametrize("clock, expected", [("wall", "time budget"), ("cpu", "max steps")])
def test_budget_clock_wall_counts_waiting_cpu_does_not(msd_dataset, tmp_path, monkeypatch, clock, expected):
    """A run that waits (a loaded machine, slow storage) spends wall budget but not CPU budget."""
    import types

    from imgx3d.training import trainer

    clocks = types.SimpleNamespace(wall=0.0, cpu=0.0)  # injected: no real waiting, no busy-machine flakiness
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(monotonic=lambda: clocks.wall,
                                                              process_time=lambda: clocks.cpu))
    real_step = Trainer.step

    def slow_step(self, batch):
        clocks.wall += 0.4  # each step waits 0.4 s ...
        clocks.cpu += 0.01  # ... and computes for 0.01 s
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "step", slow_step)
    result = train_run(_cfg("train.max_steps=4", "train.max_minutes=0.01", f"train.budget_clock={clock}",
                            "data.num_workers=0"), msd_dataset, tmp_path / clock, test_at_end=False)
    assert result.stop_reason == expected


def test_precision_is_a_function_of_the_setting_and_the_device():
    from imgx3d.resources import choose_precision

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert choose_precision("auto", cuda, (7, 0)) is torch.float16    # V100: bf16 only emulated
    assert choose_precision("auto", cuda, (7, 5)) is torch.float16    # T4, RTX 20xx
    assert choose_precision("auto", cuda, (8, 0)) is torch.bfloat16   # A100
    assert choose_precision("auto", cuda, (9, 0)) is torch.bfloat16   # H100 / H200
    assert choose_precision("auto", cpu, cpu_bf16=False) is None            # no bf16 instructions: fp32
    assert choose_precision("auto", cpu, cpu_bf16=True) is torch.bfloat16   # AVX512-BF16 / AMX
    assert choose_precision("auto", torch.device("mps")) is None
    assert choose_precision("fp32", cuda, (9, 0)) is None
    assert choose_precision("bf16", cpu) is torch.bfloat16 and choose_precision("fp16", cpu) is torch.float16


def _conv_kernels(fn) -> set[str]:
    """Which of ATen's two CPU kernels for (non-transposed) 3D convolutions ``fn()`` runs."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()} & {"aten::slow_conv3d_forward", "aten::mkldnn_convolution"}


def test_cpu_inference_convolutions_run_on_onednn_with_the_same_values_and_training_keeps_torchs_path():
    import copy

    from imgx3d.resources import OneDNNConv3d, use_fast_cpu_kernels

    torch.manual_seed(0)
    net = build_method(_cfg().method, 3, 1).net.eval()
    stock = copy.deepcopy(net)
    use_fast_cpu_kernels(net, torch.device("cpu"), training=False)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d) and not m.transposed]
    assert convs and all(type(m) is OneDNNConv3d for m in convs)
    assert ({k: v.tolist() for k, v in net.state_dict().items()}
            == {k: v.tolist() for k, v in stock.state_dict().items()})
    x = torch.randn(1, 1, 16, 16, 16)  # batch 1, small deep levels: torch's own choice is its im2col kernel
    with torch.inference_mode():
        assert "aten::slow_conv3d_forward" in _conv_kernels(lambda: stock(x))
        assert _conv_kernels(lambda: net(x)) == {"aten::mkldnn_convolution"}
        torch.testing.assert_close(net(x), stock(x), rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", torch.bfloat16):  # autocast is honoured: bf16 out, as torch's path gives
            stock_conv = next(m for m in stock.modules() if isinstance(m, torch.nn.Conv3d))
            assert convs[0](x).dtype == stock_conv(x).dtype == torch.bfloat16
            assert net(x).dtype == torch.float32  # and the network's output leaves it as float32
    net.train(), stock.train()
    assert "aten::mkldnn_convolution" not in _conv_kernels(lambda: net(x.requires_grad_()))  # autograd: torch's path
    for model in (net, stock):
        model(x).square().sum().backward()
    for ours, theirs in zip(net.parameters(), stock.parameters()):  # group norm's rounding: ~1e-5 apart
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-4)
    untouched = copy.deepcopy(stock)
    use_fast_cpu_kernels(untouched, torch.device("cuda", 0), training=True)  # a GPU keeps cuDNN's path
    assert not any(isinstance(m, OneDNNConv3d) for m in untouched.modules())


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_cpu_weights_are_channels_last_for_training_and_for_inference_only_on_avx512(monkeypatch, capability):
    from imgx3d.resources import use_fast_cpu_kernels

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    layouts = {}
    for training in (True, False):
        net = build_method(_cfg().method, 3, 1).net
        use_fast_cpu_kernels(net, torch.device("cpu"), training=training)
        cl = torch.channels_last_3d  # the 5D weights whose two layouts differ (not those of 1 channel, 1³ kernels)
        weights = [p for p in net.parameters()
                   if p.dim() == 5 and not (p.is_contiguous() and p.is_contiguous(memory_format=cl))]
        layouts[training] = {p.is_contiguous(memory_format=cl) for p in weights}
    assert layouts == {True: {True}, False: {capability == "AVX512"}}


def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()


@pytest.mark.parametrize("affine", [False, True])
def test_channels_last_instance_norm_gives_instance_norms_values_and_gradients_and_keeps_the_layout(affine):
    from imgx3d.resources import GROUP_NORM_MIN_VOXELS, ChannelsLastInstanceNorm3d

    torch.manual_seed(0)
    stock = torch.nn.InstanceNorm3d(6, affine=affine)
    if affine:
        with torch.no_grad():
            stock.weight.copy_(torch.randn(6)), stock.bias.copy_(torch.randn(6))
    ours = copy.deepcopy(stock)
    ours.__class__ = ChannelsLastInstanceNorm3d
    # per-sample, per-channel offsets and scales: normalising over the wrong axes would not cancel them
    x = (torch.randn(2, 6, 12, 11, 9) * torch.rand(2, 6, 1, 1, 1) * 5 + torch.randn(2, 6, 1, 1, 1) * 3)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    assert x[0, 0].numel() >= GROUP_NORM_MIN_VOXELS
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = stock(xa), ours(xb)
    assert _channels_last(out_b) and not _channels_last(out_a)
    torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-4)
    upstream = torch.randn_like(out_a)
    grads_a = torch.autograd.grad((out_a * upstream).sum(), [xa, *stock.parameters()])
    grads_b = torch.autograd.grad((out_b * upstream).sum(), [xb, *ours.parameters()])
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():  # bf16 and maps of few voxels: the instance norm's own path (faster there)
        assert not _channels_last(ours(x.bfloat16())) and not _channels_last(ours(x[..., :4]))
        torch.testing.assert_close(ours(x[..., :4]), stock(x[..., :4]))
    if affine:  # an input without gradient: the stock path (the group-norm backward would crash there)
        torch.testing.assert_close(torch.autograd.grad((ours(x) * upstream).sum(), [*ours.parameters()]),
                                   torch.autograd.grad((stock(x) * upstream).sum(), [*stock.parameters()]))
    tracked = torch.nn.InstanceNorm3d(6, track_running_stats=True)
    tracked.running_mean.fill_(2.0), tracked.eval()
    tracked.__class__ = ChannelsLastInstanceNorm3d  # running statistics: the instance norm's own path
    torch.testing.assert_close(tracked(x), (x - 2.0) / (1 + 1e-5) ** 0.5)


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_fast_cpu_layout_keeps_fp32_activations_channels_last_through_the_norms_on_avx512(monkeypatch, capability):
    from imgx3d.resources import GROUP_NORM_MIN_VOXELS, ChannelsLastInstanceNorm3d, use_fast_cpu_kernels

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    net = build_method(_cfg("method.full_res_features=8").method, 3, 1).net  # channels-last maps of 16³ voxels
    keys = list(net.state_dict())
    use_fast_cpu_kernels(net, torch.device("cpu"), training=True)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and list(net.state_dict()) == keys
    assert {type(m) for m in norms} == {ChannelsLastInstanceNorm3d if capability == "AVX512" else torch.nn.InstanceNorm3d}
    seen = []
    for m in norms:
        m.register_forward_hook(lambda mod, inp, out: seen.append((inp[0][0, 0].numel() >= GROUP_NORM_MIN_VOXELS,
                                                                   _channels_last(inp[0]), _channels_last(out))))
    with torch.inference_mode():
        net(torch.randn(1, 1, 32, 32, 32))
    large = [(i, o) for big, i, o in seen if big]
    assert len(seen) == len(norms) and any(i for i, _ in large), seen
    # on AVX-512 each norm of a large map returns the layout it was given; the stock norm returns the default
    assert all(o == (i and capability == "AVX512") for i, o in large), seen


def test_fp16_trains_through_a_gradient_scaler_saved_in_checkpoints(msd_dataset, tmp_path, monkeypatch):
    scaled = []
    real_scale = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, loss: scaled.append(self.is_enabled())
                        or real_scale(self, loss))
    train_run(_cfg("train.precision=fp16"), msd_dataset, tmp_path / "fp16", test_at_end=False)
    ckpt = torch.load(tmp_path / "fp16" / "last.pt", weights_only=False)
    assert scaled == [True] * 6 and ckpt["grad_scaler"]["scale"] > 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    scaled.clear()
    train_run(_cfg("train.precision=auto"), msd_dataset, tmp_path / "cpu", test_at_end=False)  # CPU: bf16 or fp32
    assert scaled == [False] * 6 and not torch.load(tmp_path / "cpu" / "last.pt", weights_only=False)["grad_scaler"]


def test_val_cases_test_device_and_device_tags(msd_dataset, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from imgx3d.inference.predictor import Predictor
    from imgx3d.resources import cpu_computes_bf16

    validated, loaded = [], []
    real_validate, real_load = Trainer.validate, Predictor.load.__func__
    monkeypatch.setattr(Trainer, "validate", lambda self, cases, labels: validated.append(len(cases))
                        or real_validate(self, cases, labels))
    monkeypatch.setattr(Predictor, "load", classmethod(lambda cls, path, device="auto", **kw: loaded.append(device)
                                                       or real_load(cls, path, device=device, **kw)))
    real_release = Trainer.release
    monkeypatch.setattr(Trainer, "release", lambda self: loaded.append(("released", len(self.optimizers)))
                        or real_release(self))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, ["method.name=unet", f"tracking.uri={uri}", *TINY_OVERRIDES, "data.split.val_fraction=0.5",
                             "train.val_cases=2", "train.device=cpu"])
    result = train_run(cfg, msd_dataset, tmp_path / "r")
    assert validated == [2, 2], "3 validation cases in the split, train.val_cases=2 of them validated"
    assert loaded == [("released", 1), "cpu", "cpu"], ("the training copy goes first; the postprocessing decision "
                                                       "and the test split are made on the training's device")
    tags = MlflowClient(tracking_uri=uri).get_run(result.run_id).data.tags
    assert tags["device"] == "cpu" and tags["device_name"] == "cpu"
    assert tags["precision"] == ("bf16" if cpu_computes_bf16() else "fp32"), "auto: by what this CPU computes"
    assert tags["torch_version"] == torch.__version__ and tags["cuda_version"] == (torch.version.cuda or "none")


def test_validation_is_shared_by_the_ranks_and_averaged_over_every_case(msd_dataset, tmp_path, monkeypatch):
    """Rank r predicts cases r, r + N, ...; the gathered per-case scores give every rank the mean over all."""
    from imgx3d.data.catalog import find_cases
    from imgx3d.data.transforms import Preprocessor
    from imgx3d.training.distributed import DistContext

    cfg = _cfg()
    catalog = find_cases(msd_dataset)
    cases = [Preprocessor(cfg.data).load_case(c, catalog.labels) for c in catalog.cases[:5]]
    torch.manual_seed(0)
    method = build_method(cfg.method, 3, 1)
    alone = Trainer(cfg, method, tmp_path, {}).validate(cases, catalog.labels)

    predicted, shares = [], {}
    from imgx3d.inference.predictor import Predictor

    real = Predictor.model_space_classes
    monkeypatch.setattr(Predictor, "model_space_classes", lambda self, image: predicted.append(image) or real(self, image))
    for rank in (0, 1):  # each rank on its own, the other rank's share coming through gather
        ctx = DistContext(rank=rank, world_size=2)
        monkeypatch.setattr(DistContext, "broadcast", lambda self, value: value)
        monkeypatch.setattr(DistContext, "gather", lambda self, value, r=rank: shares.setdefault(r, value) and
                            [shares.get(0, value), shares.get(1, value)])
        trainer = Trainer(cfg, method, tmp_path, {})
        trainer.dist = ctx
        predicted.clear()
        trainer.validate(cases, catalog.labels)
        assert [id(p) for p in predicted] == [id(c["image"]) for c in cases[rank::2]]
    combined = {c: shares[0][c] + shares[1][c] for c in shares[0]}
    expected = {f"val/dice/{catalog.labels[c]}": float(np.mean(v)) for c, v in combined.items()}
    for key, value in expected.items():
        assert value == pytest.approx(alone[key]), key


def test_ema_averages_each_step_validates_and_saves_the_average_and_resumes_exactly(msd_dataset, tmp_path,
                                                                                    monkeypatch):
    """train.ema: e_1 = w_1 (at ema_start), e_k = d_k e_{k-1} + (1 - d_k) w_k with LitEma's warm-up
    d_k = min(decay, (1 + n) / (10 + n)); best.pt holds the average, last.pt the training weights and
    the average's state, and a resumed run ends on the same average."""
    weights = []
    real_step = Trainer.step

    def step(self, batch):
        out = real_step(self, batch)
        weights.append({k: v.detach().clone() for k, v in self.method.state_dict().items()})
        return out

    monkeypatch.setattr(Trainer, "step", step)
    cfg = _cfg("train.ema=0.2", "train.ema_start=1", "train.val_every=6")  # one validation, at the end
    train_run(cfg, msd_dataset, tmp_path / "full", test_at_end=False)
    assert len(weights) == 6
    expected = {k: v.clone() for k, v in weights[1].items()}  # after step 2 (past ema_start = 1): a copy
    parameters = {name for name, _ in build_method(cfg.method, 2, 1).named_parameters()}
    for n, w in enumerate(weights[2:], start=1):
        d = min(0.2, (1 + n) / (10 + n))  # 2/11 (warm-up), then 0.2 (the decay)
        expected = {k: (d * e + (1 - d) * w[k]) if k in parameters else w[k] for k, e in expected.items()}
    best = torch.load(tmp_path / "full" / "best.pt", weights_only=False)
    assert best["step"] == 6
    for key, value in expected.items():
        torch.testing.assert_close(best["model"][key], value, msg=key)
    assert any(not torch.equal(best["model"][k], weights[-1][k]) for k in expected), "the average, not the last"
    last = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    for key, value in weights[-1].items():  # last.pt: the training weights, not the average
        assert torch.equal(last["model"][key], value), key
    assert last["ema"]["updates"] == 5

    monkeypatch.setattr(Trainer, "step", lambda self, batch: (_ for _ in ()).throw(KeyboardInterrupt)
                        if self.state.step == 4 else real_step(self, batch))
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, msd_dataset, tmp_path / "broken", test_at_end=False)
    monkeypatch.setattr(Trainer, "step", real_step)
    train_run(cfg, msd_dataset, resume=tmp_path / "broken", test_at_end=False)
    resumed = torch.load(tmp_path / "broken" / "last.pt", weights_only=False)
    assert resumed["ema"]["updates"] == last["ema"]["updates"]
    for a, b in zip(resumed["ema"]["weights"], last["ema"]["weights"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("heads, weights", [(1, [2 / 3, 1 / 3]), (2, [4 / 7, 2 / 7, 1 / 7])])
def test_deep_supervision_weights_each_heads_loss_and_predicts_with_the_top_output(heads, weights):
    cfg = load_config(None, ["method.name=unet", "method.arch=dynunet", "method.channels=[4,8,16,16]",
                             "method.strides=[2,2,2]", f"method.deep_supervision={heads}"])
    method = build_method(cfg.method, num_classes=3, in_channels=1)
    torch.manual_seed(0)
    image = torch.randn(2, 1, 16, 16, 16)
    label = (torch.arange(16 ** 3).reshape(1, 1, 16, 16, 16) % 7 // 3).repeat(2, 1, 1, 1, 1)  # classes 0, 1, 2
    method.train()
    outputs = method.net(image)
    assert outputs.shape == (2, 1 + heads, 3, 16, 16, 16)
    per_head = [method.loss(outputs[:, i], label) for i in range(1 + heads)]
    assert len({round(v.item(), 4) for v in per_head}) == 1 + heads  # distinct heads: the weights matter
    expected = sum(w * v for w, v in zip(weights, per_head))
    assert torch.allclose(method.training_step({"image": image, "label": label}, 0)["loss/model"], expected)
    method.eval()
    with torch.no_grad():
        top = method.net(image)
        assert torch.allclose(top, outputs[:, 0].detach(), atol=1e-5)
        assert torch.allclose(method.window_probabilities(image), torch.softmax(top, dim=1))


@pytest.mark.parametrize("overrides, message", [
    (["method.arch=unet", "method.deep_supervision=1"], "needs method.arch: dynunet"),
    (["method.arch=dynunet", "method.channels=[4,8,16]", "method.strides=[2,2]", "method.deep_supervision=2"],
     "must be 0 to 1"),
])
def test_deep_supervision_outside_dynunets_levels_is_a_config_error(overrides, message):
    cfg = load_config(None, ["method.name=unet", *overrides])
    with pytest.raises(ConfigError, match=message):
        build_method(cfg.method, num_classes=2, in_channels=1)


def test_deep_supervised_dynunet_trains_and_scores_whole_volumes(msd_dataset, tmp_path):
    result = train_run(_cfg("method.arch=dynunet", "method.deep_supervision=1"), msd_dataset, tmp_path / "r")
    assert any(k.startswith("net.deep_supervision_heads.") for k in _weights(tmp_path / "r" / "best.pt"))
    assert result.test_summary["cases"] == 2  # the test split predicted by the top output alone (eval mode)
