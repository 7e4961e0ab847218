#!/usr/bin/env bash
# Every GPU measurement of bench/gpu_train.py in one command, for a GPU machine without network whose Python
# has torch and torchvision only. Prepare here, in the project root (once; .device/ stays out of git):
#   ../shared/tools/device-env.sh .device/env.tar.xz faster-coco-eval==1.8.0   # Ray, MLflow, pydantic, COCO tools
#   cp -r ../shared/datasets/coco128-seg .device/                                # for the loader section
#   echo /.device/ >> .git/info/exclude
# then send the tree with .device/ to the GPU machine and run there, from the project root:
#   bash bench/gpu_session.sh [bench/gpu_train.py options]        # table on stdout, rows in $OUT or ./gpu_train.json
# All sections took 374 s on an H200; --budget-s (default 440 here) skips sections that would not fit.
set -o pipefail
mkdir -p /tmp/site && tar -xJf .device/env.tar.xz -C /tmp/site || exit 2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 520 python bench/gpu_train.py --coco128 .device/coco128-seg --budget-s 440 --json "$out/gpu_train.json" "$@" \
  2>&1 | tee "$out/gpu_train.log"
