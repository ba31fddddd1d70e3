"""A strategy as a user would write one: Flower's public API only, nothing from fedmm."""

from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class ServerStepFedAvg(FedAvg):
    """FedAvg that moves the global arrays only `server_lr` of the way to the clients' mean."""

    def __init__(self, server_lr: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.server_lr = server_lr
        self.current: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None or self.current is None:
            return mean, metrics
        stepped = {k: Array(self.current[k].numpy() + self.server_lr * (mean[k].numpy() - self.current[k].numpy()))
                   for k in mean.keys()}
        return ArrayRecord(stepped), metrics
