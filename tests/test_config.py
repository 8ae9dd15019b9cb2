from pathlib import Path

import pytest
import torch

from imgx3d.config import Config, load_config
from imgx3d.errors import ConfigError
from imgx3d.methods.base import build_method
from imgx3d.methods.imgx import ImgXConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_overrides_are_typed_yaml():
    cfg = load_config(None, ["train.lr=1e-3", "data.patch_size=[8,16,32]", "data.spacing=null", "seed=7"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.patch_size == [8, 16, 32]
    assert cfg.data.spacing is None
    assert cfg.seed == 7
    assert isinstance(cfg, Config)


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.max_step'"):
        load_config(None, ["train.max_step=3"])


def test_wrong_type_and_range_are_errors():
    with pytest.raises(ConfigError, match="train.max_steps' must be int"):
        load_config(None, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="infer.overlap"):
        load_config(None, ["infer.overlap=1.5"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.max_steps"])


def test_method_config_is_validated_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"unknown config key 'method\.colour'"):
        load_config(None, ["method.name=unet", "method.channels=[4,8]", "method.strides=[2]", "method.colour=red"])
    with pytest.raises(ConfigError, match=r"config key 'method\.recycling' must be one of max, next, none, got 'min'"):
        load_config(None, ["method.name=imgx", "method.recycling=min"])  # a Literal choice, checked at load
    with pytest.raises(ConfigError, match=r"config key 'method\.spatial_dims' must be one of 2, 3, got 4"):
        load_config(None, ["method.spatial_dims=4"])
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        build_method({"name": "nope"}, 3, 1)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_shipped_configs_load_and_build(path):
    cfg = load_config(path)
    method = build_method(cfg.method, num_classes=max(2, len(cfg.data.labels) or 3), in_channels=max(1, len(cfg.data.channels)))
    assert sum(p.numel() for p in method.parameters()) > 0


def test_extends_merges_sections_and_replaces_method(tmp_path):
    (tmp_path / "base.yaml").write_text("method: {name: unet, arch: dynunet}\ndata: {batch_size: 3, preset: ct}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmethod: {name: imgx}\ndata: {batch_size: 5}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.method == ImgXConfig()  # every imgx default; no 'arch' leaking from the unet section
    assert cfg.data.batch_size == 5 and cfg.data.preset == "ct"
    # the same method: its keys merge (a shipped config over its plan changes one key, keeps the topology)
    (tmp_path / "same.yaml").write_text("extends: base.yaml\nmethod: {channels: [8, 16, 32]}\n")
    same = load_config(tmp_path / "same.yaml").method
    assert (same.name, same.arch, same.channels) == ("unet", "dynunet", [8, 16, 32])
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")


def test_hippocampus_imgx_shares_the_unet_split_and_data():
    root = Path(__file__).resolve().parents[1] / "configs" / "hippocampus"
    unet, imgx = load_config(root / "unet.yaml"), load_config(root / "imgx.yaml")
    assert imgx.data == unet.data and imgx.infer == unet.infer
    assert imgx.train.max_minutes == unet.train.max_minutes
    assert imgx.method.name == "imgx" and imgx.method.train_steps == imgx.method.infer_steps == 5


def test_a_saved_config_is_complete_and_rebuilds_the_same_method(tmp_path):
    """config.yaml lists every field of the method's dataclass, and loading it alone gives the same config."""
    import dataclasses

    import yaml

    from imgx3d.config import save_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "brats" / "imgx.yaml")
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(saved["method"]) == [f.name for f in dataclasses.fields(ImgXConfig)], "every ImgXConfig field, in order"
    assert saved["method"]["sampler"] == "ddpm" and saved["method"]["schedule"]["beta_schedule"] == "linear"
    assert load_config(tmp_path / "config.yaml") == cfg
    torch.manual_seed(0)
    first = build_method(cfg.method, 3, 1).state_dict()
    torch.manual_seed(0)
    again = build_method(load_config(tmp_path / "config.yaml").method, 3, 1).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_predict_takes_checked_infer_overrides_only():
    from imgx3d.config import infer_overrides

    assert infer_overrides(["infer.tta_flips=[0,1]", "infer.overlap=0.25", "infer.streaming=on"]) == {
        "tta_flips": [0, 1], "overlap": 0.25, "streaming": "on"}
    assert infer_overrides(["infer.streaming=off"]) == {"streaming": "off"}  # YAML 1.1's boolean, read as the choice
    with pytest.raises(ConfigError, match="predict takes infer.* keys only"):
        infer_overrides(["train.max_steps=3"])
    with pytest.raises(ConfigError, match="'infer.tta_flips\\[0\\]' must be one of 0, 1, 2"):
        infer_overrides(["infer.tta_flips=[3]"])


def test_the_diffusion_schedule_is_one_nested_section_and_older_flat_keys_still_load():
    """Each diffusion method owns ``method.schedule`` with its published chain as the default; a partial
    section or override keeps the rest of that chain; configs and checkpoints written with the flat
    ``method.base_steps`` / ``beta_*`` keys load into it; a method without a chain refuses them."""
    from imgx3d.config import ScheduleConfig, method_config

    assert method_config({"name": "sdseg"}).schedule == ScheduleConfig("scaled_linear", 1000, 0.0015, 0.0155)
    assert method_config({"name": "darl"}).schedule == ScheduleConfig("linear", 2000, 1e-6, 1e-2)
    assert method_config({"name": "sdseg", "schedule": {"base_steps": 500}}).schedule == \
        ScheduleConfig("scaled_linear", 500, 0.0015, 0.0155), "the method's chain, not ScheduleConfig's defaults"
    legacy = method_config({"name": "siamese", "base_steps": 700, "beta_schedule": "linear"})
    assert legacy.schedule == ScheduleConfig("linear", 700, 0.00085, 0.012)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "hippocampus" / "sdseg.yaml",
                      ["method.beta_end=0.02"])
    assert cfg.method.schedule.beta_end == 0.02 and cfg.method.schedule.beta_start == 0.0015
    with pytest.raises(ConfigError, match="unknown config key 'method.base_steps'"):
        method_config({"name": "unet", "base_steps": 3})
