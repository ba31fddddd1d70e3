"""Flower ClientApps of fedmm."""
