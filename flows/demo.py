"""`make demo`: synthesize data if missing, run the tune -> register -> promote -> showcase flow on a local
Ray, then print a summary (the champion's mAP and a drawing of its masks) and the commands that open the
MLflow and Prefect UIs."""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from flows.pipeline import FLOW_NAME, tune_register_promote
from instseg.cli import parse_command
from instseg.config import Config
from instseg.data.formats import annotation_path
from instseg.data.synth import synthesize, synthesized_with
from instseg.metrics.names import FITNESS
from instseg.tracking.registry import aliases
from ray_jobs.cli_common import load_config, run_cli
from ray_jobs.runtime import init_ray
from tuning.summary import TuneSummary, format_params, format_trials


def _bin_dir() -> str:
    """Where this interpreter's console scripts live, relative to the cwd when inside it (.venv/bin/)."""
    folder = Path(sys.executable).parent
    try:
        return f"{folder.relative_to(Path.cwd())}/"
    except ValueError:
        return f"{folder}/"


def print_summary(result: dict[str, Any], elapsed: float, cfg: Config) -> None:
    data_root, val_split = os.path.relpath(cfg.data.root), cfg.data.val_split
    tuned = TuneSummary.from_dict(result["tune"])
    reg, promo = result["registration"], result["promotion"]
    print("\n" + "=" * 78)
    print(f"instseg demo finished in {elapsed / 60:.1f} min\n")
    print(format_trials(tuned))
    params = format_params(tuned.best_params, digits=4)
    print(f"\nbest params      {params}")
    print(f"best {FITNESS:<11} {tuned.best_fitness:.5f} (trial {tuned.best_trial_id}, MLflow run {tuned.best_run_id})")
    print(f"registered       {reg['model_name']} version {reg['version']}")
    previous = "none"
    if promo["champion_version"]:
        previous = f"{promo['champion_fitness']:.5f} (v{promo['champion_version']})"
    print(
        f"promotion        challenger {promo['challenger_fitness']:.5f} vs champion {previous}: "
        f"{'promoted' if promo['promoted'] else 'kept champion'}"
    )
    print(f"aliases          {aliases(cfg.tracking.uri, reg['model_name'])}")
    champion = promo["challenger_metrics"] if promo["promoted"] else promo["champion_metrics"] or {}
    if champion:
        print(
            f"champion         v{promo['champion_after']} on the {val_split} split: "
            f"mask mAP50-95 {champion['val/segm_map']:.3f} (mAP50 {champion['val/segm_map50']:.3f}), "
            f"box mAP50-95 {champion['val/bbox_map']:.3f} (mAP50 {champion['val/bbox_map50']:.3f})"
        )
    shown = result["showcase"]
    print(
        f"champion drawn   {os.path.relpath(shown['path']) if shown['path'] else shown['artifact_uri']} "
        f"({val_split} image {shown['image_id']}; in MLflow as {shown['artifact_uri']})"
    )
    bin_dir = _bin_dir()
    print("\nLook around:")
    print(f"  {bin_dir}mlflow ui --backend-store-uri {reg['tracking_uri']}    # http://127.0.0.1:5000")
    print(f"  {bin_dir}prefect server start    # http://127.0.0.1:4200, flow '{FLOW_NAME}'")
    print(
        f"  {bin_dir}instseg predict --model models:/{reg['model_name']}@champion "
        f"{data_root}/images/val/*.jpg --out preds.json"
    )
    print("=" * 78)


@contextmanager
def one_prefect_api() -> Iterator[None]:
    """The flow and its tasks on Ray workers must talk to the same Prefect API. With PREFECT_API_URL set
    (a `prefect server start`), nothing to do; otherwise start Prefect's temporary local server here and
    export its URL before Ray starts, so the workers inherit it instead of each starting their own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()  # stopped at exit by Prefect, after its log worker has drained into it
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def flow_command(args: argparse.Namespace) -> int:
    """`instseg flow run`: the tune -> register -> promote flow once, here."""
    started = time.perf_counter()
    cfg = load_config(args)
    wanted = {"images": cfg.data.synth_images, "seed": cfg.seed}
    made = synthesized_with(cfg.data.root)
    if not annotation_path(cfg.data.root, cfg.data.train_split).is_file() or (made is not None and made != wanted):
        # a synthetic set of ours made with other settings (an older demo) is replaced; other data is never touched
        print(f"synthesizing {cfg.data.synth_images} images into {cfg.data.root}", flush=True)
        synthesize(cfg.data.root, images=cfg.data.synth_images, seed=cfg.seed)
    with one_prefect_api():
        init_ray(cfg.ray.address)
        result = tune_register_promote(config_path=args.config, overrides=args.overrides)
    elapsed = time.perf_counter() - started
    print_summary(result, elapsed, cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.demo ARGS` = `instseg flow run ARGS`."""
    return flow_command(parse_command(["flow", "run"], argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
