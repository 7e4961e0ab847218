"""Ray Train jobs: the worker loop, the trainer builder and the `python -m ray_jobs.train` entry point."""
