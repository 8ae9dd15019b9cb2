"""Plans, round 2: thin-slab data, the race between candidate plans, and the one resolver from flags to a config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from imgx3d.planning.fingerprint import CaseStats, ChannelStats, ClassStats, Fingerprint
from tests.conftest import TINY_OVERRIDES, write_msd_dataset


def _fingerprint(shape: list[int], spacing: list[float], cases: int = 6) -> Fingerprint:
    stats = [CaseStats(f"c{i}", list(shape), list(spacing), "RAS", 1.0) for i in range(cases)]
    return Fingerprint("toy", "MRI", stats, [ChannelStats("MRI", 0.0, 1.0, -2.0, 2.0, -3.0, 3.0)],
                       [ClassStats(1, "heart", cases, 500.0, [10.0, 10.0, 4.0])], reading={})


@pytest.mark.parametrize("shape, spacing, axis, evidence", [
    ([256, 256, 36], [1.25, 1.25, 7.7], 2, "header"),  # CHAOS: the header says it
    ([209, 256, 10], [1.0, 1.0, 1.0], 2, "shape"),  # converted cine MRI whose header claims 1 mm slices
    ([10, 209, 256], [1.0, 1.0, 1.0], 0, "shape"),  # the same stored slice-first
    ([35, 50, 36], [1.0, 1.0, 1.0], None, ""),  # hippocampus
    ([69, 69, 64], [1.5, 1.5, 1.5], None, ""),  # prostate
    ([240, 240, 30], [1.0, 1.0, 1.0], None, ""),  # 30 slices: more than a thin slab
])
def test_thin_slabs_are_recognised_from_the_header_or_the_shape(shape, spacing, axis, evidence):
    from imgx3d.planning.planner import thin_slab_axis

    found, why = thin_slab_axis(_fingerprint(shape, spacing))
    assert found == axis
    assert evidence in why


def test_a_lying_header_still_gets_in_plane_kernels_and_a_2d_rival():
    """209 x 256 x 10 with 1 mm 'slices': the slice axis is planned as the coarse one (kernel 1 at full
    resolution, pooled last), and the plan carries the 2D U-Net on those slices as its rival."""
    from imgx3d.planning.planner import plan

    result = plan(_fingerprint([209, 256, 10], [1.0, 1.0, 1.0]), "unet", 20.0, step_timer=lambda cfg: 0.05)
    cfg = result.config()
    assert cfg.method.arch == "dynunet" and cfg.method.kernel_size[0] == [3, 3, 1]
    assert cfg.method.strides[0] == [2, 2, 1], "the thin axis is not pooled at the first level"
    rival = result.rivals["2d"].config()
    assert (rival.method.spatial_dims, rival.data.slices.axis) == (2, 2)
    assert rival.data.slices.size == [216, 256], "whole slices, rounded up to what 3 poolings divide"
    assert 2 not in rival.data.flip_axes and rival.infer.tta_shifts == 1
    # an isotropic dataset is not raced; a hand-set network or window ends a race too
    assert not plan(_fingerprint([35, 50, 36], [1.0] * 3), "unet", 20.0, step_timer=lambda cfg: 0.05).rivals
    result.override([("data.patch_size", [64, 64, 8])], "set on the command line")
    assert not result.rivals


def test_a_short_budget_plans_the_2d_rival_on_a_coarser_grid():
    """When no slice batch reaches the step target on whole full-resolution slices, the rival resamples
    them 2x coarser in-plane rather than train too few steps."""
    from imgx3d.planning.planner import ENOUGH_STEPS, plan

    def timer(cfg):  # seconds per step grow with the slice's pixels
        return 5e-6 * cfg.data.batch_size * float(np.prod(cfg.data.slices.size or cfg.data.patch_size))

    rival = plan(_fingerprint([256, 256, 36], [1.25, 1.25, 7.7]), "unet", 10.0, step_timer=timer).rivals["2d"]
    cfg = rival.config()
    assert cfg.data.slices.size == [128, 128]
    steps = int(600 / timer(cfg))
    assert steps >= ENOUGH_STEPS and int(600 / (5e-6 * 2 * 256 * 256)) < ENOUGH_STEPS


def test_a_paused_run_resumes_to_the_end(tmp_path):
    from imgx3d.config import load_config
    from imgx3d.training.workflow import RESULT_FILE, train_run

    data = write_msd_dataset(tmp_path / "msd")
    cfg = load_config(None, [*TINY_OVERRIDES, "tracking.enabled=false", "train.max_minutes=10"])
    paused = train_run(cfg, data, tmp_path / "run", pause_after_minutes=0.0)
    assert (paused.stop_reason, paused.steps, paused.test_summary) == ("paused", 0, None)
    assert (tmp_path / "run" / "last.pt").is_file() and not (tmp_path / "run" / RESULT_FILE).exists()
    done = train_run(cfg, data, resume=tmp_path / "run")
    assert (done.stop_reason, done.steps) == ("max steps", 6)
    assert (tmp_path / "run" / RESULT_FILE).is_file() and done.test_summary is not None


def test_the_race_continues_the_candidate_with_the_best_validation_dice(tmp_path, capsys):
    from imgx3d.config import load_config
    from imgx3d.training.race import RACE_FILE, race_minutes, race_run

    pauses, totals = race_minutes({"3d": 10.0, "2d": 16.0}, 0.25)
    assert pauses == {"3d": 2.5, "2d": 4.0}
    assert totals == {"3d": 6.0, "2d": 13.5}, "the loser's race minutes come off the winner's training"
    data = write_msd_dataset(tmp_path / "msd")
    common = [*TINY_OVERRIDES, "tracking.enabled=false", "train.max_minutes=10"]
    configs = {"wide": load_config(None, [*common, "method.channels=[8,16,32]"]),
               "narrow": load_config(None, [*common, "seed=3"])}
    result = race_run(configs, data, tmp_path / "run", share=0.0, records={"wide": {"plan.yaml": "wide\n"}})
    race = json.loads((tmp_path / "run" / RACE_FILE).read_text())
    scores = {name: entry["val_dice"] for name, entry in race["candidates"].items()}
    assert set(scores) == {"wide", "narrow"} and race["winner"] == max(scores, key=scores.get)
    loser = ({"wide", "narrow"} - {race["winner"]}).pop()
    assert (tmp_path / "run" / "race" / loser / "last.pt").is_file()
    assert not (tmp_path / "run" / "race" / race["winner"]).exists(), "the winner's run became the run folder"
    assert result.run_dir == tmp_path / "run" and result.steps == 6 and (tmp_path / "run" / "best.pt").is_file()
    kept = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert kept["method"]["channels"] == configs[race["winner"]].method.channels
    assert f"race: {race['winner']} continues" in capsys.readouterr().out


def _fixed_timer(monkeypatch):
    """Measured step times made deterministic, so two plans of the same inputs are equal."""
    from imgx3d.planning import planner

    monkeypatch.setattr(planner, "measured_step_seconds", lambda device, clock=None: (lambda cfg: 0.05))
    monkeypatch.setattr(planner, "measured_pass_seconds", lambda device, clock=None: (lambda cfg, shape: 0.01))


def test_the_cli_and_the_python_api_resolve_the_same_config(tmp_path, monkeypatch):
    from imgx3d.cli import _load_overrides, build_parser
    from imgx3d.config import to_dict
    from imgx3d.planning import plan_dataset
    from imgx3d.planning.resolve import resolve_planned

    _fixed_timer(monkeypatch)
    data = write_msd_dataset(tmp_path / "msd")
    args = build_parser().parse_args(["train", "--data", str(data), "--budget", "2m", "--seed", "4", "--no-track",
                                      "train.lr=0.001"])
    from_cli = _load_overrides(args)
    overrides = ["train.lr=0.001", "seed=4", "tracking.enabled=false"]
    from_api = resolve_planned(plan_dataset(data, budget="2m"), overrides)
    cli, api = to_dict(from_cli.config), to_dict(from_api.config)
    minutes = cli["train"].pop("max_minutes"), api["train"].pop("max_minutes")  # less each one's planning time
    assert cli == api
    assert all(1.0 <= m < 2.0 for m in minutes) and from_cli.config.train.lr == 0.001


def test_train_image_without_a_config_plans_and_trains_a_2d_unet(tmp_path, monkeypatch):
    """``imgx3d train --image --data DIR --budget ...`` with no config: the images are planned as 2D (they
    were planned as volumes before the one resolver), trained, and the test split written as PNGs."""
    from PIL import Image

    from imgx3d.cli import main

    _fixed_timer(monkeypatch)
    rng = np.random.default_rng(0)
    root = tmp_path / "pngs"
    (root / "image").mkdir(parents=True)
    (root / "label").mkdir()
    yy, xx = np.mgrid[:48, :48]
    for i in range(8):
        centre = rng.uniform(14, 34, 2)
        mask = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < 64).astype(np.uint8) * 255
        image = np.clip(80 + 100 * (mask > 0) + rng.normal(0, 12, mask.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "image" / f"{i}.png")
        Image.fromarray(mask).save(root / "label" / f"{i}.png")
    assert main(["train", "--image", "--data", str(root), "--budget", "2m", "--no-track", "--run-dir",
                 str(tmp_path / "run"), "data.mask_threshold=127", "train.max_steps=4", "train.val_every=2",
                 "data.num_workers=0"]) == 0
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (cfg["data"]["mode"], cfg["method"]["spatial_dims"]) == ("image", 2)
    assert cfg["data"]["slices"]["size"] == [48, 48]
    assert sorted(p.suffix for p in (tmp_path / "run" / "test_predictions").iterdir()) == [".png", ".png"]


def test_tta_is_dropped_until_a_case_predicts_within_its_share_of_the_budget():
    """Shifts go first, then mirrors; the seconds per case and the whole run's minutes are planned from the
    measured pass, so planning, training and what follows keep to the budget."""
    from imgx3d.planning.planner import PREDICT_SHARE, PREDICT_TOTAL_SHARE, plan

    fp = _fingerprint([35, 50, 36], [1.0] * 3, cases=10)  # 2 test cases, 1 validation case
    cheap = plan(fp, "unet", 20.0, step_timer=lambda cfg: 0.05, pass_timer=lambda cfg, shape: 0.05)
    assert (cheap.config().infer.tta_flips, cheap.config().infer.tta_shifts) == ([0, 1, 2], 2)
    assert cheap.planned["predict_seconds_per_case"] == pytest.approx(0.05 * 8 * 2)
    limit = PREDICT_SHARE * 60 * 20.0  # 12 s a case
    costly = plan(fp, "unet", 20.0, step_timer=lambda cfg: 0.05, pass_timer=lambda cfg, shape: limit / 3)
    cfg = costly.config()
    assert (cfg.infer.tta_flips, cfg.infer.tta_shifts) == ([0], 1), "2 passes of a third of the limit fit, 4 do not"
    assert costly.planned["predict_seconds_per_case"] == pytest.approx(2 * limit / 3)
    # after training: 1 validation pass + 3 cases x 2 passes of 4 s = 28 s
    assert cfg.train.max_minutes == pytest.approx(20.0 - 28 / 60, abs=0.02)
    assert any(d.key == "planned.predict_seconds_per_case" for d in costly.decisions)

    # 40 cases (8 test, 3 validation): 11 cases of 2 passes and 3 of 1 would take 100 s, over 5 % of the budget
    # (60 s), though each case is within its 12 s: one pass a case (3 x 4 + 11 x 4 = 56 s)
    many = plan(_fingerprint([35, 50, 36], [1.0] * 3, cases=40), "unet", 20.0, step_timer=lambda cfg: 0.05,
                pass_timer=lambda cfg, shape: limit / 3)
    cfg = many.config()
    assert (cfg.infer.tta_flips, cfg.infer.tta_shifts) == ([], 1)
    assert cfg.train.max_minutes == pytest.approx(20.0 - 56 / 60, abs=0.02)
    reason = next(d.reason for d in many.decisions if d.key == "planned.predict_seconds_per_case")
    assert f"{PREDICT_TOTAL_SHARE:.0%} of the budget for the 3 validation and 8 test cases" in reason


def test_axes_along_which_classes_keep_their_order_are_not_mirrored():
    """Unnamed classes (converted cardiac data: 'label_1', 'label_2'): the right ventricle lies beside the
    left one along axis 0 in every case, at random heights along axis 2; only axis 0 keeps its order."""
    from imgx3d.planning.planner import ordered_axes, plan

    rng = np.random.default_rng(0)
    fp = _fingerprint([128, 128, 10], [1.5, 1.5, 8.0], cases=12)
    fp.classes = [ClassStats(1, "label_1", 12, 300.0, [10.0, 10.0, 4.0]),
                  ClassStats(2, "label_2", 12, 300.0, [10.0, 10.0, 4.0])]
    for case in fp.cases:
        z = rng.uniform(3, 7, 2)
        case.centroids = {"1": [40.0 + rng.uniform(-3, 3), 64.0, z[0]], "2": [70.0, 64.0 + rng.uniform(-3, 3), z[1]]}
    axes, evidence = ordered_axes(fp)
    assert axes == [0] and "label_1 on the - side of label_2 in 100% of 12 cases" in evidence
    cfg = plan(fp, "unet", 20.0, step_timer=lambda cfg: 0.05).config()
    assert cfg.data.flip_axes == [1, 2] and cfg.infer.tta_flips == [1, 2]
    fp.cases[0].centroids["1"][0] = 90.0  # one case in twelve the other way round: 92 % < 95 %, mirrored again
    assert ordered_axes(fp)[0] == []


def test_every_rule_quotes_its_measurement_from_the_evidence_table():
    """The planner's figures live in evidence.yaml: every entry complete and quoted somewhere in the planner,
    every quoted key in the table, no test-Dice figure left in the planner's code, and a plan's reason
    carries the entry's finding as written there."""
    import re

    from imgx3d.planning import planner
    from imgx3d.planning.evidence import FIELDS, evidence, table
    from imgx3d.planning.planner import plan

    source = Path(planner.__file__).read_text(encoding="utf-8")
    quoted = set(re.findall(r"quote_evidence\('(\w+)'\)", source)) | set(re.findall(r"\(evidence: (\w+)\)", source))
    assert quoted == set(table()), "an entry no rule quotes, or a rule quoting a missing entry"
    assert all(all(entry.get(f) for f in FIELDS) for entry in table().values())
    assert not re.search(r"\d\.\d{3,4} test Dice|test Dice [+-]?\d", source), "a figure in the planner's code"
    assert evidence("tta_shifts").startswith("on the hippocampus at 30 CPU-minutes (3 seeds): +0.0045 test Dice")
    fp = _fingerprint([35, 50, 36], [1.0] * 3, cases=40)
    reasons = {d.key: d.reason for d in plan(fp, "unet", 20.0, step_timer=lambda cfg: 0.05).decisions}
    assert table()["translate"]["finding"] in reasons["data.translate"]
