import math

import pytest
import torch
from torch import nn

from fedmm.core.components import component_of, expert_component, is_expert, router_component
from fedmm.core.config import load_config
from fedmm.models.model import client_components, module_bank, trainable_layouts
from fedmm.models.moe import (
    RoutedExperts,
    auxiliary_loss,
    load_balance_loss,
    modality_guidance_loss,
    plackett_luce_log_prob,
    routed_tokens,
    routing_entropy,
    sampled_routing,
)

DIM, HIDDEN = 6, 12


def _block(num_experts=4, top_k=2, **weights):
    torch.manual_seed(0)
    moe = RoutedExperts(DIM, HIDDEN, num_experts, top_k, r=2, alpha=4, num_modalities=2,
                        balance_weight=weights.get("balance", 0.0), guidance_weight=weights.get("guidance", 0.0))
    for expert in moe.experts:  # non-zero B so every expert computes something different
        nn.init.normal_(expert.up_B)
        nn.init.normal_(expert.down_B)
    return moe, nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)


def test_each_token_goes_to_its_top_k_experts_mixed_by_renormalised_probabilities():
    moe, up, down = _block()
    x = torch.randn(2, 3, DIM)
    modality = torch.tensor([[0, 0, 1], [1, 1, 0]])
    valid = torch.tensor([[True, True, True], [True, False, True]])
    out = moe(x, up, torch.relu, down, modality, valid)
    for b in range(2):
        for t in range(3):
            if not valid[b, t]:
                assert torch.equal(out[b, t], torch.zeros(DIM))  # padding is not routed
                continue
            token = x[b, t]
            probs = torch.softmax(moe.router.weight @ token + moe.router.modality_bias[modality[b, t]], -1)
            top = probs.topk(2)
            expected = torch.zeros(DIM)
            for p, e in zip(top.values / top.values.sum(), top.indices.tolist()):
                ex = moe.experts[e]
                w1 = up.weight + ex.scaling * ex.up_B @ ex.up_A
                w2 = down.weight + ex.scaling * ex.down_B @ ex.down_A
                expected += p * (w2 @ torch.relu(w1 @ token + up.bias) + down.bias)
            torch.testing.assert_close(out[b, t], expected, rtol=1e-5, atol=1e-5)


def test_the_router_knows_each_tokens_modality():
    moe, up, down = _block()
    with torch.no_grad():
        moe.router.modality_bias[1, 3] = 100.0  # modality 1 always picks expert 3 first
    moe.train()
    x = torch.randn(1, 4, DIM)
    moe(x, up, torch.relu, down, torch.tensor([[0, 1, 1, 0]]), torch.ones(1, 4, dtype=torch.bool))
    assert moe.routed[1, 3] == 2 and moe.routed.sum() == 8  # 4 tokens x top-2


def test_load_balance_loss_is_one_when_balanced_and_grows_with_imbalance():
    e = 4
    uniform = torch.full((8, e), 1 / e)
    balanced = torch.arange(8).remainder(e).unsqueeze(1)
    assert load_balance_loss(uniform, balanced, e).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    all_first = torch.zeros(8, 1, dtype=torch.long)
    assert load_balance_loss(skewed, all_first, e).item() == pytest.approx(4 * 0.7)


def test_modality_guidance_penalises_only_experts_a_modality_under_uses():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25]] * 4, requires_grad=True)
    modality = torch.tensor([0, 0, 1, 1])
    uniform = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert modality_guidance_loss(probs, uniform, modality).item() == 0.0
    # modality 0 only ever uses experts 0 and 1: mass on 2 and 3 is penalised, and its gradient is there
    specialised = torch.tensor([[0, 1], [0, 1], [0, 1], [2, 3]])
    loss = modality_guidance_loss(probs, specialised, modality)
    assert loss.item() > 0
    loss.backward()
    assert (probs.grad[:2, 2:] > 0).all() and (probs.grad[:2, :2] == 0).all()


def test_plackett_luce_log_prob_of_an_ordered_draw():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    got = plackett_luce_log_prob(p.log(), torch.tensor([[1, 0]]))
    assert got.item() == pytest.approx(math.log(0.3) + math.log(0.5 / 0.7))


def test_routing_entropy_of_uniform_routing_is_log_e():
    assert routing_entropy(torch.full((3, 4), 0.25)).tolist() == pytest.approx([math.log(4)] * 3)


def test_training_forward_records_the_auxiliary_loss_once_and_counts_tokens_by_modality():
    moe, up, down = _block(balance=0.5, guidance=0.5)
    model = nn.ModuleDict({"block": moe})
    moe.train()
    x = torch.randn(2, 5, DIM)
    modality = torch.tensor([[0] * 5, [1] * 5])
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 4] = False
    moe(x, up, torch.relu, down, modality, valid)
    assert auxiliary_loss(model) is not None and auxiliary_loss(model) is None  # consumed once
    assert moe.routed.sum(1).tolist() == [10, 8]  # 5 and 4 real tokens, 2 slots each
    moe.eval()
    moe(x, up, torch.relu, down, modality, valid)
    assert moe.routed.sum().item() == 18  # evaluation does not count


def test_a_sampled_forward_records_policy_terms_and_trains_only_the_router():
    moe, up, down = _block()
    moe.keep_reference()
    moe.train()
    x = torch.randn(3, 4, DIM, requires_grad=True)
    modality = torch.zeros(3, 4, dtype=torch.long)
    with sampled_routing(moe, torch.Generator().manual_seed(0)) as layers:
        moe(x, up, torch.relu, down, modality, torch.ones(3, 4, dtype=torch.bool))
    terms = layers[0].policy
    assert terms.log_prob.shape == (3,) and (terms.log_prob < 0).all()
    assert terms.kl.abs().max().item() < 1e-6  # the router is still its reference
    terms.log_prob.sum().backward()
    assert moe.router.weight.grad is not None and x.grad is None
    assert all(p.grad is None for p in moe.experts.parameters())
    assert moe.routed.sum().item() == 0 and moe.sampler is None


def test_moe_components_are_named_by_one_rule_and_match_the_model():
    assert component_of("fusion.layers.layers.1.adapter.experts.3.up_A") == expert_component(1, 3) == "fusion.expert.1.3"
    assert component_of("fusion.layers.layers.0.adapter.router.modality_bias") == router_component(0)
    assert component_of("fusion.layers.layers.0.self_attn.in_proj_weight") == "fusion.shared"
    assert is_expert("fusion.expert.0.2") and not is_expert("fusion.router.0")
    run = load_config(overrides=["moe.fusion_ffn=experts", "model.fusion_layers=2", "moe.num_experts=3"])
    tasks = ["vqa", "img_shape"]
    layouts = trainable_layouts(module_bank(run).model(tasks))
    assert sorted(layouts) == sorted(client_components(tasks, run))
    assert sum(is_expert(c) for c in layouts) == 6


@pytest.mark.parametrize("ffn", ["lora", "experts"])
def test_adapted_fusion_freezes_the_feed_forward_weights_the_full_model_starts_from(ffn):
    full = module_bank(load_config()).fusion()
    adapted = module_bank(load_config(overrides=[f"moe.fusion_ffn={ffn}"])).fusion()
    for a, b in zip(full.layers.layers, adapted.layers.layers):
        assert torch.equal(a.linear1.weight, b.linear1.weight) and not b.linear1.weight.requires_grad
        assert torch.equal(a.self_attn.in_proj_weight, b.self_attn.in_proj_weight)


def test_routed_tokens_name_expert_components():
    run = load_config(overrides=["moe.fusion_ffn=experts"])
    model = module_bank(run).model(["vqa"])
    model.train()
    inputs = {"pixel_values": torch.zeros(2, 3, 32, 32), "input_ids": torch.ones(2, 16, dtype=torch.long),
              "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    for layer in (m for m in model.modules() if isinstance(m, RoutedExperts)):
        layer.reset_stats()
    model("vqa", inputs)
    model.eval()
    counts = routed_tokens(model)
    assert set(counts) == {expert_component(0, e) for e in range(4)}
    image_tokens = module_bank(run).tokens_per_example("image")
    assert sum(c.get("image", 0) for c in counts.values()) == 2 * image_tokens * run.moe.top_k
    assert sum(c.get("text", 0) for c in counts.values()) == 2 * 16 * run.moe.top_k
