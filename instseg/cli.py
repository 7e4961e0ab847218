"""`instseg` command line: thin wiring over the library. Training and tuning run on Ray:

    python -m ray_jobs.train --config configs/demo.yaml
    python -m tuning.tune --config configs/demo.yaml
    python -m flows.demo --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from instseg.data.formats import FORMATS
from instseg.errors import INTERRUPTED_EXIT, InstsegError, report_unexpected
from instseg.redaction import redact


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
    report = check_dataset(Path(path), fmt=args.format, names=args.names)
    print(format_report(report))
    for warning in missing_split_warnings(report, data):
        print(f"warning: {warning}")
    return 0 if report.clean else 1


def _split(args: argparse.Namespace) -> int:
    from instseg.data.split import split_dataset

    counts = split_dataset(
        Path(args.root), val_fraction=args.val, seed=args.seed, source=args.source,
        group_by_folder=args.group_by_folder, train_split=args.train_split, val_split=args.val_split,
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


def _metrics(args: argparse.Namespace) -> int:
    from instseg.config import MetricsConfig
    from instseg.data.coco import load_coco
    from instseg.data.schema import check_results, read_json_file
    from instseg.metrics.report import evaluate_results, write_report

    coco_gt = load_coco(Path(args.gt))
    results = check_results(
        read_json_file(Path(args.results)), args.results, coco_gt.imgs, set(coco_gt.getCatIds()), args.iou_type
    )
    report, curves, matrix = evaluate_results(
        coco_gt, results, args.iou_type, MetricsConfig().fitness_weights, args.conf, args.iou, args.backend
    )
    names = [coco_gt.cats[c]["name"] for c in sorted(coco_gt.getCatIds())]
    files = write_report(Path(args.out), report, curves, matrix, names)
    key = f"{args.iou_type}_map"
    print(f"{args.iou_type}: mAP50-95 {report[key]:.4f}  mAP50 {report[key + '50']:.4f}  P {report['precision']:.3f}  "
          f"R {report['recall']:.3f}  F1 {report['f1']:.3f} at conf {report['best_confidence']:.3f}  Dice {report['dice']:.3f}")
    print(f"wrote {len(files)} files to {args.out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from instseg.predict import predict

    summary = predict(args.model, args.images, args.out, tracking_uri=args.tracking_uri, device=args.device,
                      batch_size=args.batch)
    print(f"{summary['detections']} detections on {summary['images']} images ({summary['device']}) -> {summary['out']}")
    return 0


OVERWRITE_HELP = "replace a non-empty output folder that instseg did not write (swapped in only when complete)"


def _runs_clean(args: argparse.Namespace) -> int:
    from instseg.config import absolute_tracking_uri, load
    from instseg.tracking.liveness import close_orphaned_runs

    cfg = load(args.config) if args.config else None
    uri = absolute_tracking_uri(args.tracking_uri or (cfg.tracking.uri if cfg else None))
    experiments = [args.experiment] if args.experiment else ([cfg.tracking.experiment] if cfg else None)
    closed = close_orphaned_runs(uri, experiments)
    for run_id, name, note in closed:
        print(f"{run_id} '{name}': {note}")
    print(f"{len(closed)} run(s) marked KILLED in {redact(uri)}")
    return 0


def _add_format_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default=None, help="dataset format (default: detected)")
    parser.add_argument(
        "--names", default=None, help="YOLO class names: a data yaml, 'coco80', or 'a,b,c' (default: the yaml beside the data, else the 80 COCO names)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instseg", description="Mask R-CNN instance segmentation tools")
    commands = parser.add_subparsers(dest="command", required=True)

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

    runs = commands.add_parser("runs", help="MLflow runs").add_subparsers(dest="runs_command", required=True)
    clean = runs.add_parser("clean", help="mark KILLED every RUNNING run whose driver is gone (SIGKILL, lost machine)")
    clean.add_argument("--config", default=None, help="a run config: its tracking.uri and tracking.experiment")
    clean.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default: the config's, else MLFLOW_TRACKING_URI)"
    )
    clean.add_argument("--experiment", default=None, help="only this experiment (default: the config's, else all)")
    clean.set_defaults(handler=_runs_clean)

    met = commands.add_parser("metrics", help="evaluate a COCO results file: metrics.json + plots")
    met.add_argument("gt", help="COCO ground truth JSON")
    met.add_argument("results", help="COCO results JSON (a list of detections)")
    met.add_argument("--iou-type", choices=("segm", "bbox"), default="segm", help="mask or box IoU (default segm)")
    met.add_argument("--out", default="metrics", help="output folder (default metrics/)")
    met.add_argument("--conf", type=float, default=0.25, help="confusion matrix confidence threshold (default 0.25)")
    met.add_argument("--iou", type=float, default=0.45, help="confusion matrix IoU threshold (default 0.45)")
    met.add_argument("--backend", choices=("faster", "pycocotools"), default="faster",
                     help="COCO scoring library (default faster: faster-coco-eval, the same stats)")
    met.set_defaults(handler=_metrics)

    pred = commands.add_parser("predict", help="predict images -> COCO results JSON")
    pred.add_argument("--model", required=True, help="models:/NAME@champion, a bundle folder or a checkpoint")
    pred.add_argument("images", nargs="+", help="image files")
    pred.add_argument("--out", default="preds.json", help="results JSON path (default preds.json)")
    pred.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    pred.add_argument("--batch", type=int, default=4, help="images per forward pass (default 4)")
    pred.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    pred.set_defaults(handler=_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except InstsegError as exc:
        print(f"instseg: error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("instseg: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Exception as exc:  # noqa: BLE001 (our bug: one line, the traceback in a log file)
        return report_unexpected(exc, "instseg")


if __name__ == "__main__":
    sys.exit(main())
