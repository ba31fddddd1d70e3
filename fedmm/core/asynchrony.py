"""Asynchronous rounds (FedBuff-style): simulated client speeds, the order replies arrive in, and how
much a stale reply counts.

Time here is simulated: each dispatch of a client takes `duration` seconds of a virtual clock, drawn
from the client's speed (seeded by run seed, partition and dispatch count), so the order replies
arrive in is a function of the seed alone: a run resumed after a kill sees the same arrivals, and
sync and async runs are compared on the same clock. A client's update is discounted by its
staleness τ (global versions made since it was sent) as s(τ) = (1 + τ)^(-a) (FedAsync's polynomial;
a = 0.5 is FedBuff's 1/√(1+τ), a = 0 counts every reply fully), and replies staler than the bound are
dropped.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np


def speed_factor(seed: int, partition: int, spread: float) -> float:
    """Client `partition`'s slowness, log-uniform in [1, spread] (1 for every client when spread is 1)."""
    if spread < 1:
        raise ValueError(f"speed spread must be >= 1, got {spread}")
    u = np.random.default_rng([seed, partition, 0x5EED]).random()
    return float(spread ** u)


def duration(seed: int, partition: int, dispatch: int, spread: float, jitter: float = 0.1) -> float:
    """Simulated seconds of the `dispatch`-th job sent to `partition`: its speed factor times a small
    log-normal jitter (the same job never takes exactly the same time twice)."""
    noise = np.random.default_rng([seed, partition, dispatch, 0x717E]).normal(0.0, jitter)
    return speed_factor(seed, partition, spread) * float(np.exp(noise))


def staleness_weight(staleness: int, exponent: float) -> float:
    """s(τ) = (1 + τ)^(-exponent)."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return float((1.0 + staleness) ** (-exponent))


def rebase(trained: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray],
           weight: float) -> dict[str, np.ndarray]:
    """A stale reply as a reply to the current global model: current + weight x (trained - sent), so that
    any strategy's weighted mean of rebased replies applies Σ w_k s(τ_k) Δ_k / Σ w_k (FedBuff with a
    server learning rate of 1)."""
    return {k: (current[k] + np.float32(weight) * (v - sent[k])).astype(np.float32) for k, v in trained.items()}


@dataclass(frozen=True, order=True)
class Job:
    """One dispatched training job: ordered by when it finishes on the simulated clock."""

    finish: float
    partition: int
    dispatch: int  # how many jobs this partition had before this one
    version: int  # the global version it was sent (0: the initial model)

    def to_json(self) -> list:
        return [self.finish, self.partition, self.dispatch, self.version]

    @classmethod
    def from_json(cls, row: list) -> "Job":
        finish, partition, dispatch, version = row
        return cls(float(finish), int(partition), int(dispatch), int(version))


class VirtualClock:
    """Jobs in flight on the simulated clock; `arrivals(k)` pops the k that finish first."""

    def __init__(self, seed: int, spread: float, now: float = 0.0, jobs: Iterable[Job] = (),
                 dispatches: Mapping[int, int] | None = None) -> None:
        self.seed, self.spread, self.now = seed, spread, now
        self.jobs = list(jobs)
        heapq.heapify(self.jobs)
        self.dispatches = dict(dispatches or {})

    def dispatch(self, partition: int, version: int) -> Job:
        count = self.dispatches.get(partition, 0)
        job = Job(self.now + duration(self.seed, partition, count, self.spread), partition, count, version)
        self.dispatches[partition] = count + 1
        heapq.heappush(self.jobs, job)
        return job

    def in_flight(self) -> set[int]:
        return {job.partition for job in self.jobs}

    def arrivals(self, k: int) -> list[Job]:
        """The k jobs that finish first (fewer if fewer are in flight); the clock moves to the last."""
        out = [heapq.heappop(self.jobs) for _ in range(min(k, len(self.jobs)))]
        if out:
            self.now = out[-1].finish
        return out

    def to_json(self) -> dict:
        return {"now": self.now, "jobs": [j.to_json() for j in sorted(self.jobs)],
                "dispatches": {str(p): n for p, n in sorted(self.dispatches.items())}}

    @classmethod
    def from_json(cls, seed: int, spread: float, data: Mapping) -> "VirtualClock":
        try:
            return cls(seed, spread, float(data["now"]), [Job.from_json(r) for r in data["jobs"]],
                       {int(p): int(n) for p, n in data["dispatches"].items()})
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"bad asynchronous-round state: {err}") from None
