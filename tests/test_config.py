import pytest

from fedmm.core.config import config_from_flat, load_config, to_flat
from fedmm.core.schema import DEFAULT_PROFILES, ConfigError


def test_defaults_are_valid_and_use_the_default_profiles():
    run = load_config()
    assert run.clients.profiles == DEFAULT_PROFILES
    assert run.rounds >= 1 and run.clients.num >= 10


def test_overrides_are_typed():
    run = load_config(overrides=["train.lr=0.01", "rounds=3", "model.lora_target_modules=query,value"])
    assert run.train.lr == 0.01 and run.rounds == 3
    assert run.model.lora_target_modules == ["query", "value"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("nosuch=1", "unknown config key 'nosuch'"),
        ("train.lr=abc", "'train.lr'"),
        ("train.lr=-1", "'train.lr' must be > 0"),
        ("rounds=0", "'rounds' must be > 0"),
        ("data.partitioner=shards", "'data.partitioner' must be one of"),
        ("strategy.fraction_train=1.5", "'strategy.fraction_train' must be in (0, 1]"),
        ("clients.profiles.x=img_shape,nosuch", "unknown task 'nosuch'"),
        ("train.device=tpu", "'train.device'"),
        ("model.fusion_heads=5", "'model.fusion_dim' must be divisible"),
        ("train.local_epochs=1", "exactly one of"),
        ("data.source=hf", "'data.hf_name' is required"),
        ("novalue", "not of the form key=value"),
        ("train.local_steps=2", "'train.local_steps' must be >= 3"),
        ("data.hf_task=my.task", "'data.hf_task'"),
        ("clients.profiles.a+b=vqa", "profile names"),
        ("data.examples_per_client=10", "'data.examples_per_client'=10 is too small"),
        ("clients.num=200", "'data.examples_per_task'=1800 is too small"),
        ("defense.behaviour_max_clients=2", "'defense.behaviour_max_clients' must be 0"),
        ("defense.behaviour_max_clients=-1", "'defense.behaviour_max_clients' must be 0"),
        ("clients.lora_ranks=2,16", "'clients.lora_ranks': each rank must be an integer in 1..model.lora_r (8), got 16"),
        ("clients.lora_ranks=0", "'clients.lora_ranks'"),
        ("strategy.lora_aggregation=svd", "'strategy.lora_aggregation' must be one of"),
        ("clients.speed_spread=0.5", "'clients.speed_spread' must be >= 1"),
        ("strategy.async_clock=wall", "'strategy.async_clock' must be one of"),
        ("strategy.max_staleness=-1", "'strategy.max_staleness'"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_generated_client_data_lifts_the_shared_dataset_limit_but_needs_synthetic_data():
    assert load_config(overrides=["clients.num=10000", "data.examples_per_client=40"]).clients.num == 10000
    with pytest.raises(ConfigError, match="needs data.source=synthetic"):
        load_config(overrides=["data.examples_per_client=40", "data.source=hf", "data.hf_name=x",
                               "data.hf_num_classes=2", "data.hf_text_column=t"])


def test_profiles_given_by_user_replace_the_defaults():
    run = load_config(overrides=["clients.profiles.all=img_shape,txt_color,vqa"])
    assert run.clients.profiles == {"all": ["img_shape", "txt_color", "vqa"]}


def test_the_flat_profiles_string_keeps_the_order_whatever_order_the_keys_come_in():
    flat = to_flat(load_config(overrides=["clients.profiles.z=vqa", "clients.profiles.a=txt_color,img_shape"]))
    assert flat["clients.profiles"] == "z=vqa; a=txt_color,img_shape"
    shuffled = dict(sorted(flat.items(), reverse=True))
    assert list(config_from_flat(shuffled).clients.profiles) == ["z", "a"]
    with pytest.raises(ConfigError, match="name=task"):
        config_from_flat({"clients.profiles": "image img_shape"})


def test_flat_run_config_round_trips():
    run = load_config(overrides=["train.lr=0.02", "clients.profiles.a=vqa", "clients.profiles.b=txt_color"])
    again = config_from_flat(to_flat(run))
    assert again == run


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rounds: 3\ntrain:\n  lr: 0.005\n")
    run = load_config(path, ["rounds=4"])
    assert run.rounds == 4 and run.train.lr == 0.005


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="'train.lrr'"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_the_flower_app_config_in_pyproject_mirrors_the_code_defaults():
    import tomllib
    from pathlib import Path

    from flwr.common.config import flatten_dict

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    assert declared == to_flat(load_config())
    assert config_from_flat(declared) == load_config()


def test_the_readme_config_reference_lists_every_key_with_its_default():
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_.<>]+)` \| ([^|]*) \|", readme, flags=re.M))
    for key, value in to_flat(load_config()).items():
        assert key in rows, f"README config reference lacks {key}"
        shown = rows[key].strip().strip("`").strip("'")
        assert shown == ("" if value == "" else str(value)), (key, shown, value)


def test_string_values_are_kept_as_written():
    run = load_config(overrides=["model.text_encoder=0x1F", "data.hf_split=2024-01-01", "data.hf_name=on"])
    assert run.model.text_encoder == "0x1F" and run.data.hf_split == "2024-01-01" and run.data.hf_name == "on"


def test_cli_resume_takes_the_runs_own_config(tmp_path, capsys):
    from fedmm.cli import main

    assert main(["simulate", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("rounds: 2\n")
    assert main(["simulate", "--resume", str(tmp_path), "rounds=3"]) == 2
    assert "give no --config or overrides" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["strategy.fraction_train=0.5"], "'strategy.fraction_train' must be 1.0 with strategy.mode=async"),
    (["strategy.concurrency=20"], "'strategy.concurrency'=20 exceeds clients.num=12"),
    (["strategy.buffer_size=13"], "'strategy.buffer_size'=13 must be between"),
    (["strategy.buffer_size=1"], "'strategy.buffer_size'=1 must be between"),
    (["strategy.concurrency=1"], "keeps 1 clients in flight, fewer than strategy.min_train_nodes=2"),
])
def test_bad_async_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["strategy.mode=async", *overrides])
    assert message in str(err.value)
