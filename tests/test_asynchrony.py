import numpy as np
import pytest

from fedmm.core import asynchrony


def test_speeds_spread_log_uniformly_and_are_seeded():
    factors = [asynchrony.speed_factor(0, p, 10.0) for p in range(200)]
    assert 1 <= min(factors) < 1.3 and 8 < max(factors) <= 10
    assert 0.3 < np.mean(np.log10(factors)) < 0.7  # log-uniform: mean log10 about 0.5
    assert factors == [asynchrony.speed_factor(0, p, 10.0) for p in range(200)]
    assert all(asynchrony.speed_factor(0, p, 1.0) == 1.0 for p in range(5))
    with pytest.raises(ValueError, match="spread"):
        asynchrony.speed_factor(0, 0, 0.5)


def test_staleness_weights_fall_with_staleness():
    assert asynchrony.staleness_weight(0, 0.5) == 1.0
    assert asynchrony.staleness_weight(3, 0.5) == pytest.approx(0.5)
    assert asynchrony.staleness_weight(7, 0.0) == 1.0
    with pytest.raises(ValueError):
        asynchrony.staleness_weight(-1, 0.5)


def test_a_rebased_reply_carries_its_discounted_update_onto_the_current_model():
    sent, trained, current = {"c": np.zeros(3, np.float32)}, {"c": np.ones(3, np.float32)}, {"c": np.full(3, 5, np.float32)}
    out = asynchrony.rebase(trained, sent, current, 0.5)
    np.testing.assert_allclose(out["c"], 5.5)
    assert out["c"].dtype == np.float32


def test_the_clock_releases_the_fastest_jobs_first_and_round_trips_through_json():
    clock = asynchrony.VirtualClock(seed=1, spread=10.0)
    for p in range(6):
        clock.dispatch(p, version=0)
    first = clock.arrivals(2)
    assert [j.finish for j in first] == sorted(j.finish for j in first) and clock.now == first[-1].finish
    assert all(j.finish >= first[-1].finish for j in clock.jobs)
    restored = asynchrony.VirtualClock.from_json(1, 10.0, clock.to_json())
    for c in (clock, restored):
        c.dispatch(first[0].partition, version=1)
    assert clock.arrivals(5) == restored.arrivals(5) and clock.now == restored.now
    with pytest.raises(ValueError, match="asynchronous-round state"):
        asynchrony.VirtualClock.from_json(1, 10.0, {"now": 0})


# --- asynchronous rounds on an in-process grid ---------------------------------------------------

import json  # noqa: E402

from local_grid import LocalGrid  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from test_server import KilledGrid, fast_run  # noqa: E402

from client_apps.app import make_client_app  # noqa: E402
from server_app.runner import run_federation  # noqa: E402

ASYNC = ["strategy.mode=async", "clients.speed_spread=10", "clients.num=4", "strategy.buffer_size=2", "rounds=5"]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if "train.clients-accepted" in line]


def test_async_rounds_aggregate_each_buffer_of_arrivals_with_their_staleness(tmp_path, caplog):
    run = fast_run(tmp_path, *ASYNC)
    grid = LocalGrid(make_client_app(run), 4)
    with caplog.at_level("INFO", logger="flwr"):
        run_federation(grid, run)
    assert any("round 5:" in m and "staleness" in m for m in caplog.messages)  # the progress line shows it
    rows = _records(tmp_path / "out")
    assert [r["train.clients-accepted"] for r in rows] == [2] * 5
    times = [r["time.simulated_s"] for r in rows]
    assert times == sorted(times) and times[0] > 0
    assert max(r["async.staleness_max"] for r in rows) >= 1  # slow clients reply on old versions
    sent_rounds = [int(m.content["config"]["server-round"]) for m in grid.sent if m.metadata.message_type == "train"]
    assert len(sent_rounds) == 10 and sent_rounds[:2] == [1, 1]  # 2 jobs per aggregation; the first on version 0


def test_a_stale_reply_past_the_bound_is_dropped_and_counted(tmp_path):
    run = fast_run(tmp_path, *ASYNC, "strategy.max_staleness=0", "strategy.allow_degraded=true")
    run_federation(LocalGrid(make_client_app(run), 4), run)
    rows = _records(tmp_path / "out")
    assert sum(r["async.dropped_stale"] for r in rows) >= 1
    assert all(r["async.staleness_max"] == 0 for r in rows)


def test_sync_rounds_wait_for_their_slowest_client_on_the_same_clock(tmp_path):
    run = fast_run(tmp_path, "clients.speed_spread=10", "clients.num=4", "rounds=2")
    run_federation(LocalGrid(make_client_app(run), 4), run)
    times = [r["time.simulated_s"] for r in _records(tmp_path / "out")]
    assert 1 <= times[0] <= 12 and times[1] > times[0]


def test_an_async_run_resumed_after_a_kill_ends_where_an_uninterrupted_one_does(tmp_path):
    whole = fast_run(tmp_path / "whole", *ASYNC)
    run_federation(LocalGrid(make_client_app(whole), 4), whole)
    cut = fast_run(tmp_path / "cut", *ASYNC)
    with pytest.raises(KeyboardInterrupt):
        run_federation(KilledGrid(make_client_app(cut), 4, kill_at=4), cut)
    done = len(_records(tmp_path / "cut" / "out"))
    assert 1 <= done < 5
    resumed = fast_run(tmp_path / "cut", *ASYNC, "resume=true")
    run_federation(LocalGrid(make_client_app(resumed), 4), resumed)
    a = load_file(str(tmp_path / "whole" / "out" / "checkpoints" / "round-0005.safetensors"))
    b = load_file(str(tmp_path / "cut" / "out" / "checkpoints" / "round-0005.safetensors"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert [r["time.simulated_s"] for r in _records(tmp_path / "whole" / "out")] == \
        [r["time.simulated_s"] for r in _records(tmp_path / "cut" / "out")]


def test_the_real_clock_takes_replies_as_they_arrive_and_keeps_clients_busy(tmp_path):
    run = fast_run(tmp_path, *ASYNC, "strategy.async_clock=real")
    grid = LocalGrid(make_client_app(run), 4)
    run_federation(grid, run)
    rows = _records(tmp_path / "out")
    assert [r["train.clients-accepted"] for r in rows] == [2] * 5
    assert all(r["time.elapsed_s"] > 0 for r in rows) and all(r["async.in_flight"] == 4 for r in rows)
    # every reply is pulled once and aggregated in arrival order: 4 first jobs, then 2 per version
    assert sum(m.metadata.message_type == "train" for m in grid.sent) == 4 + 2 * 5


def test_a_model_attack_is_refused_in_async_mode_before_any_work(tmp_path):
    from fedmm.core.schema import ConfigError

    run = fast_run(tmp_path, *ASYNC, "attack.name=scaling", "attack.fraction=0.25")
    with pytest.raises(ConfigError, match="does not support model-poisoning attacks"):
        run_federation(LocalGrid(make_client_app(run), 4), run)
    assert not (tmp_path / "out" / "checkpoints").exists()
