#!/usr/bin/env bash
# Assemble benchmarks/RESULTS.md from the analysis (results_intro.md) and the tables the
# scripts wrote to benchmarks/results/.
cd "$(dirname "$0")"
{
  cat results_intro.md
  echo "## Default range rules: data methods x data sign at <8b,8b> (issue 13)"; echo
  for m in cifar10-resnet20 cifar10-resnet32 efficientnet-lite0; do
    for f in results/methods_$m.md results/methods_$m-cpu.md; do [ -f "$f" ] && { cat "$f"; echo; }; done
  done
  echo "## Peers: power-of-two PTQ through their own APIs (issue 13)"; echo
  for m in cifar10-resnet20 cifar10-resnet32 efficientnet-lite0; do
    [ -f results/peers_$m.md ] && { cat results/peers_$m.md; echo; }
  done
  echo "## Paper Tables 2/5 shape: PTQ accuracy vs PyTorch's quantizer (issue 3)"; echo
  for m in cifar10-resnet20 cifar10-resnet32 efficientnet-lite0; do
    [ -f results/ptq_$m.md ] && { cat results/ptq_$m.md; echo; }
  done
  echo "The first GPU run (TF32 left on by PyTorch's default for the float reference and fast"
  echo "simulation) is kept in \`results/gpu-tf32/\`; its CIFAR numbers agree with the CPU tables"
  echo "above within 0.05 points on the fixq rows."; echo
  echo "## Simulation speed (issue 2)"; echo
  [ -f results/throughput_cuda.md ] && { cat results/throughput_cuda.md; echo; }
  [ -f results/throughput_cpu.md ] && { cat results/throughput_cpu.md; echo; }
  cat results_speed_notes.md 2>/dev/null; echo
  echo "## Integer engine and generated C (issue 4)"; echo
  [ -f results/engine_c.md ] && { cat results/engine_c.md; echo; }
  echo "## Complexity: AlexNet in the paper's Table 1 and Table 2 form (issue 5)"; echo
  cat results/complexity_alexnet.md; echo
  echo "## Energy-based 8/4-bit mixed precision, paper Table 3 shape (issue 6)"; echo
  for m in cifar10-resnet20 cifar10-resnet32 efficientnet-lite0; do
    for f in results/mixed_$m*.md; do [ -f "$f" ] && { cat "$f"; echo; }; done
  done
  echo "## K-means clustered kernels, paper Tables 4 and 6 shape (issue 7)"; echo
  for m in cifar10-resnet20 cifar10-resnet32 efficientnet-lite0; do
    for f in results/kmeans_$m*.md; do [ -f "$f" ] && { cat "$f"; echo; }; done
  done
  [ -f results/kmeans_first_trial.md ] && { cat results/kmeans_first_trial.md; echo; }
  [ -f results/search_speed_notes.md ] && { cat results/search_speed_notes.md; echo; }
  for m in cifar10-resnet20 cifar10-resnet32 efficientnet-lite0; do
    [ -f results/search_speed_$m.md ] && { cat results/search_speed_$m.md; echo; }
  done
  echo "## ONNX in / QDQ ONNX out (issue 8)"; echo
  [ -f results/onnx.md ] && cat results/onnx.md
  [ -f results/memory.md ] && { echo; echo "## Bounded memory: streaming (issue 14)"; echo; sed 1d results/memory.md; }
  sec() { [ -f "$2" ] && { echo; echo "## $1"; echo; sed 1d "$2"; }; }
  sec "Generated C speed: fast kernels (issue 17)" results/c_speed.md
  [ -f results/c_speed_notes.md ] && { echo; cat results/c_speed_notes.md; }
  sec "Generated C size, packed weights, Cortex-M4 (issues 17, 22)" results/c_size.md
  sec "Learned rounding and bias correction (issue 18)" results/learned_rounding.md
  [ -f results/paper_switch.md ] && { echo; echo "## The paper's choices (--paper) vs fixq's defaults (issue 20)"; echo; cat results/paper_switch.md; }
  for m in cifar10-resnet20 cifar10-resnet32 efficientnet-lite0; do
    [ -f results/paper_kmeans_$m.md ] && { echo; cat results/paper_kmeans_$m.md; }
  done
  for m in cifar10-resnet20 cifar10-resnet32 efficientnet-lite0; do
    [ -f results/paper_mixed_$m.md ] && { echo; cat results/paper_mixed_$m.md; }
  done
  sec "Mobile-CNN ops: tables, squeeze-and-excitation, channel shuffle (issue 21)" results/mobile_ops.md
  sec "Ties at the top of 8-bit logits (session 18)" results/output_ties.md
} > RESULTS.md
echo "wrote $(pwd)/RESULTS.md"
