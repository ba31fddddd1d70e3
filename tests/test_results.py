import numpy as np

from fedmm.results import expert_utilisation


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
