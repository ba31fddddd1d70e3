import pytest

from fedmm.core.components import (
    FUSION,
    UnknownParameterError,
    component_of,
    group_by_component,
)
from fedmm.models.model import server_model, client_components, module_bank, trainable_state


@pytest.mark.parametrize(
    "name, component",
    [
        ("encoders.image.backbone.encoder.layer.0.attention.q_proj.lora_A.default.weight", "encoder.image"),
        ("encoders.text.proj.weight", "encoder.text"),
        ("fusion.layers.layers.0.linear1.weight", FUSION),
        ("fusion.modality_embedding.weight", FUSION),
        ("heads.vqa.bias", "head.vqa"),
    ],
)
def test_component_of(name, component):
    assert component_of(name) == component


@pytest.mark.parametrize("name", ["encoders.image", "heads", "backbone.weight", ""])
def test_unknown_parameter_is_an_error(name):
    with pytest.raises(UnknownParameterError):
        component_of(name)


def test_components_follow_the_tasks(small_run):
    assert client_components(["img_shape"], small_run) == ("encoder.image", FUSION, "head.img_shape")
    assert client_components(["vqa", "txt_color"], small_run) == (
        "encoder.image", "encoder.text", FUSION, "head.txt_color", "head.vqa")


def test_every_trainable_tensor_has_one_component_and_frozen_ones_are_never_sent(small_run):
    model = server_model(small_run)
    state = trainable_state(model)
    groups = group_by_component(state)
    assert set(groups) == {"encoder.image", "encoder.text", FUSION, "head.img_shape", "head.txt_color", "head.vqa"}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not (frozen & state.keys())
    # Inside the encoders only the LoRA factors and the projection train.
    for name in state:
        if name.startswith("encoders."):
            assert "lora_" in name or ".proj." in name, name


def test_a_client_holds_only_its_components(small_run):
    model = module_bank(small_run).model(["txt_color"])
    state = trainable_state(model, client_components(["txt_color"], small_run))
    assert {component_of(k) for k in state} == {"encoder.text", FUSION, "head.txt_color"}
    assert not any(k.startswith("encoders.image") for k in dict(model.named_parameters()))
