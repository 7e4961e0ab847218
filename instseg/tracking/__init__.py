"""The only package that imports mlflow: runs, artifacts, registry and promotion."""
