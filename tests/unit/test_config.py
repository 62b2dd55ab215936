"""Unit tests for elfish_mpi.config: defaults, TOML loading, --set overrides, validation."""
from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch

from elfish_mpi import config as cfgmod
from elfish_mpi.config import Config, ConfigError
from elfish_mpi.config import SECTIONS, load_config, parse_override

torch.set_num_threads(1)

REPO = pathlib.Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "launch" / "configs" / "quickstart.toml"


def _write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


# -- defaults ---------------------------------------------------------------


def test_defaults_are_valid_and_documented_values():
    # Prepare / Execute
    cfg = Config()
    loaded = load_config()

    # Assert
    assert cfg == loaded
    assert cfg.run.rounds == 20
    assert cfg.strategy.name == "elfish"
    assert cfg.strategy.aggregation == "balanced"
    assert cfg.workers.capacity == []
    assert cfg.capacities(3) == [1.0, 1.0, 1.0]
    cfg.check_world(4)  # no capacity / keep_ratios lists: any world size is fine


# -- TOML file and overrides ------------------------------------------------------


def test_toml_file_values_are_loaded(tmp_path):
    # Prepare
    path = _write(
        tmp_path,
        """
[run]
rounds = 3
out = "runs/x"
[train]
lr = 0.01
batch_size = 8
[workers]
capacity = [1.0, 0.5]
throttle = "virtual"
[strategy]
name = "fedavg"
replan = false
keep_ratios = [1, 0.5]
""",
    )

    # Execute
    cfg = load_config(path)

    # Assert
    assert cfg.run.rounds == 3
    assert cfg.run.out == "runs/x"
    assert cfg.train.lr == 0.01
    assert cfg.train.batch_size == 8
    assert cfg.workers.capacity == [1.0, 0.5]
    assert cfg.workers.throttle == "virtual"
    assert cfg.strategy.name == "fedavg"
    assert cfg.strategy.replan is False
    assert cfg.strategy.keep_ratios == [1.0, 0.5]
    assert all(isinstance(r, float) for r in cfg.strategy.keep_ratios)
    # untouched keys keep their defaults
    assert cfg.model.name == "lenet"
    assert cfg.train.local_steps == Config().train.local_steps


def test_overrides_win_over_the_file(tmp_path):
    # Prepare
    path = _write(tmp_path, "[run]\nrounds = 3\n[train]\nlr = 0.01\n")

    # Execute
    cfg = load_config(path, ["run.rounds=7", "train.momentum=0.9"])

    # Assert
    assert cfg.run.rounds == 7
    assert cfg.train.lr == 0.01
    assert cfg.train.momentum == 0.9


@pytest.mark.parametrize(
    "text, expected",
    [
        ("run.rounds=5", ("run", "rounds", 5)),
        ("train.lr=1e-3", ("train", "lr", 1e-3)),
        ("train.lr = 0.25", ("train", "lr", 0.25)),
        ("workers.capacity=[1.0, 0.5, 0.25]", ("workers", "capacity", [1.0, 0.5, 0.25])),
        ('run.out="runs/a b"', ("run", "out", "runs/a b")),
        ("run.out=runs/abc", ("run", "out", "runs/abc")),
        ("strategy.replan=false", ("strategy", "replan", False)),
        ("strategy.replan=true", ("strategy", "replan", True)),
        ("strategy.name=fedavg", ("strategy", "name", "fedavg")),
        ("data.name=fashion-mnist", ("data", "name", "fashion-mnist")),
        ("data.path=", ("data", "path", "")),
        ("run.out=a=b", ("run", "out", "a=b")),
    ],
)
def test_parse_override_types(text, expected):
    # Execute
    section, key, value = parse_override(text)

    # Assert
    assert (section, key, value) == expected
    assert type(value) is type(expected[2])


def test_overrides_of_every_type_reach_the_config():
    # Execute
    cfg = load_config(
        None,
        [
            "run.rounds=4",
            "train.lr=0.5",
            "workers.capacity=[1.0, 0.25]",
            "workers.throttle=none",
            "strategy.name=fedavg",
            "strategy.replan=false",
            "strategy.mask_policy=rolling",
            "strategy.transport=reduce",
            "run.overlap_eval=false",
            "run.out=runs/abc",
        ],
    )

    # Assert
    assert cfg.run.rounds == 4
    assert cfg.train.lr == 0.5
    assert cfg.workers.capacity == [1.0, 0.25]
    assert cfg.workers.throttle == "none"
    assert cfg.strategy.name == "fedavg"
    assert cfg.strategy.replan is False
    assert cfg.strategy.mask_policy == "rolling"
    assert cfg.strategy.transport == "reduce" and Config().strategy.transport == "gather"
    assert cfg.run.overlap_eval is False and Config().run.overlap_eval is True
    assert cfg.run.out == "runs/abc"


# -- invalid values ------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("data.name=imagenet", "data.name", cfgmod.DATA_NAMES),
        ("data.partition=random", "data.partition", cfgmod.PARTITIONS),
        ("strategy.name=fedprox", "strategy.name", cfgmod.STRATEGIES),
        ("strategy.aggregation=mean", "strategy.aggregation", cfgmod.AGGREGATIONS),
        ("strategy.mask_policy=magnitude", "strategy.mask_policy", cfgmod.MASK_POLICIES),
        ("strategy.transport=allreduce", "strategy.transport", cfgmod.TRANSPORTS),
        ("workers.throttle=busy", "workers.throttle", cfgmod.THROTTLES),
        ("model.name=resnet", "model.name", cfgmod.MODEL_NAMES),
    ],
)
def test_bad_choice_names_key_and_allowed_values(override, key, allowed):
    # Execute
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])

    # Assert
    message = str(info.value)
    assert key in message
    for choice in allowed:
        assert choice in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("run.rounds=0", "run.rounds"),
        ("run.rounds=-3", "run.rounds"),
        ("run.rounds=2.5", "run.rounds"),
        ("run.rounds=true", "run.rounds"),
        ("run.seed=-1", "run.seed"),
        ("train.lr=-0.1", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("train.momentum=1.0", "train.momentum"),
        ("train.batch_size=0", "train.batch_size"),
        ("workers.capacity=[0]", "workers.capacity[0]"),
        ("workers.capacity=[1.0, 1.5]", "workers.capacity[1]"),
        ("workers.capacity=[1.0, -0.5]", "workers.capacity[1]"),
        ("workers.match_seconds=-1", "workers.match_seconds"),
        ("workers.match_seconds=nan", "workers.match_seconds"),
        ("workers.capacity=0.5", "workers.capacity"),
        ("strategy.keep_ratios=[0.5, 0]", "strategy.keep_ratios[1]"),
        ("strategy.keep_ratios=[1.1]", "strategy.keep_ratios[0]"),
        ("strategy.min_keep=0", "strategy.min_keep"),
        ("strategy.min_keep=1.5", "strategy.min_keep"),
        ("strategy.replan=yes", "strategy.replan"),
        ("strategy.deadline=-1", "strategy.deadline"),
        ("checkpoint.every=0", "checkpoint.every"),
        ("run.overlap_eval=1", "run.overlap_eval"),
        ('run.overlap_eval="false"', "run.overlap_eval"),
        ("data.alpha=0", "data.alpha"),
    ],
)
def test_out_of_range_values_name_the_key(override, key):
    # Execute
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])

    # Assert
    assert key in str(info.value)


def test_unknown_section_in_file_lists_allowed_sections(tmp_path):
    # Prepare
    path = _write(tmp_path, "[optimizer]\nlr = 0.1\n")

    # Execute
    with pytest.raises(ConfigError) as info:
        load_config(path)

    # Assert
    message = str(info.value)
    assert "optimizer" in message
    for section in SECTIONS:
        assert section in message


def test_unknown_section_in_override():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optimizer.lr=0.1"])
    assert "optimizer" in str(info.value)
    assert "strategy" in str(info.value)


def test_unknown_key_names_section_key_and_allowed_keys(tmp_path):
    # Prepare
    path = _write(tmp_path, "[train]\nlearning_rate = 0.1\n")

    # Execute
    with pytest.raises(ConfigError) as info:
        load_config(path)

    # Assert
    message = str(info.value)
    assert "train.learning_rate" in message
    for f in dataclasses.fields(cfgmod.TrainConfig):
        assert f.name in message


def test_unknown_key_in_override():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["run.roundz=3"])
    assert "run.roundz" in str(info.value)


@pytest.mark.parametrize("text", ["run.rounds", "rounds=5", "", "run.rounds 5"])
def test_malformed_override_raises(text):
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    assert "section.key=value" in str(info.value)
    with pytest.raises(ConfigError):
        load_config(None, [text])


def test_invalid_toml_file_raises_config_error(tmp_path):
    # Prepare
    path = _write(tmp_path, "[run\nrounds = = 3\n")

    # Execute
    with pytest.raises(ConfigError) as info:
        load_config(path)

    # Assert
    assert "not valid TOML" in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_raises_config_error(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "does not exist" in str(info.value)
    assert str(path) in str(info.value)


def test_directory_as_file_raises_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path)


def test_section_that_is_not_a_table_raises():
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"run": 5})
    assert "[run]" in str(info.value)


def test_override_into_a_section_that_is_not_a_table_raises_config_error(tmp_path):
    # Prepare
    path = _write(tmp_path, "run = 5\n")

    # Execute / Assert
    with pytest.raises(ConfigError) as info:
        load_config(path, ["run.rounds=3"])
    assert "run" in str(info.value)


def test_npz_without_path_is_rejected():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.name=npz"])
    assert "data.path" in str(info.value)


# -- world-size checks -------------------------------------------------------------


def test_check_world_capacity_length_mismatch():
    # Prepare
    cfg = load_config(None, ["workers.capacity=[1.0, 0.5, 0.25]"])

    # Execute / Assert
    cfg.check_world(3)
    with pytest.raises(ConfigError) as info:
        cfg.check_world(2)
    assert "workers.capacity" in str(info.value)
    assert "3" in str(info.value) and "2" in str(info.value)


def test_check_world_keep_ratios_length_mismatch():
    # Prepare
    cfg = load_config(None, ["strategy.keep_ratios=[1.0, 0.5]"])

    # Execute / Assert
    cfg.check_world(2)
    with pytest.raises(ConfigError) as info:
        cfg.check_world(3)
    assert "strategy.keep_ratios" in str(info.value)


def test_check_world_keep_ratio_below_min_keep():
    cfg = load_config(None, ["strategy.keep_ratios=[1.0, 0.2]", "strategy.min_keep=0.25"])
    with pytest.raises(ConfigError) as info:
        cfg.check_world(2)
    assert "min_keep" in str(info.value)


def test_check_world_needs_a_worker():
    with pytest.raises(ConfigError):
        Config().check_world(0)


# -- documentation and serialisation ---------------------------------------------


def test_describe_mentions_every_key_and_its_doc():
    # Execute
    text = Config.describe()

    # Assert
    for name, section_cls in SECTIONS.items():
        assert f"[{name}]" in text
        for f in dataclasses.fields(section_cls):
            assert f"{name}.{f.name} =" in text
            assert f.metadata["doc"] in text


def test_to_dict_from_dict_round_trip():
    # Prepare
    cfg = load_config(
        None,
        ["run.rounds=9", "workers.capacity=[1.0, 0.5]", "strategy.keep_ratios=[1.0, 0.5]", "strategy.replan=false"],
    )

    # Execute
    raw = cfg.to_dict()
    back = Config.from_dict(raw)
    via_json = cfgmod.config_from_json(cfg.to_json())

    # Assert
    assert set(raw) == set(SECTIONS)
    assert back == cfg
    assert via_json == cfg


def test_quickstart_config_loads():
    # Execute
    cfg = load_config(QUICKSTART)

    # Assert
    assert cfg.workers.capacity == [1.0, 1.0, 0.5, 0.25]
    assert cfg.strategy.name == "elfish"
    cfg.check_world(len(cfg.workers.capacity))


# -- run.threads under SLURM ---------------------------------------------------


def test_threads_follow_slurm_cpus_per_task_when_not_set(monkeypatch, tmp_path):
    # Prepare: a job submitted with --cpus-per-task=3, a config that leaves run.threads out
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    path = _write(tmp_path, "[run]\nrounds = 2\n")

    # Execute / Assert
    assert load_config(path).run.threads == 3
    assert load_config(None).run.threads == 3
    assert load_config(None, ["run.rounds=4"]).run.threads == 3


def test_explicit_threads_win_over_slurm_cpus_per_task(monkeypatch, tmp_path):
    # Prepare
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    path = _write(tmp_path, "[run]\nthreads = 1\n")

    # Execute / Assert: the file, then --set, are explicit choices
    assert load_config(path).run.threads == 1
    assert load_config(path, ["run.threads=2"]).run.threads == 2
    assert load_config(None, ["run.threads=2"]).run.threads == 2


def test_threads_default_to_one_outside_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert load_config(None).run.threads == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "")
    assert load_config(None).run.threads == 1


@pytest.mark.parametrize("value", ["0", "two", "-1", "2.5"])
def test_bad_slurm_cpus_per_task_is_named(monkeypatch, value):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", value)
    with pytest.raises(ConfigError, match="SLURM_CPUS_PER_TASK"):
        load_config(None)
