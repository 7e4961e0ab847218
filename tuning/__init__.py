"""Ray Tune: search space from YAML, Optuna TPE, ASHA, and trial drivers that reuse ray_jobs.build_trainer."""
