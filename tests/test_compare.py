"""compare: table statistics, paired tests, run selection, outputs; overlays."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy.stats import wilcoxon

from imgx3d.errors import Imgx3dError
from imgx3d.evaluation.compare import (
    RunRecord,
    compare,
    select_runs,
    to_markdown,
    write_csv,
)
from imgx3d.evaluation.plots import (
    metric_boxplots,
    overlay_montage,
    quality_vs_time,
    validation_curves,
)


def record(name: str, method: str, dice: list[float], val: float, seconds: float = 1.0) -> RunRecord:
    cases = {}
    for i, d in enumerate(dice):
        cases[(f"case{i}", "organ")] = {"dice": d, "iou": d / (2 - d), "hd95": 3 - 2 * d, "nsd": d}
        cases[(f"case{i}", "vessel")] = {"dice": d / 2, "iou": 0.1, "hd95": math.nan, "nsd": 0.5}
    return RunRecord(name, name, method, seconds, 10.0, 1e6, val, cases, [(100, val - 0.1), (200, val)])


def test_table_statistics_and_paired_test_against_the_reference():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.7, 0.9, 20)
    unet = record("unet", "unet", list(base), 0.8, seconds=0.5)
    better = record("imgx", "imgx", list(base + 0.02 + rng.normal(0, 0.005, 20)), 0.82, seconds=3.0)
    noise = record("noise", "imgx", list(base + rng.normal(0, 0.02, 20)), 0.79)
    result = compare([better, unet, noise])
    assert [r["run"] for r in result.rows] == ["unet", "imgx", "noise"]  # the reference (a unet) first
    mean, std = result.rows[1]["dice organ"]
    assert mean == pytest.approx(np.mean(list(better.values("dice", "organ").values())))
    assert std == pytest.approx(np.std(list(better.values("dice", "organ").values())))
    assert not math.isnan(result.rows[0]["hd95 mean"][0])  # the vessel's NaN HD95 is left out of the mean
    organ = {p["run"]: p for p in result.paired if p["class"] == "organ"}
    diff = np.array(list(better.values("dice", "organ").values())) - base
    assert organ["imgx"]["p_value"] == pytest.approx(wilcoxon(diff).pvalue)
    assert organ["imgx"]["p_value"] < 0.001 and organ["noise"]["p_value"] > 0.05
    text = to_markdown(result)
    assert "**0.500**" in text  # fastest seconds per volume marked
    best_dice = max(r["dice organ"][0] for r in result.rows)
    assert f"**{best_dice:.4f}" in text
    significant = [line for line in text.splitlines() if line.startswith("| imgx | organ |")]
    assert significant and significant[0].endswith(" * |")
    assert not [line for line in text.splitlines() if line.startswith("| noise | organ |") and line.endswith(" * |")]


def test_by_method_picks_on_validation_not_test():
    good_val_bad_test = record("a", "imgx", [0.5] * 5, val=0.9)
    bad_val_good_test = record("b", "imgx", [0.9] * 5, val=0.6)
    assert [r.name for r in select_runs([good_val_bad_test, bad_val_good_test], "method")] == ["a"]
    assert len(select_runs([good_val_bad_test, bad_val_good_test], "run")) == 2
    with pytest.raises(Imgx3dError, match="--reference"):
        compare([good_val_bad_test], reference="nope")


def test_outputs_and_plots_are_written(tmp_path, monkeypatch):
    from imgx3d.evaluation import plots

    runs = [record("unet", "unet", [0.8, 0.85, 0.9], 0.8, seconds=2.0),
            record("imgx", "imgx", [0.82, 0.8, 0.91], 0.81, seconds=9.0)]
    result = compare(runs)
    write_csv(result, tmp_path / "table.csv", tmp_path / "paired.csv")
    header = (tmp_path / "table.csv").read_text().splitlines()[0]
    assert "dice organ,dice organ std" in header and "n_parameters" in header
    assert len((tmp_path / "paired.csv").read_text().splitlines()) == 1 + 3  # organ, vessel, mean

    figures = {}
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.setdefault(path.name, fig) and real_save(fig, path))
    for path in (metric_boxplots(runs, "dice", tmp_path / "box.png"), quality_vs_time(result, tmp_path / "t.png"),
                 validation_curves(runs, tmp_path / "v.png")):
        assert Image.open(path).size[0] > 200
    # what is drawn is the data: one panel per class, one box per run with that run's median
    organ, vessel = figures["box.png"].axes
    assert organ.get_title() == "organ" and vessel.get_title() == "vessel"
    medians = [line.get_ydata()[0] for line in organ.lines if len(line.get_xdata()) == 2
               and line.get_xdata()[0] != line.get_xdata()[1] and line.get_color() in ("C1", "#ff7f0e", "orange")]
    assert medians == pytest.approx([0.85, 0.82])
    assert [t.get_text() for t in organ.get_xticklabels()] == ["unet", "imgx"]
    [ax] = figures["t.png"].axes  # Dice against seconds, one point per run
    points = [(line.get_xdata()[0], line.get_ydata()[0]) for line in ax.lines if line.get_marker() == "o"]
    assert points == pytest.approx([(2.0, result.rows[0]["dice mean"][0]), (9.0, result.rows[1]["dice mean"][0])])
    [ax] = figures["v.png"].axes
    assert [list(line.get_xdata()) for line in ax.lines] == [[100, 200], [100, 200]]
    assert [y for line in ax.lines for y in line.get_ydata()] == pytest.approx([0.7, 0.8, 0.71, 0.81])


def test_overlay_montage_picks_slices_with_foreground(tmp_path):
    image = np.random.default_rng(0).normal(size=(32, 32, 20))
    pred = np.zeros((32, 32, 20), np.int64)
    pred[8:20, 8:20, 12:16] = 1
    ref = np.zeros_like(pred)
    ref[10:22, 8:20, 11:15] = 2
    path = overlay_montage(image, pred, {0: "background", 1: "a", 2: "b"}, tmp_path / "o.png", reference=ref)
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    reds = (picture[..., 0] > 200) & (picture[..., 1] < 80) & (picture[..., 2] < 100)  # class 1's contour colour
    assert reds.sum() > 50, "the prediction's contour is drawn"
    flat = overlay_montage(image[..., :1], pred[..., 12:13], {1: "a"}, tmp_path / "flat.png")
    assert Image.open(flat).size[0] > 100


def test_uncertainty_scores_are_compared_beside_dice():
    """Runs that logged test/uncertainty/* get the three columns (calibration error and the Spearman
    correlation best when lowest, error AUC when highest); a run without them shows n/a."""
    base = list(np.linspace(0.7, 0.9, 10))
    tta = record("unet_tta", "unet", base, 0.8)
    tta.uncertainty = {"ece": 0.008, "error_auc": 0.9773, "spearman_dice": -0.11}
    imgx = record("imgx", "imgx", base, 0.8)
    imgx.uncertainty = {"ece": 0.0095, "error_auc": 0.9838, "spearman_dice": 0.14}
    plain = record("old", "unet", base, 0.8)
    result = compare([tta, imgx, plain])
    assert result.columns.index("ece") < result.columns.index("seconds_per_volume")
    assert [r["ece"] for r in result.rows][:2] == [0.008, 0.0095] and math.isnan(result.rows[2]["ece"])
    lines = {line.split(" | ")[0].strip("| "): line for line in to_markdown(result).splitlines()[:5]}
    assert "**0.0080**" in lines["unet_tta"] and "**-0.1100**" in lines["unet_tta"]
    assert "**0.9838**" in lines["imgx"] and "n/a" in lines["old"]
    assert "ece" not in compare([plain]).columns, "no run logged them: no columns"


def test_overlay_montage_draws_the_uncertainty_below_the_contours(tmp_path):
    image = np.zeros((32, 32, 20))
    pred = np.zeros((32, 32, 20), np.int64)
    pred[8:20, 8:20, 12:16] = 1
    uncertainty = np.zeros((32, 32, 20))
    uncertainty[7:21, 7:21, 12:16] = 1.0
    uncertainty[9:19, 9:19, 12:16] = 0.0  # unsure on the boundary only
    plain = Image.open(overlay_montage(image, pred, {1: "a"}, tmp_path / "p.png"))
    both = Image.open(overlay_montage(image, pred, {1: "a"}, tmp_path / "u.png", uncertainty=uncertainty))
    assert both.size[1] > 1.6 * plain.size[1], "a second row"
    picture = np.asarray(both.convert("RGB")).astype(int)
    lower = picture[picture.shape[0] // 2:]
    bright = (lower[..., 0] > 200) & (lower[..., 1] > 150)  # inferno's top end: pale yellow
    assert bright.sum() > 100
