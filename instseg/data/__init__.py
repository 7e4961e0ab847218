"""Datasets, formats, validation, the synthetic generator, download and loaders."""
