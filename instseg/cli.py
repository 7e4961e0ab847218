"""`instseg`: one command line for the whole loop. Data, evaluation and prediction run in this process;
training, tuning, flows and jobs run on Ray:

    instseg data synth data/synth                            # or data download / convert / check / split
    instseg train --config configs/demo.yaml [key=value ...]  # Ray Train; rerun with its run_name to resume
    instseg tune --config configs/demo.yaml [key=value ...]   # Ray Tune + Optuna
    instseg flow run --config configs/demo.yaml               # the Prefect flow: tune -> register -> promote
    instseg flow deploy --config configs/demo.yaml --cron "0 3 * * *"
    instseg job submit --address http://HEAD:8265 -- instseg train --config configs/demo.yaml
    instseg val --model models:/NAME@champion --data data/coco8-seg
    instseg predict --model models:/NAME@champion images/ --gt annotations.json --save-images drawn/
    instseg metrics GT.json preds.json
    instseg register NAME --run RUN_ID                        # or: instseg train ... --register NAME
    instseg promote NAME [--version V] --config configs/demo.yaml  # the gate: challenger vs champion
    instseg models NAME                                       # versions, aliases, fitness; instseg rollback NAME
    instseg tracking serve --backend postgresql://... --artifacts DIR [--auth]  # the team's MLflow server

`python -m ray_jobs.train`, `tuning.tune`, `flows.demo`, `flows.deploy` and `ray_jobs.submit` are aliases of
train, tune, flow run, flow deploy and job submit. Every command reports a user's mistake as one line and
exits 2 (1 for a run that failed); heavy libraries (torch, Ray, MLflow, Prefect) are imported by the command
that needs them, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from instseg.data.formats import FORMATS
from instseg.errors import FAILED_RUN_ERRORS, INTERRUPTED_EXIT, InstsegError, report_unexpected
from instseg.redaction import redact

PROG = "instseg"
OVERWRITE_HELP = "replace a non-empty output folder that instseg did not write (swapped in only when complete)"
MODEL_HELP = "models:/NAME@alias, runs:/RUN_ID/model, a bundle folder or a training checkpoint"
TRACKING_URI_HELP = "MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
MODEL_NAME_HELP = "registered model name (registry.model_name)"
BACKEND_HELP = "COCO scoring library (default faster: faster-coco-eval, the same stats)"


def _on_demand(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports its module (and with it Ray, torch, MLflow or Prefect) only when it runs."""

    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return handler


def _synth(args: argparse.Namespace) -> int:
    from instseg.data.synth import synthesize

    counts = synthesize(args.out, images=args.images, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.out}: {json.dumps(counts)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from instseg.data.formats import convert

    counts = convert(Path(args.src), Path(args.dst), fmt=args.format, names=args.names, overwrite=args.overwrite)
    for split, c in counts.items():
        print(f"{split}: {c['images']} images, {c['instances']} instances, {c['classes']} classes -> {args.dst}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from instseg.config import load
    from instseg.data.check import check_dataset, format_report, missing_split_warnings

    data = load(args.config).data if args.config else None
    path = args.path or (data.root if data else None)
    if path is None:
        raise InstsegError("data check needs a dataset PATH (or --config with data.root)")
    report = check_dataset(Path(path), fmt=args.format, names=args.names, workers=args.workers, decode=args.decode)
    print(format_report(report))
    for warning in missing_split_warnings(report, data):
        print(f"warning: {warning}")
    return 0 if report.clean else 1


def _split(args: argparse.Namespace) -> int:
    from instseg.data.split import split_dataset

    counts = split_dataset(
        Path(args.root),
        val_fraction=args.val,
        seed=args.seed,
        source=args.source,
        group_by_folder=args.group_by_folder,
        train_split=args.train_split,
        val_split=args.val_split,
        overwrite=args.overwrite,
    )
    for split, c in counts.items():
        print(f"{split}: {c['images']} images, {c['instances']} instances -> {Path(args.root) / 'images' / split}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from instseg.data.download import download

    folder = download(args.name, Path(args.dest), url=args.url, sha256=args.sha256, insecure=args.insecure)
    print(f"{args.name} ready at {folder}")
    return 0


def print_report(report: dict[str, Any], files: list[Path], out: str) -> None:
    """The one-line summary `instseg metrics` and `instseg val` print."""
    kind = report["iou_type"]
    key = f"{kind}_map"
    print(
        f"{kind}: mAP50-95 {report[key]:.4f}  mAP50 {report[key + '50']:.4f}  P {report['precision']:.3f}  "
        f"R {report['recall']:.3f}  F1 {report['f1']:.3f} at conf {report['best_confidence']:.3f}  "
        f"Dice {report['dice']:.3f}"
    )
    print(f"wrote {len(files)} files to {out}")


def _metrics(args: argparse.Namespace) -> int:
    from instseg.data.schema import paused_gc

    with paused_gc():  # a results file is hundreds of thousands of dicts: see paused_gc
        return _score_results_file(args)


def _score_results_file(args: argparse.Namespace) -> int:
    from instseg.config import MetricsConfig
    from instseg.data.ground_truth import load_coco
    from instseg.data.schema import check_results, read_json_file
    from instseg.metrics.report import score_results, write_report

    coco_gt = load_coco(Path(args.gt))
    results = check_results(
        read_json_file(Path(args.results)), args.results, coco_gt.imgs, set(coco_gt.getCatIds()), args.iou_type
    )
    report, curves, matrix = score_results(
        coco_gt,
        results,
        args.iou_type,
        MetricsConfig().fitness_weights,
        args.conf,
        args.iou,
        args.backend,
        args.ultralytics,
    )
    names = [coco_gt.cats[c]["name"] for c in sorted(coco_gt.getCatIds())]
    print_report(report, write_report(Path(args.out), report, curves, matrix, names), args.out)
    return 0


def _val(args: argparse.Namespace) -> int:
    from instseg.evaluation import score_model
    from instseg.tracking.model_source import local_model

    with local_model(args.model, _store(args)) as model:
        report, files = score_model(
            model,
            Path(args.data),
            args.split,
            Path(args.out),
            args.iou_type,
            args.device,
            args.batch,
            args.conf,
            args.iou,
            args.backend,
            args.ultralytics,
        )
    print_report(report, files, args.out)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from instseg.predict import predict
    from instseg.tracking.model_source import local_model

    with local_model(args.model, _store(args)) as model:
        summary = predict(
            model,
            args.images,
            args.out,
            device=args.device,
            batch_size=args.batch,
            conf=args.conf,
            gt=args.gt,
            save_images=args.save_images,
        )
    drawn = f", drawn in {summary['drawn']}" if "drawn" in summary else ""
    print(
        f"{summary['detections']} detections on {summary['images']} images ({summary['device']}) -> "
        f"{summary['out']}{drawn}"
    )
    return 0


def _store(args: argparse.Namespace, configured: str | None = None) -> str:
    """The MLflow tracking store a command talks to: --tracking-uri > the config's > MLFLOW_TRACKING_URI > the
    default, relative sqlite paths made absolute (config.absolute_tracking_uri)."""
    from instseg.config import absolute_tracking_uri

    return absolute_tracking_uri(args.tracking_uri or configured)


def _runs_clean(args: argparse.Namespace) -> int:
    from instseg.config import load
    from instseg.tracking.liveness import close_orphaned_runs

    cfg = load(args.config) if args.config else None
    uri = _store(args, cfg.tracking.uri if cfg else None)
    experiments = [args.experiment] if args.experiment else ([cfg.tracking.experiment] if cfg else None)
    closed = close_orphaned_runs(uri, experiments)
    for run_id, name, note in closed:
        print(f"{run_id} '{name}': {note}")
    print(f"{len(closed)} run(s) marked KILLED in {redact(uri)}")
    return 0


def _add_format_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default=None, help="dataset format (default: detected)")
    parser.add_argument(
        "--names",
        default=None,
        help="YOLO class names: a data yaml, 'coco80', or 'a,b,c' "
        "(default: the yaml beside the data, else the 80 COCO names)",
    )


def _models(args: argparse.Namespace) -> int:
    from instseg.tracking.registry import list_versions

    rows = list_versions(_store(args), args.name)
    print(f"{'version':>7}  {'aliases':<22} {'fitness':>10}  {'promotion':<18} run")
    for row in rows:
        fitness = row.fitness if row.fitness == "-" else f"{float(row.fitness):.5f}"
        print(f"{row.version:>7}  {','.join(row.aliases) or '-':<22} {fitness:>10}  {row.decision:<18} {row.run_id}")
    return 0


def _register(args: argparse.Namespace) -> int:
    from instseg.promotion import register_run

    version = register_run(_store(args), args.run, args.name, tags={"source": "instseg register"})
    print(f"registered run {args.run} as {args.name} version {version} (challenger)")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from instseg.config import load, resolve_paths
    from instseg.promotion import describe, promote_on_split

    cfg = resolve_paths(load(args.config, args.overrides))
    print(describe(promote_on_split(cfg, args.name, args.version, decided_by="instseg promote")))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from instseg.tracking.registry import CHAMPION, rollback

    before, after = rollback(_store(args), args.name)
    print(f"{args.name}: {CHAMPION} moved from version {before} back to version {after}")
    return 0


def _config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", default=None, help="YAML run config (see configs/demo.yaml for every key)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")
    return parser


def _evaluation_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--iou-type", choices=("segm", "bbox"), default="segm", help="mask or box IoU (default segm)")
    parser.add_argument("--out", default=out, help=f"output folder (default {out}/)")
    parser.add_argument("--conf", type=float, default=0.25, help="confusion matrix confidence threshold (default 0.25)")
    parser.add_argument("--iou", type=float, default=0.45, help="confusion matrix IoU threshold (default 0.45)")
    parser.add_argument("--backend", choices=("faster", "pycocotools"), default="faster", help=BACKEND_HELP)
    parser.add_argument(
        "--ultralytics",
        action="store_true",
        help="P / R / F1 and confusion matrix exactly as Ultralytics 8.x computes them",
    )


def _inference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=4, help="images per forward pass (default 4)")
    parser.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)


def _registry_command(
    commands: Any, name: str, help_text: str, handler: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """A command about one registered model, found in the tracking server that --tracking-uri names."""
    parser = commands.add_parser(name, help=help_text)
    parser.add_argument("name", help=MODEL_NAME_HELP)
    parser.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Mask R-CNN instance segmentation on Ray: train, tune, evaluate, predict and manage models",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = _config_arguments(commands.add_parser("train", help="train on Ray Train (rerun a run_name to resume)"))
    train.add_argument(
        "--register",
        default=None,
        metavar="NAME",
        help="register the trained model as the next version of NAME (its challenger)",
    )
    train.set_defaults(handler=_on_demand("ray_jobs.train", "train_command"))
    tune = _config_arguments(commands.add_parser("tune", help="search hyperparameters on Ray Tune + Optuna"))
    tune.set_defaults(handler=_on_demand("tuning.tune", "tune_command"))

    flow = commands.add_parser("flow", help="the Prefect flow: tune -> register -> promote")
    flows = flow.add_subparsers(dest="flow_command", required=True, metavar="COMMAND")
    run = _config_arguments(flows.add_parser("run", help="run the flow once, here (synthesizes the demo data)"))
    run.set_defaults(handler=_on_demand("flows.demo", "flow_command"))
    deploy = _config_arguments(
        flows.add_parser(
            "deploy", help="deploy the flow on a schedule to a Prefect work pool (PREFECT_API_URL), or serve it here"
        )
    )
    deploy.add_argument("--cron", default=None, help='cron schedule, e.g. "0 3 * * *" (daily at 03:00)')
    deploy.add_argument("--interval-minutes", type=float, default=None, help="run every N minutes")
    deploy.add_argument("--rrule", default=None, help="RFC 5545 recurrence rule")
    deploy.add_argument("--ray-address", default=None, help="Ray address (default: RAY_ADDRESS or a local instance)")
    deploy.add_argument("--pool", default=None, help="process work pool, created if missing (default: instseg-process)")
    deploy.add_argument(
        "--gpu-slots",
        type=int,
        default=1,
        help="studies training at once: the `gpu` global concurrency limit, if it is created now",
    )
    deploy.add_argument("--serve", action="store_true", help="run the schedule in this process (no pool, no worker)")
    deploy.set_defaults(handler=_on_demand("flows.deploy", "deploy_command"))

    job = commands.add_parser("job", help="Ray jobs on a cluster")
    jobs = job.add_subparsers(dest="job_command", required=True, metavar="COMMAND")
    submit = jobs.add_parser("submit", help="submit a command as a Ray job, follow its logs, exit as it ended")
    submit.add_argument("--address", required=True, help="the head's dashboard, e.g. http://127.0.0.1:8265")
    submit.add_argument("--runtime-env", default=None, help="runtime env YAML, e.g. cluster/runtime_env.yaml")
    submit.add_argument("--working-dir", default=None, help="folder shipped to the cluster (over the runtime env's)")
    submit.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- python -m instseg train --config ...")
    submit.set_defaults(handler=_on_demand("ray_jobs.submit", "submit_command"))
    status = jobs.add_parser("status", help="a job's status, and Ray's message when it failed")
    status.add_argument("job_id", help="the id `job submit` printed")
    status.add_argument("--address", required=True, help="the head's dashboard, e.g. http://127.0.0.1:8265")
    status.set_defaults(handler=_on_demand("ray_jobs.submit", "status_command"))

    val = commands.add_parser("val", help="evaluate a model on a dataset split: metrics.json + plots")
    _inference_arguments(val)
    val.add_argument("--data", required=True, help="dataset in instseg's COCO layout (annotations/ + images/)")
    val.add_argument("--split", default="val", help="the split to evaluate on (default val)")
    _evaluation_arguments(val, "val")
    val.set_defaults(handler=_val)

    pred = commands.add_parser("predict", help="predict images -> COCO results JSON (and drawn images)")
    _inference_arguments(pred)
    pred.add_argument("images", nargs="+", help="image files, folders and glob patterns ('photos/**/*.jpg')")
    pred.add_argument("--out", default="preds.json", help="results JSON path (default preds.json)")
    pred.add_argument("--conf", type=float, default=0.0, help="keep detections scoring at least this (default 0: all)")
    pred.add_argument("--gt", default=None, help="COCO annotations: take each image's id from it, by file_name")
    pred.add_argument(
        "--save-images",
        default=None,
        metavar="DIR",
        help="draw masks, boxes, classes and scores on each image, written to DIR as PNG",
    )
    pred.set_defaults(handler=_predict)

    _registry_command(commands, "models", "a registered model's versions, aliases and promotion fitness", _models)
    register = _registry_command(commands, "register", "register a training run's model as its challenger", _register)
    register.add_argument("--run", required=True, help="the MLflow run id of a finished training run")
    promote = commands.add_parser("promote", help="the gate: challenger vs champion on the config's val split")
    promote.add_argument("name", help=MODEL_NAME_HELP)
    promote.add_argument("--version", default=None, help="make this version the challenger first")
    _config_arguments(promote)
    promote.set_defaults(handler=_promote)
    _registry_command(commands, "rollback", "move champion back to the version it replaced", _rollback)

    met = commands.add_parser("metrics", help="evaluate a COCO results file: metrics.json + plots")
    met.add_argument("gt", help="COCO ground truth JSON")
    met.add_argument("results", help="COCO results JSON (a list of detections)")
    _evaluation_arguments(met, "metrics")
    met.set_defaults(handler=_metrics)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the deterministic synthetic COCO dataset")
    synth.add_argument("out", help="output folder (images/{train,val}, annotations/instances_{train,val}.json)")
    synth.add_argument("--images", type=int, default=48, help="number of images in all (default 48, 1/4 for val)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    synth.set_defaults(handler=_synth)

    conv = data.add_parser("convert", help="convert COCO / Roboflow / YOLO-seg to instseg's COCO layout")
    conv.add_argument("src", help="source dataset folder")
    conv.add_argument("dst", help="output folder (annotations/instances_{split}.json + images/{split}/)")
    _add_format_options(conv)
    conv.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    conv.set_defaults(handler=_convert)

    down = data.add_parser("download", help="download a public dataset and convert it (coco8-seg, coco128-seg)")
    down.add_argument("name", help="dataset name: coco8-seg or coco128-seg")
    down.add_argument("--dest", default="data", help="parent folder (default data/; the dataset lands in DEST/NAME)")
    down.add_argument("--url", default=None, help="download from this URL instead (a mirror)")
    down.add_argument("--sha256", default=None, help="expected sha256 of the zip (default: the pinned one)")
    down.add_argument("--insecure", action="store_true", help="accept a zip without a sha256 to check it against")
    down.set_defaults(handler=_download)

    check = data.add_parser("check", help="summarise a dataset and list every problem (exit 1 if any)")
    check.add_argument("path", nargs="?", default=None, help="dataset folder, any format (default: data.root)")
    check.add_argument("--config", default=None, help="a run config: also warn when its train / val split is missing")
    check.add_argument(
        "--decode",
        action="store_true",
        help="decode every image (default: a JPEG or PNG that opens and ends with its end marker counts as whole)",
    )
    check.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    _add_format_options(check)
    check.set_defaults(handler=_check)

    split = data.add_parser("split", help="write a seeded, class-stratified train/val split of a one-split dataset")
    split.add_argument("root", help="dataset in instseg's COCO layout (annotations/instances_*.json + images/*/)")
    split.add_argument("--val", type=float, default=0.2, help="share of the images for val (default 0.2)")
    split.add_argument("--seed", type=int, default=0, help="random seed (default 0): the same seed, the same split")
    split.add_argument("--source", default=None, help="the split to divide (default: the only one there)")
    split.add_argument("--group-by-folder", action="store_true", help="keep a folder's images together")
    split.add_argument("--train-split", default="train", help="name of the new training split (default train)")
    split.add_argument("--val-split", default="val", help="name of the new validation split (default val)")
    split.add_argument("--overwrite", action="store_true", help="replace existing splits of those names")
    split.set_defaults(handler=_split)

    tracking = commands.add_parser("tracking", help="the MLflow tracking server a team shares")
    trackings = tracking.add_subparsers(dest="tracking_command", required=True, metavar="COMMAND")
    serve = trackings.add_parser("serve", help="run an MLflow server: PostgreSQL store, proxied artifacts, basic auth")
    serve.add_argument(
        "--backend", required=True, help="postgresql://USER@HOST:PORT/DB (or sqlite:////abs.db: one machine)"
    )
    serve.add_argument("--artifacts", required=True, help="where artifacts go, through the server: a folder or a URI")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0: all)")
    serve.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    serve.add_argument("--workers", type=int, default=2, help="server processes (default 2)")
    serve.add_argument(
        "--auth",
        action="store_true",
        help="MLflow basic auth; the admin's first password from MLFLOW_AUTH_ADMIN_PASSWORD",
    )
    serve.set_defaults(handler=_on_demand("instseg.tracking.server", "serve_command"))

    runs = commands.add_parser("runs", help="MLflow runs").add_subparsers(dest="runs_command", required=True)
    clean = runs.add_parser("clean", help="mark KILLED every RUNNING run whose driver is gone (SIGKILL, lost machine)")
    clean.add_argument("--config", default=None, help="a run config: its tracking.uri and tracking.experiment")
    clean.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default: the config's, else MLFLOW_TRACKING_URI)"
    )
    clean.add_argument("--experiment", default=None, help="only this experiment (default: the config's, else all)")
    clean.set_defaults(handler=_runs_clean)

    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """argparse, except that key=value overrides may also follow options and positionals (`instseg promote NAME
    --config F key=value`): argparse takes a command's positionals in one go, at the first of them."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extras):
        args.overrides = [*args.overrides, *extras]
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def parse_command(words: Sequence[str], argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments of `instseg WORDS ARGV...` (ARGV defaults to sys.argv[1:]): the python -m aliases' parser."""
    return parse_arguments([*words, *(sys.argv[1:] if argv is None else argv)])


def guarded(call: Callable[[], int]) -> int:
    """Run a command: a user's mistake ends as one line and its exit status (2), a failed run as one line and
    exit 1, a bug of ours as one line pointing at its traceback in a log file; never a traceback."""
    try:
        return call()
    except InstsegError as exc:
        print(f"{PROG}: error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Exception as exc:  # noqa: BLE001 (a failed run, or our bug: one line, the traceback in a log file)
        failed_run = type(exc).__name__ in FAILED_RUN_ERRORS
        return report_unexpected(exc, PROG, "run failed" if failed_run else "internal error")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    return guarded(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
