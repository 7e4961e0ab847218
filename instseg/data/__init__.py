"""Datasets, the synthetic generator, transforms and loaders."""
