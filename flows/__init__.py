"""Prefect 3 flows on RayTaskRunner: tune -> register -> promote, with deployments and schedules."""
