import numpy as np

from fedmm.core.results import expert_utilisation


def test_expert_utilisation_is_each_experts_share_of_its_modalitys_tokens_per_layer():
    history = [
        {"round": 1, "train.moe.routed.image.fusion.expert.0.0": 30.0, "train.moe.routed.image.fusion.expert.0.1": 10.0,
         "train.moe.routed.text.fusion.expert.0.1": 5.0, "train.moe.routed.image.fusion.expert.1.0": 8.0},
        {"round": 2, "train.moe.routed.image.fusion.expert.0.1": 20.0, "train.moe.routed.text.fusion.expert.0.0": 15.0},
        {"round": 2, "stage": "final"},
    ]
    modalities, experts, matrix = expert_utilisation(history)
    assert modalities == ["image", "text"]
    assert experts == ["fusion.expert.0.0", "fusion.expert.0.1", "fusion.expert.1.0"]
    np.testing.assert_allclose(matrix, [[0.5, 0.5, 1.0], [0.75, 0.25, 0.0]])


def test_no_experts_no_utilisation():
    assert expert_utilisation([{"round": 1, "global.vqa.accuracy": 0.5}])[1] == []


def _started_folder(tmp_path, rounds_with_checkpoint, rounds_logged):
    import json

    from fedmm.core.config import load_config
    from fedmm.core.results import RunResults, checkpoint_path, save_checkpoint

    run = load_config(overrides=[f"out={tmp_path}"])
    results = RunResults(tmp_path, run)
    for r in rounds_logged:
        results.log_round({"round": r, "global.vqa.accuracy": 0.1 * r})
    for r in rounds_with_checkpoint:
        save_checkpoint(checkpoint_path(tmp_path, r), {"w": np.full(2, r, np.float32)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": 9})[:5])  # a line cut short by the kill
    return load_config(overrides=[f"out={tmp_path}", "resume=true"])


def test_resume_keeps_the_rounds_with_both_a_record_and_a_checkpoint(tmp_path):
    from fedmm.core.results import RunResults

    run = _started_folder(tmp_path, rounds_with_checkpoint=[0, 1, 2, 3], rounds_logged=[0, 1, 2])
    results = RunResults(tmp_path, run)
    assert results.last_round == 2
    assert [r["round"] for r in results.history] == [0, 1, 2]
    assert not (tmp_path / "checkpoints" / "round-0003.safetensors").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_without_a_finished_round_or_a_run_is_a_clear_error(tmp_path):
    import pytest

    from fedmm.core.config import load_config
    from fedmm.core.schema import ConfigError
    from fedmm.core.results import RunResults

    run = _started_folder(tmp_path / "a", rounds_with_checkpoint=[], rounds_logged=[0])
    with pytest.raises(ConfigError, match="no round completed"):
        RunResults(tmp_path / "a", run)
    with pytest.raises(ConfigError, match="no run was started"):
        RunResults(tmp_path / "b", load_config(overrides=[f"out={tmp_path / 'b'}", "resume=true"]))
