"""``imgx3d study``: one plan for every method, each trained on it, a comparison at the end, and
an interrupted study resuming where it stopped."""

from __future__ import annotations

import json

import pytest

from imgx3d.cli import main
from imgx3d.errors import ConfigError
from imgx3d.training import study as study_module
from imgx3d.training.study import check_methods

SMALL = ["method.channels=[4,8,16]", "method.strides=[2,2]", "method.num_res_units=0", "data.patch_size=[16,16,16]",
         "train.max_steps=2", "train.val_every=2", "train.checkpoint_every=2", "train.max_minutes=0",
         "data.batch_size=2", "data.num_workers=0", "train.warmup_steps=0"]


def test_a_study_plans_once_trains_each_method_compares_and_resumes(msd_dataset, tmp_path, monkeypatch):
    folder, uri = tmp_path / "study", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["study", "--data", str(msd_dataset), "--methods", "unet,imgx", "--budget", "600m", "--device", "cpu",
            "--study-dir", str(folder), "--tracking-uri", uri, *SMALL]
    train_run = study_module.train_run

    def interrupted(cfg, *args, **kwargs):  # the machine stops while the second method trains
        if cfg.method.name == "imgx":
            raise KeyboardInterrupt
        return train_run(cfg, *args, **kwargs)

    monkeypatch.setattr(study_module, "train_run", interrupted)
    assert main(argv) == 130, "Ctrl-C: the CLI's interrupted exit"
    assert (folder / "unet" / "result.json").is_file() and not (folder / "imgx" / "result.json").exists()
    plans = {p.name: p.stat().st_mtime_ns for p in (folder / "plans").glob("*.yaml")}
    assert set(plans) == {"unet.yaml", "imgx.yaml"}, "every method planned at once, before any training"
    unet_weights = (folder / "unet" / "best.pt").stat().st_mtime_ns

    monkeypatch.setattr(study_module, "train_run", train_run)
    assert main(argv) == 0
    assert (folder / "unet" / "best.pt").stat().st_mtime_ns == unet_weights, "the finished method is not retrained"
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "plans").glob("*.yaml")} == plans, "the plans are reused"
    imgx, unet = (json.loads((folder / m / "result.json").read_text(encoding="utf-8")) for m in ("imgx", "unet"))
    table = (folder / "comparison" / "table.csv").read_text(encoding="utf-8")
    assert imgx["run_id"] in table and unet["run_id"] in table, "both runs in the comparison"
    assert (folder / "comparison" / "paired.csv").is_file()
    # one plan: the data section and split are the same for both methods
    configs = [(folder / m / "config.yaml").read_text(encoding="utf-8") for m in ("unet", "imgx")]
    assert [c[c.index("data:"):c.index("data:") + 400] for c in configs][0] == \
        [c[c.index("data:"):c.index("data:") + 400] for c in configs][1]
    assert (folder / "unet" / "split.json").read_text(encoding="utf-8") == (folder / "imgx" / "split.json").read_text(encoding="utf-8")


def test_a_study_refuses_methods_that_do_not_segment():
    with pytest.raises(ConfigError, match="pig: it does not segment"):
        check_methods(["unet", "pig"])
    with pytest.raises(ConfigError, match="named twice"):
        check_methods(["unet", "unet"])
    assert main(["study", "--data", ".", "--methods", "vae"]) == 2
