"""The C export driver: every node through its emitter (:mod:`fixq.backends.export_c.emit`),
then the files: tables and calls (``model.c``/``model.h``), the runtime, ``main.c``,
``Makefile`` and the ROM/RAM budget (:class:`ExportResult`).

>>> res = export_c(graph, plan, "build/lenet", name="lenet")   # doctest: +SKIP
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fixq.backends.engine import Engine, EngineError
from fixq.graph.ir import Graph, Input
from fixq.numerics.formats import code_limits
from fixq.planning.plan import QuantPlan
from .emit import C_EMITTERS, CTYPE_BYTES, HWC_ROWS, RUNTIME_DIR, EmitCtx, _cid, _storage_type
from .files import allocate, api_c, config_h, io_type, model_h, pixel_table, plan_hash, prefixed, runtime_symbols
from .pack import P48_NAME

__all__ = ["export_c", "ExportResult"]


@dataclass(frozen=True)
class ExportResult:
    out: Path
    rom_bytes: int
    ram_bytes: int
    act_type: str
    weight_type: str
    n_calls: int
    name: str = "model"
    act_bytes: int = 0       # activation buffers and <4b,4b> residual inputs (part of the arena)
    arena_bytes: int = 0     # activations + kernel scratch + K-means maps
    layers: dict = field(default_factory=dict)  # per conv struct: weight storage, accumulator
    tables: tuple = ()  # lookup tables of table functions: dicts with node, op, entries, bytes
    act_words: tuple = ()  # the data words (one per node, K-means residual inputs) that set act_type


def _cname(name: str) -> str:
    c = _cid(name).lower()
    if not c or c[0].isdigit():
        raise EngineError(f"--name '{name}' is not a C identifier prefix: use letters, digits and _")
    return c


def export_c(graph: Graph, plan: QuantPlan, out: str | Path, meta: dict | None = None, name: str = "model",
             pack: bool = True, hwc_rows: int = HWC_ROWS) -> ExportResult:
    """Write the C99 model (tables + calls), the runtime, ``main.c`` and a ``Makefile``.
    ``name`` prefixes every symbol (``fixq_<name>_run``); ``pack`` stores weight layers whose
    codes fit 4 bits two per byte, mixed 4/8-bit 2D filters in nibbles or bytes (pack.py);
    ``hwc_rows`` output rows per pass of the hwc loop nest (more rows: fewer weight-row
    preparations, a larger arena; written to fixq_config.h as FIXQ_ROWS);
    ``meta['preprocess']`` (a Preprocess as a dict) adds the
    pixel-to-code table.

    >>> res = export_c(graph, plan, "build/lenet", name="lenet")   # doctest: +SKIP
    >>> res.rom_bytes, res.ram_bytes                                 # doctest: +SKIP
    """
    name = _cname(name)
    eng = Engine(graph, plan)
    for n in graph.nodes:
        if not isinstance(n, Input) and type(n) not in C_EMITTERS:
            raise EngineError(f"node '{n.name}' ({n.kind}) has no C emitter: the C export cannot run this op; "
                              "replace it or cut the model before it", hint="")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    offsets, arena = allocate(graph)
    # unsigned U(T,F) codes need T + 1 bits in a signed C type (0..255 does not fit int8_t)
    words = [t for t, _ in eng.fmts.values() if t is not None] + [L.rdata[1] for L in eng.layers.values() if L.rdata]
    act_bits = max(int(t) + (0 if t.signed else 1) for t in words)
    w_bits = max(max(lp.weight.T, lp.kmeans.basis.T if lp.kmeans else 0) for lp in plan.layers.values())
    act_t, w_t = _storage_type(act_bits), _storage_type(w_bits)
    ctx = EmitCtx(graph, eng, offsets, index={n.name: k for k, n in enumerate(graph.nodes)}, w_type=w_t,
                  act_type=act_t, pack=pack, rx_off=arena, hwc_rows=hwc_rows)
    calls = []
    for n in graph.nodes:
        if isinstance(n, Input):
            continue
        c = C_EMITTERS[type(n)](ctx, n)
        if c:
            calls.append(f"/* {n.name} ({n.kind}) */\n    {c}")
    in_shape = graph.shapes[graph.input]
    in_size = int(torch.tensor(in_shape).prod())
    out_size = int(torch.tensor(graph.shapes[graph.output]).prod())
    T_in, F_in = eng.fmts[graph.input]
    T_out, F_out = eng.fmts[graph.output]
    F_in, F_out = F_in.reshape(-1), F_out.reshape(-1)
    a8 = lambda v: (v + 7) // 8 * 8  # noqa: E731
    act_bytes = a8((arena + ctx.rx) * CTYPE_BYTES[act_t])  # <4b,4b> residual inputs after the activations
    regions = {"scratch": act_bytes, "kscratch": act_bytes + a8(ctx.scratch_bytes)}
    arena_bytes = regions["kscratch"] + 8 * ctx.scratch
    pre = (meta or {}).get("preprocess")
    has_pix = bool(pre) and len(in_shape) == 3
    for what, F in (("in", F_in), ("out", F_out)):  # public (model.h), not static
        ctx.decls.append(f"const int8_t fixq_{name}_{what}_F[{F.numel()}] = {{{', '.join(map(str, F.tolist()))}}};")
        ctx.rom += F.numel()
    if has_pix:
        tab = pixel_table(eng, pre, in_shape[0])
        rows = ",\n    ".join("{" + ", ".join(map(str, r)) + "}" for r in tab.tolist())
        in_t = io_type(T_in)[0]
        ctx.decls.append(f"static const {in_t} pixel_codes[{in_shape[0]}][256] = {{\n    {rows}\n}};")
        ctx.rom += tab.numel() * CTYPE_BYTES[in_t]
        ctx.rom_parts["pixel table"] = tab.numel() * CTYPE_BYTES[in_t]
    lo_in, hi_in = code_limits(T_in)
    phash = plan_hash(json.dumps(plan.to_json(), sort_keys=True))
    syms = runtime_symbols(RUNTIME_DIR)
    (out / "fixq_config.h").write_text(config_h(name, act_t, w_t, syms, ctx.div64,
                                                any(v.get("weights") == P48_NAME for v in ctx.layers.values()),
                                                ctx.hwc_rows))
    (out / "model.h").write_text(model_h(name, phash, plan.model, in_shape, out_size, arena_bytes, len(graph.nodes),
                                         (T_in, F_in), (T_out, F_out), pre))
    body = "\n".join(ctx.decls)
    (out / "model.c").write_text(
        f"/* generated by fixq from plan of '{plan.model}': data tables and kernel calls only */\n"
        "#include \"model.h\"\n#include \"fixq_rt.h\"\n" + "".join(f"#include \"{h}\"\n" for h in sorted(ctx.headers))
        + "\n"
        f"{body}\n" + api_c(name, io_type(T_in)[1], io_type(T_out)[1], lo_in, hi_in, offsets[graph.input],
                            offsets[graph.output], in_size, out_size, regions, has_pix, calls))
    for f in sorted(RUNTIME_DIR.iterdir()):
        if f.suffix in (".c", ".h") and f.name != "main.c":
            shutil.copy(f, out / f.name)
    (out / "main.c").write_text(prefixed((RUNTIME_DIR / "main.c").read_text(), name))
    shutil.copy(RUNTIME_DIR / "Makefile", out / "Makefile")
    counters = 16 * len(graph.nodes)
    info = {"model": plan.model, "name": name, "plan_hash": phash, "rom_bytes": ctx.rom, "ram_bytes": arena_bytes,
            "rom_parts": ctx.rom_parts, "arena_bytes": arena_bytes, "act_bytes": act_bytes,
            "rx_bytes": ctx.rx * CTYPE_BYTES[act_t], "scratch_bytes": ctx.scratch_bytes, "kmeans_bytes": 8 * ctx.scratch,
            "counter_bytes": counters,
            "act_type": act_t, "weight_type": w_t, "input_ctype": io_type(T_in)[0], "output_ctype": io_type(T_out)[0],
            "pixels": has_pix, "layers": ctx.layers,
            "input_shape": list(in_shape), "input_T": T_in, "input_signed": T_in.signed,
            "input_F": F_in.tolist(),
            "output_T": T_out, "output_signed": T_out.signed, "output_F": F_out.tolist(), "rounding": plan.rounding,
            "n_calls": len(calls), **({"tables": ctx.tables} if ctx.tables else {}), **(meta or {})}
    (out / "export.json").write_text(json.dumps(info, indent=1))
    plan.save(out / "plan.json")
    return ExportResult(out, ctx.rom, arena_bytes, act_t, w_t, len(calls), name, act_bytes, arena_bytes, ctx.layers,
                        tuple(ctx.tables), tuple(words))
