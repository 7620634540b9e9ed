"""Where an exported model runs: ``host`` (cc), ``cortex-m4`` (arm-none-eabi-gcc, bare metal on
QEMU's mps2-an386 board, newlib semihosting for the files) and ``arm-linux``
(arm-linux-gnueabihf-gcc -static under qemu-arm); the ARM sizes and a stack bound.

The Cortex-M4 harness counts SysTick ticks of the 25 MHz core clock around the runs; QEMU runs
with ``-icount shift=0`` (every instruction takes 1 ns of virtual time), so one tick is 40
executed instructions. That is an instruction count of QEMU's Thumb-2 translation (exact up to
one tick per image), not a cycle count: it ignores wait states, pipeline stalls and multi-cycle
instructions (MUL/MLA 1 cycle, loads 2, taken branches 1-3 on a real M4).

>>> exe = build_target("build/lenet", "cortex-m4")      # doctest: +SKIP
>>> run_c_program("build/lenet", codes, runner=runner_for("cortex-m4"), exe=exe)  # doctest: +SKIP
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from fixq.backends.engine import EngineError
from fixq.backends.export_c.run import build

__all__ = ["TARGETS", "M4_FLAGS", "tools_missing", "build_target", "runner_for", "size_report", "stack_bound",
           "INSNS_PER_TICK"]

HERE = Path(__file__).parent
M4_FLAGS = ["-std=c99", "-mcpu=cortex-m4", "-mthumb", "-O2", "-Wall", "-Wextra", "-Werror"]
INSNS_PER_TICK = 40  # 25 MHz SysTick against 1 ns per instruction (-icount shift=0)
TARGETS = {"host": ("cc",), "cortex-m4": ("arm-none-eabi-gcc", "qemu-system-arm"),
           "arm-linux": ("arm-linux-gnueabihf-gcc", "qemu-arm")}


def tools_missing(target: str) -> list[str]:
    return [t for t in TARGETS[target] if shutil.which(t) is None]


def _sources(cdir: Path) -> list[str]:
    return ["main.c", "model.c"] + sorted(p.name for p in cdir.glob("fixq_rt*.c"))


def _cc(cmd: list[str], cdir: Path) -> None:
    r = subprocess.run(cmd, cwd=cdir, capture_output=True, text=True)
    if r.returncode != 0:
        raise EngineError(f"compiling {cdir} with {cmd[0]} failed:\n{r.stderr.strip()[-2000:]}")


def build_target(cdir, target: str = "host", opt: str = "-O2") -> Path:
    """Compile the verification harness (counters on) for ``target``; returns the binary."""
    cdir = Path(cdir)
    missing = tools_missing(target)
    if missing:
        raise EngineError(f"target {target} needs {', '.join(missing)} (Debian: apt-get install gcc-arm-none-eabi "
                          "libnewlib-arm-none-eabi qemu-system-arm qemu-user gcc-arm-linux-gnueabihf)")
    if target == "host":
        return build(cdir)
    if target == "cortex-m4":
        exe = cdir / "model-m4.elf"
        flags = [f if f != "-O2" else opt for f in M4_FLAGS]
        _cc(["arm-none-eabi-gcc", *flags, "-DFIXQ_COUNTS=1", "-DFIXQ_TICKS=1", "--specs=rdimon.specs",
             "-T", str(HERE / "mps2_an386.ld"), "-o", exe.name, *_sources(cdir), str(HERE / "m4_start.c")], cdir)
        return exe
    exe = cdir / "model-arm-linux"
    _cc(["arm-linux-gnueabihf-gcc", "-std=c99", opt, "-Wall", "-Wextra", "-Werror", "-static", "-DFIXQ_COUNTS=1",
         "-o", exe.name, *_sources(cdir)], cdir)
    return exe


def runner_for(target: str):
    """A function (exe, args) -> command line, or None for the host."""
    if target == "cortex-m4":
        def m4(exe, args):
            semi = ",".join(["enable=on", "target=native", "arg=model"] + [f"arg={a}" for a in args])
            return ["qemu-system-arm", "-M", "mps2-an386", "-nographic", "-icount", "shift=0",
                    "-semihosting-config", semi, "-kernel", str(exe)]
        return m4
    if target == "arm-linux":
        return lambda exe, args: ["qemu-arm", str(exe), *args]
    return None


def stack_bound(cdir, depth: int = 5) -> int | None:
    """A conservative worst-case stack (bytes) of ``fixq_<name>_run`` on the Cortex-M4 (-O2):
    its own frame plus the ``depth`` largest runtime frames (the runtime has no recursion, no
    function pointers, and calls at most ``depth`` deep), from gcc -fstack-usage."""
    cdir = Path(cdir)
    if shutil.which("arm-none-eabi-gcc") is None:
        return None
    tmp = cdir / "m4-su"
    tmp.mkdir(exist_ok=True)
    srcs = ["model.c"] + sorted(p.name for p in cdir.glob("fixq_rt*.c"))
    _cc(["arm-none-eabi-gcc", *M4_FLAGS, "-fstack-usage", "-c", *[str(cdir / s) for s in srcs]], tmp)
    run, frames = 0, []
    for su in tmp.glob("*.su"):
        for line in su.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            fn, size = parts[0].rsplit(":", 1)[-1], int(parts[1])
            if re.fullmatch(r"fixq_[a-z0-9_]+_run", fn):
                run = size
            else:
                frames.append(size)
    shutil.rmtree(tmp, ignore_errors=True)
    return run + sum(sorted(frames)[-depth:])


def size_report(cdir) -> list[str]:
    """``arm-none-eabi-size`` text/data/bss of the model (model.c and the runtime, no harness)
    compiled for the Cortex-M4, and the stack bound; [] without the cross compiler."""
    cdir = Path(cdir)
    if shutil.which("arm-none-eabi-gcc") is None or shutil.which("arm-none-eabi-size") is None:
        return []
    tmp = cdir / "m4-size"
    tmp.mkdir(exist_ok=True)
    srcs = ["model.c"] + sorted(p.name for p in cdir.glob("fixq_rt*.c"))
    _cc(["arm-none-eabi-gcc", *M4_FLAGS, "-c", *[str(cdir / s) for s in srcs]], tmp)
    r = subprocess.run(["arm-none-eabi-size", "-t", *sorted(p.name for p in tmp.glob("*.o"))], cwd=tmp,
                       capture_output=True, text=True, check=True)
    total = r.stdout.strip().splitlines()[-1].split()
    shutil.rmtree(tmp, ignore_errors=True)
    text, data, bss = (int(v) for v in total[:3])
    return [f"Cortex-M4 (arm-none-eabi-gcc -O2, model + runtime, no harness): text {text:,} B, data {data:,} B, "
            f"bss {bss:,} B; the arena (FIXQ_*_ARENA_BYTES) is the caller's; stack bound {stack_bound(cdir)} B"]
