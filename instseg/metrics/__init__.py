"""Metrics: COCO evaluation, fitness and the metric namespace."""
