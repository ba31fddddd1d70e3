import torch

from fedmm.training.client import client_data, identify
from fedmm.core.config import load_config
from fedmm.models.grpo import group_advantages, grpo_loss
from fedmm.models.model import module_bank
from fedmm.models.moe import RoutedExperts, routed_layers


def test_advantages_are_relative_to_each_examples_group():
    rewards = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]])  # 3 routings of 2 examples
    adv = group_advantages(rewards)
    torch.testing.assert_close(adv[:, 0], torch.tensor([-1.0, 0.0, 1.0]), rtol=1e-4, atol=1e-4)
    assert adv[:, 1].abs().max() < 1e-3  # all routings equally good: no signal


def test_the_policy_loss_reaches_only_the_routers():
    run = load_config(overrides=["moe.fusion_ffn=experts", "moe.routing=grpo"])
    me = identify(run, {"partition-id": 2})
    model = module_bank(run).model(list(me.tasks))
    for layer in routed_layers(model):
        layer.keep_reference()
    data = client_data(run, me, "train")["vqa"]
    inputs, labels = data.batch(torch.arange(8), torch.device("cpu"))
    model.train()
    model.zero_grad()
    loss = grpo_loss(model, "vqa", model.encode("vqa", inputs), labels, run.moe, torch.Generator().manual_seed(0))
    loss.backward()
    model.eval()
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got_grad and all(".router." in n for n in got_grad)
    assert all(isinstance(m, RoutedExperts) for m in routed_layers(model))
    model.zero_grad()
