"""Run ``fixq mixed`` or ``fixq kmeans`` on a real model and write its tables, command,
machine, date and wall time to ``benchmarks/results/{mixed,kmeans}_<model>.md``.

    python benchmarks/search_table.py mixed --model cifar10-resnet20 [--device cuda] [-- extra fixq args]
    python benchmarks/search_table.py kmeans --model cifar10-resnet20
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {
    "cifar10-resnet20": ("models/cifar10-resnet/resnet20-12fca82f.th", "data/cifar10-test", 512),
    "cifar10-resnet32": ("models/cifar10-resnet/resnet32-d509ac18.th", "data/cifar10-test", 512),
    "efficientnet-lite0": (None, "data/imagenet-sample", 128),
}


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return f"{cpu} ({torch.get_num_threads()} threads){'; ' + gpu if gpu else ''}; torch {torch.__version__}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["mixed", "kmeans"])
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tag", default="", help="suffix of the results file (--tag=-x for one that starts with -)")
    a, extra = ap.parse_known_args()  # everything after -- goes to fixq
    a.extra = [e for e in extra if e != "--"]
    weights, data, ncal = MODELS[a.model]
    shared = Path(a.shared)
    out = HERE / "out" / f"{a.command}-{a.model}{a.tag}"
    cmd = [sys.executable, "-m", "fixq", a.command, "--model", a.model, "--calib", str(shared / data),
           "--calib-size", str(ncal), "--eval", str(shared / data), "--device", a.device, "--out", str(out),
           "--quiet", *a.extra]
    if weights:
        cmd[6:6] = ["--weights", str(shared / weights)]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode:
        print(res.stdout, res.stderr, file=sys.stderr)
        return res.returncode
    rep = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text().split("\n## ", 1)[1]
    shown = " ".join(c if " " not in c else f"'{c}'" for c in cmd[4:]).replace(str(shared), "../shared")
    shown = shown.replace(str(out), f"benchmarks/out/{out.name}")
    text = (f"### {a.command}: {a.model}{a.tag}\n\nCommand: `python -m fixq {a.command} {shown}` "
            f"(via `python benchmarks/search_table.py {a.command} --model {a.model}"
            f"{' --device ' + a.device if a.device != 'cpu' else ''}{' --tag=' + a.tag if a.tag else ''}{' -- ' + ' '.join(a.extra) if a.extra else ''}`)  \n"
            f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; wall time {wall:.0f} s "
            f"(search {rep['timings'].get('total_s', rep['timings'].get('search_s', 0)):.0f} s).\n\n## " + md)
    dest = HERE / "results" / f"{a.command}_{a.model}{a.tag}.md"
    dest.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
