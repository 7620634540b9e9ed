"""Build and run an exported C model on integer input codes."""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..engine import EngineError

__all__ = ["build", "run_c_program", "UBSAN_FLAGS"]


UBSAN_FLAGS = "-std=c99 -Wall -Wextra -Werror -O1 -fsanitize=undefined -fno-sanitize-recover=all"


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


def run_c_program(cdir: str | Path, codes: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run the compiled program on int input codes (N, C, H, W); returns int64 output codes
    (N, out) and the saturation totals it printed."""
    cdir = Path(cdir)
    info = json.loads((cdir / "export.json").read_text())
    exe = cdir / "model"
    if not exe.exists():
        build(cdir)
    dtype = {"int8_t": np.int8, "int16_t": np.int16, "int32_t": np.int32}[info["act_type"]]
    n = codes.shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        fin, fout = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        codes.cpu().numpy().astype(dtype).tofile(fin)
        r = subprocess.run([str(exe), str(fin), str(fout), str(n)], capture_output=True, text=True)
        if r.returncode != 0:
            raise EngineError(f"{exe} failed: {r.stderr.strip()}")
        out = np.fromfile(fout, dtype=np.int32).reshape(n, -1)
    sat = {}
    for line in r.stderr.splitlines():
        if line.startswith("saturations"):
            parts = line.split()
            sat = {parts[1]: int(parts[2]), parts[3]: int(parts[4])}
    return torch.from_numpy(out.astype(np.int64)), sat
