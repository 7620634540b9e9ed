"""Generated C vs torch.ao int8 (fbgemm) vs float PyTorch, one thread each, side by side in
one run; the C of a base commit (before) and of this tree (after); the integer engine.

    flock /tmp/fixq-heavy.lock python benchmarks/c_speed_table.py [--models cifar10-resnet20 efficientnet-lite0]

Writes benchmarks/results/c_speed.md. Plan: <8b,8b>, 3D coefficients, maxabs (the defaults,
unsigned data), calibrated on the standard split's first images. C: gcc -std=c99 -O3, batch 1,
the whole program timed (process start and file I/O included); PyTorch: batched.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from fixq.app.common import make_config
from fixq.backends.engine import Engine
from fixq.backends.export_c import export_c, run_c_program
from fixq.backends.export_c.run import build
from fixq.algorithms.pipeline import open_session, run_config
from fixq.analysis.report import markdown_table

from ptq_table import SETUPS, cpu_name

O3 = "-std=c99 -O3 -Wall -Wextra -Werror"
SIZES = {"cifar10-resnet20": (128, 256, 16), "efficientnet-lite0": (32, 8, 2)}  # calib, C images, engine images


def best_rate(fn, n, reps=2):
    """Images per second of CPU time (this process, one thread): the 2 cores are shared."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return n / best


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def torch_ao_int8(model, calib, x):
    """torch.ao FX PTQ, fbgemm, default qconfig; returns the quantized module or the error."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, get_default_qconfig_mapping("fbgemm"), (calib[:2],))
        with torch.no_grad():
            prepared(calib)
        return convert_fx(prepared)


def export_before(base_src: Path, plan_path: Path, weights, model: str, out: Path) -> None:
    """The base commit's exporter (its own CLI) on the same plan."""
    cmd = [sys.executable, "-m", "fixq", "export-c", "--plan", str(plan_path), "--model", model, "--out", str(out),
           "--no-build"] + (["--weights", weights] if weights else [])
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(base_src)}, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["cifar10-resnet20"], choices=list(SIZES))
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--base", default="918aad5", help="commit of the 'before' C")
    ap.add_argument("--work", default="/tmp/fixq-c-speed")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.time()
    work = Path(args.work)
    base_src = work / "base"
    if not (base_src / "src").exists():
        base_src.mkdir(parents=True, exist_ok=True)
        root = Path(__file__).resolve().parents[1]
        tar = subprocess.run(["git", "-C", str(root), "archive", args.base, "src"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(base_src)], input=tar.stdout, check=True)
    rows = []
    for name in args.models:
        data, weights, _, _ = SETUPS[name]
        nc, nimg, neng = SIZES[name]
        shared = Path(args.shared)
        w = str(shared / weights) if weights else None
        s = open_session(name, str(shared / data), str(shared / data), w, calib_size=nc, eval_size=nimg, seed=0,
                         show_progress=False)
        plan = run_config(s, make_config(coeff_mode="3D")).plan
        g, x = s.graph, s.eval_stream.tensor()
        eng = Engine(g, plan)
        q = eng.quantize_input(x)
        ref = eng.run(q).reshape(len(x), -1)
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        plan.save(d / "plan.json")
        after = export_c(g, plan, d / "after")
        build(after.out, cflags=O3)
        native = d / "after-native"
        shutil.rmtree(native, ignore_errors=True)
        shutil.copytree(after.out, native)
        build(native, cflags=O3 + " -march=native")
        export_before(base_src / "src", d / "plan.json", w, name, d / "before")
        build(d / "before", cflags=O3)
        rates = {}
        for tag, cdir in (("before", d / "before"), ("after", after.out), ("native", native)):
            out, _ = run_c_program(cdir, q)  # warm-up and the bit-exactness check
            assert torch.equal(out, ref), f"{tag} C != engine"
            best = float("inf")
            for _ in range(2):
                t = child_cpu()
                run_c_program(cdir, q)
                best = min(best, child_cpu() - t)
            rates[tag] = len(x) / best
        from fixq.data.zoo import build_model
        model, _ = build_model(name, w)
        model = model.cpu().eval()
        with torch.no_grad():
            r_float = best_rate(lambda: model(x), len(x))
            try:
                qm = torch_ao_int8(model, s.calib_stream.tensor(), x)
                r_ao = best_rate(lambda: qm(x), len(x))
            except Exception as e:  # noqa: BLE001 (reported in the table)
                print(f"torch.ao failed on {name}: {e}", flush=True)
                r_ao = float("nan")
            r_eng = best_rate(lambda: eng.run(q[:neng]), neng, reps=1)
        rows.append([name, len(x), r_float, r_ao, rates["before"], rates["after"], rates["native"],
                     rates["after"] / rates["before"], rates["before"] / r_ao, rates["after"] / r_ao,
                     rates["native"] / r_ao, r_eng, r_eng / r_float])
        print(rows[-1], flush=True)
    table = markdown_table(["model", "images", "float32 img/s", "torch.ao int8 img/s", f"C {args.base} img/s",
                            "C now img/s", "C now -march=native img/s", "C speed-up", "C before / int8", "C now / int8",
                            "C native / int8", "engine img/s",
                            "engine / float"], rows)
    text = ("# Generated C speed\n\n" f"Command: `python benchmarks/c_speed_table.py --models {' '.join(args.models)}`; "
            f"{time.strftime('%Y-%m-%d')}; {cpu_name()}, one thread for every column (torch.set_num_threads(1); "
            f"the C is single-threaded); rates are images per CPU second (user+sys, best of 2) because other "
            f"jobs share the 2 cores; wall time {time.time() - t_start:.0f} s.\n"
            f"C: `gcc {O3}` (portable, no -march), batch 1, whole program (file I/O included); before = the exporter of "
            f"{args.base} on the same plan; both C outputs equal the integer engine (checked). PyTorch batched; "
            "torch.ao: FX PTQ, fbgemm, default qconfig. Plan: <8b,8b> 3D coefficients, defaults.\n\n"
            f"{table}\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "c_speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
