"""The Flower ServerApp of fedmm."""
