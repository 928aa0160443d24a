"""Config loading: strict keys, did-you-mean, typed overrides, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from detrkd.config import (ConfigError, DataConfig, OptimConfig, TrainConfig, dump_config, from_dict,
                           load_config, parse_override)

BASE = {"model": {"family": "deformable_detr", "preset": "tiny"}, "data": {"root": "data/digits"}}


def test_defaults_and_nested_dataclasses():
    cfg = load_config(BASE)
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.optim, OptimConfig)
    assert cfg.optim.lr == 1e-4 and cfg.optim.schedule == "cosine" and cfg.seed == 0
    assert cfg.data.split_paths("train") == ("data/digits/train", "data/digits/annotations/instances_train.json")
    assert cfg.data.split_paths("val") == ("data/digits/val", "data/digits/annotations/instances_val.json")


def test_absolute_data_paths_are_kept(tmp_path):
    cfg = load_config(BASE, [f"data.val_ann={tmp_path}/x.json"])
    assert cfg.data.split_paths("val")[1] == f"{tmp_path}/x.json"


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "optim": {"lr": 2e-4, "epochs": 3}}))
    cfg = load_config(path, ["optim.lr=3e-4", "optim.step_epochs=[2, 3]", "model.num_queries=50",
                             "model.overrides.dropout=0.0", "threads=2", "amp=true", "optim.max_steps=null"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # YAML reads "3e-4" as a string
    assert cfg.optim.epochs == 3 and cfg.optim.step_epochs == [2, 3]
    assert cfg.model.num_queries == 50 and cfg.model.overrides == {"dropout": 0.0}
    assert cfg.threads == 2 and cfg.amp is True and cfg.optim.max_steps is None


def test_int_is_accepted_for_float():
    assert load_config(BASE, ["optim.gamma=1"]).optim.gamma == 1.0


@pytest.mark.parametrize("raw, message", [
    ({**BASE, "optim": {"lrr": 1e-3}},
     "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ({**BASE, "optimizer": {}}, "unknown config key 'optimizer'; did you mean 'optim'?"),
    ({**BASE, "data": {"root": "x", "batchsize": 2}}, "did you mean 'data.batch_size'?"),
    ({**BASE, "zzz": 1}, "unknown config key 'zzz' (valid keys at the top level: model, data, optim"),
])
def test_unknown_keys_are_rejected_with_a_suggestion(raw, message):
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    assert message in str(err.value)


def test_unknown_key_lists_valid_keys_of_its_level():
    with pytest.raises(ConfigError, match=r"valid keys in 'optim': lr, backbone_lr, weight_decay"):
        load_config(BASE, ["optim.learning_rate=1"])


@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "optim.lr: expected float, got 'abc'"),
    ("optim.epochs=2.5", "optim.epochs: expected int, got 2.5"),
    ("optim.epochs=true", "optim.epochs: expected int, got True"),
    ("amp=1", "amp: expected bool, got 1"),
    ("optim.schedule=linear", "optim.schedule: expected one of 'cosine', 'step', got 'linear'"),
    ("optim.step_epochs=8", "optim.step_epochs: expected list[int], got 8"),
    ("optim.step_epochs=[8, x]", "optim.step_epochs[1]: expected int, got 'x'"),
    ("optim.max_steps=soon", "optim.max_steps: expected int | None, got 'soon'"),
    ("model.preset=null", "model.preset is required (tiny, small, base) unless model.pretrained"),
    ("model=3", "model: expected a mapping, got 3"),
    ("model.overrides=3", "model.overrides: expected a mapping, got 3"),
    ("optim.epochs=0", "optim.epochs must be >= 1"),
    ("data.batch_size=0", "data.batch_size must be >= 1"),
])
def test_override_type_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(BASE, [override])
    assert str(err.value) == message or message in str(err.value)


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim.lr:3"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(BASE, [bad])


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="'seed' is a value, not a section"):
        load_config({**BASE, "seed": 1}, ["seed.x=1"])


def test_missing_required_keys():
    with pytest.raises(ConfigError, match="model.preset is required"):
        load_config({"model": {"family": "detr"}, "data": {"root": "x"}})
    with pytest.raises(ConfigError, match="missing required config key 'data.root'"):
        load_config({"model": {"family": "detr", "preset": "tiny"}})
    assert load_config(None, ["model.family=detr", "model.preset=tiny", "data.root=x"]).data.root == "x"


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(scalar)


def test_dict_source_is_not_modified():
    raw = {"model": {"family": "detr", "preset": "tiny"}, "data": {"root": "x"}}
    load_config(raw, ["model.preset=small"])
    assert raw["model"]["preset"] == "tiny"


def test_dump_round_trip(tmp_path):
    cfg = load_config(BASE, ["optim.lr=3e-4", "model.overrides.dropout=0.1", "optim.schedule=step"])
    path = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg


def test_parse_override_uses_yaml():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a={x: 1}") == ("a", {"x": 1})
    assert parse_override("a=") == ("a", None)
    assert parse_override("a=x=y") == ("a", "x=y")


@dataclasses.dataclass
class Teacher:
    checkpoint: str
    weight: float = 1.0


@dataclasses.dataclass
class Distill:
    teacher: Teacher
    data: DataConfig
    methods: list[str] = dataclasses.field(default_factory=list)


def test_loader_is_generic_over_dataclass_trees():
    cfg = load_config({"teacher": {"checkpoint": "t.pt"}, "data": {"root": "d"}},
                      ["teacher.weight=2", "methods=[qskd]"], schema=Distill)
    assert cfg.teacher.weight == 2.0 and cfg.methods == ["qskd"]
    with pytest.raises(ConfigError, match="did you mean 'teacher.weight'"):
        from_dict(Distill, {"teacher": {"checkpoint": "t", "wieght": 1}, "data": {"root": "d"}})


def test_a_stored_config_with_old_per_term_weights_reads_as_terms():
    """Runs written before the weights moved to the Distiller stored ``weights: [c, l1, giou]`` (and
    active sampling's ``*_weight``): read back, they are the same run's ``terms``, so a resume with
    today's config reports no change; today's config files load with the method options validated."""
    from detrkd.config import with_predated
    from detrkd.distill.methods import method_options
    from detrkd.engine import config_changes

    old = {"model": {"family": "rt_detr"}, "methods": {
        "kd_detr": {"weight": 1.0, "points": "both", "weights": [1.0, 5.0, 2.0]},
        "active_sampling": {"weight": 1.0, "sampling_weight": 1.0, "bbox_weight": 5.0, "cls_weight": 1.0},
        "agfd": {"weight": 50.0}}}
    new = with_predated(old)
    assert new["methods"]["kd_detr"] == {"weight": 1.0, "points": "both",
                                         "terms": {"cls": 1.0, "l1": 5.0, "giou": 2.0}}
    assert new["methods"]["active_sampling"] == {"weight": 1.0, "terms": {"sampling": 1.0, "l1": 5.0, "cls": 1.0}}
    assert new["methods"]["agfd"] == {"weight": 50.0} and new["model"]["pixels"] == "imagenet"
    assert old["methods"]["kd_detr"]["weights"] == [1.0, 5.0, 2.0]  # the input is not modified
    repo = Path(__file__).resolve().parents[1]  # today's files name the same per-term weights
    for name in ("kd_detr", "active_sampling"):
        today = yaml.safe_load((repo / "configs" / f"digits_{name}.yaml").read_text())["methods"]
        changes = config_changes(with_predated(old)["methods"][name], today[name])
        assert changes and not [k for k in changes if k.startswith("terms")], (name, changes)
        options, weights = method_options(name, today[name])
        assert "terms" not in options and weights.terms == new["methods"][name]["terms"]
