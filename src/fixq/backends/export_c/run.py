"""Build and run an exported C model on integer input codes."""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from fixq.backends.engine import EngineError

__all__ = ["build", "strict_build", "run_c_program", "UBSAN_FLAGS", "STRICT_FLAGS", "NP_TYPES"]


UBSAN_FLAGS = "-std=c99 -Wall -Wextra -Werror -O1 -fsanitize=undefined -fno-sanitize-recover=all"
# the warning set a safety-minded firmware team builds with (the runtime and model.c pass it)
STRICT_FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Wconversion", "-Wsign-conversion", "-Wshadow", "-Wcast-align",
                "-pedantic", "-Werror"]


def strict_build(cdir: str | Path, cc: str = "cc", extra=()) -> subprocess.CompletedProcess:
    """Compile every ``.c`` of an export into ``cdir/strict`` with :data:`STRICT_FLAGS` and -O2
    (``extra``: more flags, e.g. ``-DFIXQ_COUNTS=1``); the result, for its return code and stderr.

    >>> r = strict_build("build/mnv3", extra=["-DFIXQ_COUNTS=1"])   # doctest: +SKIP
    >>> r.returncode, r.stderr                                       # doctest: +SKIP
    (0, '')
    """
    srcs = sorted(p.name for p in Path(cdir).glob("*.c"))
    return subprocess.run([cc, *STRICT_FLAGS, *extra, "-O2", "-o", "strict", *srcs], cwd=cdir, capture_output=True,
                          text=True)


def build(cdir: str | Path, cc: str | None = None, cflags: str | None = None) -> Path:
    """``make`` the exported program (``CC`` may name gcc or clang; ``cflags`` replaces the
    Makefile's CFLAGS, e.g. :data:`UBSAN_FLAGS` for the parity tests)."""
    cdir = Path(cdir)
    env = None
    if cc or cflags:
        import os
        env = {**os.environ, **({"CC": cc} if cc else {}), **({"CFLAGS": cflags} if cflags else {})}
        subprocess.run(["make", "-s", "-C", str(cdir), "clean"], check=True, env=env)
    r = subprocess.run(["make", "-s", "-C", str(cdir)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise EngineError(f"compiling {cdir} failed:\n{r.stderr.strip()[-2000:]}")
    return cdir / "model"


NP_TYPES = {"int8_t": np.int8, "uint8_t": np.uint8, "int16_t": np.int16, "uint16_t": np.uint16, "int32_t": np.int32}


def run_c_program(cdir: str | Path, codes: torch.Tensor | None = None, pixels=None,
                  runner: list[str] | None = None, exe: str | Path | None = None) -> tuple[torch.Tensor, dict]:
    """Run the compiled program on int input codes (N, C, H, W), or on uint8 ``pixels``
    (N, C, H, W) that the model's ``fixq_<name>_pixels()`` table turns into codes; returns
    int64 output codes (N, out) and the saturation totals it printed. ``runner(exe, args)``
    builds the command (an emulator, :func:`fixq.backends.export_c.targets.runner_for`), ``exe`` names
    another binary than ``cdir/model``; a Cortex-M4 run adds ``ticks`` (SysTick) to the totals."""
    cdir = Path(cdir)
    info = json.loads((cdir / "export.json").read_text())
    exe = Path(exe) if exe else cdir / "model"
    if not exe.exists():
        build(cdir)
    n = (codes if codes is not None else pixels).shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        fin, fout = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        if pixels is not None:
            np.asarray(pixels, dtype=np.uint8).tofile(fin)
        else:
            codes.cpu().numpy().astype(NP_TYPES[info.get("input_ctype", info["act_type"])]).tofile(fin)
        args = [str(fin), str(fout), str(n)] + (["pixels"] if pixels is not None else [])
        cmd = runner(exe, args) if runner else [str(exe), *args]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise EngineError(f"{exe} failed: {r.stderr.strip()}")
        out = np.fromfile(fout, dtype=np.int32).reshape(n, -1)
    sat = {}
    for line in (r.stderr + "\n" + r.stdout).splitlines():  # semihosting prints stderr on stdout
        parts = line.split()
        if line.startswith("saturations"):
            sat.update({parts[1]: int(parts[2]), parts[3]: int(parts[4])})
        elif line.startswith("ticks"):
            sat["ticks"] = int(parts[1])
    return torch.from_numpy(out.astype(np.int64)), sat
