"""ROM/RAM of the generated C before (a base commit's exporter) and after (this tree, with and
without 4-bit packing), Cortex-M4 text/data/bss and instructions per image on QEMU.

    flock /tmp/fixq-heavy.lock python benchmarks/c_size_table.py [--models cifar10-resnet20 lenet-digits]

Writes benchmarks/results/c_size.md. Plans: <8b,8b> 3D coefficients (defaults), and
per-layer 8/4 mixes (4-bit coefficients in every conv but the first and the linear layer;
the same with signed data for an int8 arena); with ``--search`` also the tuned plan of the
``fixq mixed`` search (8 or 4 bits per 2D filter, stored int4/int8 per filter) and the plan of
the ``fixq kmeans`` search (<8b,4b> residuals, int4 packed), on ``--eval-size`` images.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fixq.app.common import make_config
from fixq.backends.engine import Engine
from fixq.backends.export_c import export_c, run_c_program
from fixq.backends.export_c.targets import INSNS_PER_TICK, build_target, runner_for, size_report, tools_missing
from fixq.algorithms.pipeline import open_session, run_config
from fixq.planning.plan import QuantConfig
from fixq.analysis.report import markdown_table

from c_speed_table import export_before
from ptq_table import SETUPS, cpu_name

DIGITS = "digits"


def searched(s):
    """(label, plan) rows of the two searches: fixq mixed's tuned plan, fixq kmeans' plan."""
    from fixq.algorithms.kmeans_search import KMeansOptions, search_kmeans
    from fixq.algorithms.mixed_search import MixedOptions, search_mixed
    base = make_config()
    mx = search_mixed(s, base, MixedOptions(target_drop=1.0, trials=8, strategies=("global",)))
    km = search_kmeans(s, base, KMeansOptions(target_drop=2.0))
    ks = ", ".join(f"{k}={v}" for k, v in km.ks.items())
    return [(f"fixq mixed, tuned (2D, {mx.tuned.low_filters_pct:.0f}% of 2D filters 4-bit)", mx.tuned.plan),
            (f"fixq kmeans, <8b,4b> residuals ({ks})", km.plan)]


def plans(s, name):
    """(label, plan) rows: the default 8-bit plan and per-layer 8/4 mixes."""
    base = make_config(coeff_mode="3D")
    convs = [n.name for n in s.graph.layers()]
    four = tuple((n, {"coeff_bits": 4}) for n in convs[1:-1])
    out = [("<8b,8b> 3D", run_config(s, base).plan),
           ("8/4 per layer (4-bit inner convs)", run_config(s, QuantConfig(base.default, base.rounding, four)).plan)]
    signed = make_config(coeff_mode="3D", data_sign="signed")
    out.append(("8/4 per layer, signed data", run_config(s, QuantConfig(signed.default, signed.rounding, four)).plan))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["lenet-digits", "cifar10-resnet20"])
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--base", default="918aad5")
    ap.add_argument("--work", default="/tmp/fixq-c-size")
    ap.add_argument("--m4-images", type=int, default=2)
    ap.add_argument("--search", action="store_true", help="add the fixq mixed and fixq kmeans plans")
    ap.add_argument("--search-models", default="lenet-digits,cifar10-resnet20", help="models --search applies to")
    ap.add_argument("--m4-models", default="lenet-digits,cifar10-resnet20",
                    help="models also run on the Cortex-M4 (QEMU board: 4 MB; larger models do not fit)")
    ap.add_argument("--eval-size", type=int, default=16, help="evaluation images (the searches tune on half)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    t0 = time.time()
    work = Path(args.work)
    base_src = Path("/tmp/fixq-c-speed/base/src")
    rows, m4 = [], []
    for name in args.models:
        if name == "lenet-digits":
            from fixq.data.digits import export_digits
            d = export_digits(work / "digits", "test")
            s = open_session(name, str(d), str(d), None, calib_size=128, eval_size=args.eval_size, seed=0, show_progress=False)
            w = None
        else:
            data, wts, _, _ = SETUPS[name]
            w = str(Path(args.shared) / wts) if wts else None
            s = open_session(name, str(Path(args.shared) / data), str(Path(args.shared) / data), w, calib_size=128,
                             eval_size=args.eval_size, seed=0, show_progress=False)
        rows_here = plans(s, name) + (searched(s) if args.search and name in args.search_models.split(",") else [])
        for k, (label, plan) in enumerate(rows_here):
            d = work / f"{name}-{k}"
            d.mkdir(parents=True, exist_ok=True)
            plan.save(d / "plan.json")
            meta = {"preprocess": asdict(s.preprocess)} if hasattr(s, "preprocess") else None
            before = None
            if base_src.exists():
                export_before(base_src, d / "plan.json", w, name, d / "before")
                before = json.loads((d / "before" / "export.json").read_text())
            packed = export_c(s.graph, plan, d / "packed", meta=meta)
            plain = export_c(s.graph, plan, d / "plain", meta=meta, pack=False)
            rows.append([name, label, before["rom_bytes"] if before else "n/a", plain.rom_bytes, packed.rom_bytes,
                         before["ram_bytes"] if before else "n/a", packed.act_bytes, packed.arena_bytes,
                         16 * len(s.graph.nodes)])
            print(rows[-1], flush=True)
            if (k != 0 and k < 3) or tools_missing("cortex-m4") or name not in args.m4_models.split(","):
                continue
            eng = Engine(s.graph, plan)
            q = eng.quantize_input(s.eval_stream.subset(range(args.m4_images)).tensor())
            got, sat = run_c_program(packed.out, q, runner=runner_for("cortex-m4"),
                                     exe=build_target(packed.out, "cortex-m4"))
            same = torch.equal(got, eng.run(q).reshape(len(q), -1))
            line = size_report(packed.out)[0]
            plain_text = size_report(plain.out)[0].split("text ", 1)[1].split(" B", 1)[0]
            m4.append([name, label, line.split(": ", 1)[1], plain_text, sat["ticks"] * INSNS_PER_TICK // len(q),
                       "yes" if same else "NO"])
            print(m4[-1], flush=True)
    table = markdown_table(["model", "plan", f"ROM {args.base} [B]", "ROM now, unpacked [B]", "ROM now, packed [B]",
                            f"RAM {args.base} (arena) [B]", "activations now [B]", "arena now [B]",
                            "counters (-DFIXQ_COUNTS=1) [B]"], rows)
    m4t = markdown_table(["model", "plan", "arm-none-eabi-size (-O2), packed", "text unpacked [B]",
                          "instructions / image (QEMU -icount)", "== engine"], m4) if m4 else "(arm-none-eabi-gcc / qemu-system-arm absent)"
    flags = f" --search --eval-size {args.eval_size}" if args.search else ""
    text = (f"Command: `python benchmarks/c_size_table.py --models {' '.join(args.models)}{flags}`; "
            f"{time.strftime('%Y-%m-%d')}; {cpu_name()}; wall time {time.time() - t0:.0f} s.\n\n"
            "ROM = const tables the exporter writes (weights, shifts, biases, bounds, pixel table), its own count; "
            f"{args.base}'s RAM figure was its static arena (activations only; counters and K-means maps aside). "
            "Now: the caller's arena holds activations and the kernels' scratch (hwc rows, im2col rows, sum "
            "rows); counters exist only in verification builds.\n\n"
            f"{table}\n\nCortex-M4 (QEMU mps2-an386, newlib semihosting harness): sizes of model.c + runtime "
            "(no harness) and the instructions QEMU executed per image inside fixq_model_run (SysTick at 25 MHz "
            f"under -icount shift=0: one tick = {INSNS_PER_TICK} instructions). An instruction count, not cycles: "
            "a real M4 adds wait states, 2-cycle loads and branch refills.\n\n" + m4t + "\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "c_size.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
