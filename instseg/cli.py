"""`instseg` command line: thin wiring over the library. Training and tuning run on Ray:

    python -m ray_jobs.train --config configs/demo.yaml
    python -m tuning.tune --config configs/demo.yaml
    python -m flows.demo --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from instseg.errors import InstsegError


def _synth(args: argparse.Namespace) -> int:
    from instseg.data.synth import synthesize

    counts = synthesize(args.out, images=args.images, seed=args.seed)
    print(f"wrote {args.out}: {json.dumps(counts)}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from instseg.predict import predict

    summary = predict(args.model, args.images, args.out, tracking_uri=args.tracking_uri)
    print(f"{summary['detections']} detections on {summary['images']} images -> {summary['out']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instseg", description="Mask R-CNN instance segmentation tools")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the deterministic synthetic COCO dataset")
    synth.add_argument("out", help="output folder (images/{train,val}, annotations/instances_{train,val}.json)")
    synth.add_argument("--images", type=int, default=48, help="number of images in all (default 48, 1/4 for val)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.set_defaults(handler=_synth)

    pred = commands.add_parser("predict", help="predict images -> COCO results JSON")
    pred.add_argument("--model", required=True, help="models:/NAME@champion, a bundle folder or a checkpoint")
    pred.add_argument("images", nargs="+", help="image files")
    pred.add_argument("--out", default="preds.json", help="results JSON path (default preds.json)")
    pred.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    pred.set_defaults(handler=_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except InstsegError as exc:
        print(f"instseg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:
        print(f"instseg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
