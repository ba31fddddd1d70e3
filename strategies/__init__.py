"""Flower strategies of fedmm."""

from strategies.component_fedavg import ComponentFedAvg
from strategies.nodes import NodeInfo, NodeRegistry

__all__ = ["ComponentFedAvg", "NodeInfo", "NodeRegistry"]
