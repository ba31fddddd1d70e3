"""Central differential privacy per component: Flower's clipping wrappers, and the privacy they spend.

Each component's strategy is wrapped in one of Flower's DP wrappers. Per component and round: each
holder's update of that component is clipped to the clipping norm C (by the server, or by the node's
`client_apps.dp_clipping` mod), the holders' clipped updates are averaged with equal weights, and
Gaussian noise of std sigma * C / n is added (n = the component's holders this round). A client that
holds k components takes part in k such releases a round: its whole update is bounded by C * sqrt(k),
and its privacy loss per round is that of k Gaussian mechanisms at multiplier sigma (in RDP, exactly
one mechanism at sigma / sqrt(k)). The run's epsilon comes from Flower's RdpAccountant (Google's
dp-accounting), with no amplification by sampling.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedmm.core.schema import DpConfig


class _QuantileTracking:
    """Andrew et al. (2021) move the clipping norm by the share of updates it left *unclipped*;
    Flower 1.42's adaptive wrappers feed the share they *clipped* into the same rule, so the norm runs
    away from the target quantile (every update of norm 1, start 0.1: the norm falls each round).
    Feeding the complement restores the paper's rule; `target_clipped_quantile` is then the share of
    updates the norm leaves unclipped."""

    def _geometric_update(self, clipped_fraction: float) -> None:
        super()._geometric_update(1.0 - clipped_fraction)  # type: ignore[misc]


class ServerSideAdaptiveClipping(_QuantileTracking, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with the norm update of Andrew et al."""


class ClientSideAdaptiveClipping(_QuantileTracking, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping with the norm update of Andrew et al."""


WRAPPERS: dict[str, type[Strategy]] = {
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "server-adaptive": ServerSideAdaptiveClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "client-adaptive": ClientSideAdaptiveClipping,
}


def is_client_side(dp: DpConfig) -> bool:
    return dp.name.startswith("client-")


def is_adaptive(dp: DpConfig) -> bool:
    return dp.name.endswith("-adaptive")


def wrap(dp: DpConfig, inner: Strategy, population: int) -> Strategy:
    """`inner` behind the DP wrapper `dp.name` names. The number of sampled clients is set per
    component and round to its holders; `population` (clients.num) only sizes Flower's default noise
    on the clipped count."""
    cls = WRAPPERS[dp.name]
    if not is_adaptive(dp):
        return cls(inner, dp.noise_multiplier, dp.clipping_norm, population)
    return cls(inner, dp.noise_multiplier, population, initial_clipping_norm=dp.clipping_norm,
               target_clipped_quantile=dp.target_quantile, clip_norm_lr=dp.clip_norm_lr,
               clipped_count_stddev=dp.clipped_count_stddev or None)


def wrapper_name(dp: DpConfig) -> str:
    """The Flower class a DP row is named by (the adaptive ones are Flower's, with the norm update fixed)."""
    cls = WRAPPERS[dp.name]
    return {ServerSideAdaptiveClipping: DifferentialPrivacyServerSideAdaptiveClipping,
            ClientSideAdaptiveClipping: DifferentialPrivacyClientSideAdaptiveClipping}.get(cls, cls).__name__


def unaccountable(inner: Strategy, defended: bool) -> str | None:
    """Why the accountant's guarantee would not hold for this composition, or None when it does: the
    noise sigma * C / n bounds one client's influence only on a plain mean of the clipped updates."""
    if defended:
        return "a defence before the mean (trust scoring or a robust rule) changes one client's influence beyond C / n"
    if not (isinstance(inner, FedAvg) and type(inner).aggregate_train is FedAvg.aggregate_train):
        return f"{type(inner).__name__} does not aggregate by FedAvg's mean, so C / n does not bound one client"
    return None


class PrivacyLedger:
    """The run's privacy spent, composed round by round over the releases each client took part in."""

    def __init__(self, dp: DpConfig, population: int, reason: str | None) -> None:
        self.dp = dp
        self.reason = reason
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=dp.delta, population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))

    def record_round(self, releases_per_client: int, largest_release: int, wrapper: Strategy) -> None:
        """Compose one round: the most releases any one client took part in (its components), each a
        Gaussian release of the update at the wrapper's multiplier and, under adaptive clipping, one
        of the clipped count (sensitivity 1) at its noise std."""
        if self.reason is not None or releases_per_client == 0:
            return
        multipliers = [wrapper.noise_multiplier]
        if is_adaptive(self.dp):
            multipliers.append(wrapper.clipped_count_stddev)
        if min(multipliers) <= 0:
            self.reason = "a release without noise has no finite epsilon"
            return
        for sigma in multipliers:
            event = GaussianPrivacyEvent(noise_multiplier=float(sigma), sample_size=largest_release,
                                         population_size=self.accountant.config.population_size)
            self.accountant.compose(event, count=releases_per_client)

    def report(self) -> dict[str, Any]:
        """{"epsilon", "delta", "releases", "accounting"}; epsilon is None (with "reason") where the
        composition has no guarantee to report."""
        out: dict[str, Any] = {"delta": self.dp.delta, "releases": self.accountant.num_releases,
                               "accounting": "RDP (Flower's RdpAccountant), add-or-remove-one, no amplification"}
        if self.reason is not None:
            return out | {"epsilon": None, "reason": self.reason}
        out["epsilon"] = self.accountant.get_privacy_spent().epsilon if self.accountant.num_releases else 0.0
        return out

    def state(self) -> str:
        return json.dumps({"accountant": self.accountant.state_dict(), "reason": self.reason})

    def restore(self, text: str) -> None:
        state = json.loads(text)
        self.accountant.load_state_dict(state["accountant"])
        self.reason = state["reason"]
