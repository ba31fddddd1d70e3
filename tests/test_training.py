import math

import numpy as np
import pytest
import torch

from fedmm.training import client
from fedmm.models.model import client_components, component_vectors, module_bank, trainable_state
from fedmm.training.local import evaluate, lr_at, resolve_device, train_local


def test_cosine_schedule_decays_from_lr_to_its_floor(small_run):
    cfg = small_run.train
    assert lr_at(1, 10, cfg) == pytest.approx(cfg.lr)
    assert lr_at(10, 10, cfg) == pytest.approx(cfg.lr * cfg.min_lr_fraction)
    assert lr_at(3, 10, cfg) > lr_at(6, 10, cfg)
    cfg.lr_schedule = "constant"
    assert lr_at(7, 10, cfg) == cfg.lr


def test_local_training_lowers_the_loss_and_is_deterministic(small_run):
    me = client.identify(small_run, {"partition-id": 2})  # multimodal: all three tasks
    assert me.profile == "multimodal"
    data = client.client_data(small_run, me, "train")
    small_run.train.local_steps = 40
    small_run.train.lr = 1e-2
    model = module_bank(small_run).model(list(me.tasks))
    components = client_components(list(me.tasks), small_run)
    start = trainable_state(model, components)
    before = evaluate(model, data, 64, torch.device("cpu"))
    result = train_local(model, data, small_run.train, small_run.train.lr, seed=1, device=torch.device("cpu"))
    after = evaluate(model, data, 64, torch.device("cpu"))
    assert result.steps == 40 and sum(result.examples.values()) == 40 * small_run.train.batch_size
    mean_loss = lambda s: sum(v.loss_sum for v in s.values()) / sum(v.count for v in s.values())  # noqa: E731
    assert mean_loss(after) < mean_loss(before) - 0.1
    first = trainable_state(model, components)
    from fedmm.models.model import load_trainable

    load_trainable(model, start, components)
    train_local(model, data, small_run.train, small_run.train.lr, seed=1, device=torch.device("cpu"))
    again = trainable_state(model, components)
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_client_train_reports_per_component_counts(small_run):
    me = client.identify(small_run, {"partition-id": 0})  # image profile
    model = module_bank(small_run).model(list(me.tasks))
    arrays = component_vectors(model, client_components(list(me.tasks), small_run))
    out, n, counts, metrics = client.train(small_run, me, arrays, server_round=1)
    assert out.keys() == arrays.keys() == {"encoder.image", "fusion.shared", "head.img_shape"}
    assert all(out[c].shape == arrays[c].shape and out[c].ndim == 1 for c in out)
    assert any(not np.array_equal(out[c], arrays[c]) for c in out)
    assert n == small_run.train.local_steps * small_run.train.batch_size
    assert counts == {"encoder.image": n, "fusion.shared": n, "head.img_shape": n}
    assert math.isfinite(metrics["train-loss.img_shape"])


def test_epochs_mode_runs_whole_passes(small_run):
    small_run.train.local_steps, small_run.train.local_epochs = 0, 1.0
    me = client.identify(small_run, {"partition-id": 1})
    data = client.client_data(small_run, me, "train")
    model = module_bank(small_run).model(list(me.tasks))
    result = train_local(model, data, small_run.train, 1e-3, seed=0, device=torch.device("cpu"))
    assert result.steps == math.ceil(len(data["txt_color"]) / small_run.train.batch_size)


def test_identity_errors_name_the_problem(small_run):
    with pytest.raises(ValueError, match="partition-id"):
        client.identify(small_run, {})
    with pytest.raises(ValueError, match="outside"):
        client.identify(small_run, {"partition-id": 99})


def test_auto_device_is_cpu_without_a_gpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_step_schedule_shares_steps_by_data_and_trains_every_task():
    from fedmm.core.schema import TrainConfig
    from fedmm.training.local import _schedule

    generator = torch.Generator().manual_seed(0)
    schedule = _schedule({"a": 900, "b": 90, "c": 10}, TrainConfig(local_steps=30), generator)
    assert len(schedule) == 30
    assert {t: schedule.count(t) for t in "abc"} == {"a": 27, "b": 2, "c": 1}
    even = _schedule({"a": 5, "b": 5, "c": 5}, TrainConfig(local_steps=4), generator)
    assert sorted(even.count(t) for t in "abc") == [1, 1, 2]


def test_fedprox_proximal_term_pulls_local_training_towards_the_received_model(small_run):
    me = client.identify(small_run, {"partition-id": 2})
    data = client.client_data(small_run, me, "train")
    small_run.train.local_steps = 20
    components = client_components(list(me.tasks), small_run)
    model = module_bank(small_run).model(list(me.tasks))
    start = trainable_state(model, components)
    from fedmm.models.model import load_trainable

    def drift(mu):
        load_trainable(model, start, components)
        train_local(model, data, small_run.train, 1e-2, seed=3, device=torch.device("cpu"), proximal_mu=mu)
        trained = trainable_state(model, components)
        return trained, math.sqrt(sum(float(((trained[k] - start[k]) ** 2).sum()) for k in start))

    plain, d0 = drift(0.0)
    load_trainable(model, start, components)
    train_local(model, data, small_run.train, 1e-2, seed=3, device=torch.device("cpu"))
    assert all(np.array_equal(plain[k], v) for k, v in trainable_state(model, components).items())  # mu=0: FedAvg
    _, d1 = drift(1.0)
    _, d100 = drift(100.0)
    assert d100 < d1 < d0 and d100 < 0.5 * d0  # mu/2 ||w - w_received||^2 holds the weights near what arrived
