"""C99 export: ``model.h``/``model.c`` hold integer tables and the ordered kernel calls,
nothing else; the arithmetic is the hand-written runtime ``fixq_rt.{h,c}``. The tables
come from :class:`fixq.engine.Engine`, so C and engine share every integer.

Notation: codes at F fractional bits; ``S`` exact-sum format; ``Facc`` accumulator;
shifts are ``S - Fw - Fx`` (weights), ``S - Facc`` (accumulator), ``Facc - Fy`` (output).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..engine import Engine, EngineError, pool_out_size
from ..formats import bound_codes, per_channel
from ..ir import (AdaptiveAvgPool, Add, AvgPool, Clamp, Concat, Conv, Flatten, Graph, Input, Linear,
                  MaxPool, Pad, Slice)
from ..plan import QuantPlan
from ..pooling import adaptive_windows, pool_divisors
from ..safety import check_table

__all__ = ["export_c", "C_EMITTERS", "ExportResult", "RUNTIME_DIR"]

RUNTIME_DIR = Path(__file__).parent / "runtime"
ROUNDING_C = {"half_up": "FIXQ_HALF_UP", "nearest_even": "FIXQ_NEAREST_EVEN", "floor": "FIXQ_FLOOR"}
OVERFLOW_C = {"saturate": "FIXQ_SATURATE", "wrap": "FIXQ_WRAP"}
CTYPE_BYTES = {"int8_t": 1, "int16_t": 2, "int32_t": 4, "int64_t": 8, "uint8_t": 1, "uint16_t": 2}


def _word(T) -> str:
    """A data word for the runtime: ``T``, or ``(T | FIXQ_UNSIGNED)`` for an unsigned U(T,F)."""
    return str(int(T)) if getattr(T, "signed", True) else f"({int(T)} | FIXQ_UNSIGNED)"


def _storage_type(bits: int) -> str:
    return "int8_t" if bits <= 8 else "int16_t" if bits <= 16 else "int32_t"


@dataclass
class _Ctx:
    graph: Graph
    eng: Engine
    offsets: dict[str, int]
    decls: list[str] = field(default_factory=list)
    rom: int = 0
    index: dict[str, int] = field(default_factory=dict)
    headers: set[str] = field(default_factory=set)  # extra runtime headers the calls need
    tables: list[dict] = field(default_factory=list)  # lookup tables (name, node, op, entries, bytes)
    w_type: str = "int8_t"
    scratch: int = 0  # int64 words for K-means basis maps
    rx: int = 0       # FIXQ_ACT_T words for <4b,4b> residual inputs

    def array(self, name: str, ctype: str, values) -> str:
        vals = [int(v) for v in torch.as_tensor(values).reshape(-1).tolist()]
        check_table(name, self.w_type if ctype == "FIXQ_W_T" else ctype, vals)  # DESIGN §5a: every value fits
        lines = [", ".join(str(v) for v in vals[i:i + 24]) for i in range(0, len(vals), 24)]
        body = ",\n    ".join(lines) if lines else "0"
        self.decls.append(f"static const {ctype} {name}[{max(1, len(vals))}] = {{\n    {body}\n}};")
        self.rom += CTYPE_BYTES[self.w_type if ctype == "FIXQ_W_T" else ctype] * max(1, len(vals))
        return name

    def buf(self, name: str) -> str:
        return f"arena + {self.offsets[name]}"

    def counts(self, node) -> str:
        return f"&fixq_counts[{self.index[node.name]}]"

    def shape(self, name: str) -> tuple[int, ...]:
        return self.graph.shapes[name]


def _cid(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _bounds(ctx: _Ctx, tag: str, act, F: torch.Tensor, C: int) -> tuple[str, str]:
    lo, hi = bound_codes(act, F, C, ctx.eng.rounding)
    return tuple("NULL" if c is None else ctx.array(f"{k}_{tag}", "int64_t", c) for k, c in (("lo", lo), ("hi", hi)))


def _emit_layer(ctx: _Ctx, n) -> str:
    L = ctx.eng.layers[n.name]
    t = _cid(n.name)
    if isinstance(n, Conv):
        C, H, W = ctx.shape(n.inputs[0])
        _, OH, OW = ctx.shape(n.name)
        geo = [C, H, W, L.w.shape[0], n.groups, L.w.shape[2], L.w.shape[3], *n.stride, *n.padding, *n.dilation, OH, OW]
    else:
        OH = OW = 1
        geo = [L.w.shape[1], 1, 1, L.w.shape[0], 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1]

    def weights(tag, w, wshift):
        uniform = bool((wshift == wshift[:, :1]).all())  # 4D/3D formats, per-tensor data
        return (ctx.array(f"w_{tag}", "FIXQ_W_T", w), ctx.array(f"ws_{tag}", "uint8_t", wshift[:, :1] if uniform else wshift),
                1 if uniform else wshift.shape[1])

    pre, basis = "", "NULL, NULL, NULL"
    if L.basis is not None:  # K-means: the K shared basis maps first, into the int64 scratch
        B = L.basis
        K = B.w.shape[0]
        bgeo = list(geo)
        bgeo[3] = K
        bw, bws, bcols = weights(f"{t}_basis", B.w, B.wshift)
        ctx.decls.append(f"static const fixq_conv_t KB_{t} = {{{', '.join(map(str, bgeo))}, {bw}, {bws}, {bcols}, "
                         "NULL, NULL, NULL, NULL, NULL, 64, 64, 0, 0, NULL, NULL, NULL};")
        ctx.scratch = max(ctx.scratch, K * OH * OW)
        pre = f"fixq_conv_sums(&KB_{t}, {ctx.buf(n.inputs[0])}, fixq_kscratch);\n    "
        basis = (f"fixq_kscratch, {ctx.array(f'la_{t}', 'int32_t', B.assign)}, "
                 f"{ctx.array(f'ls_{t}', 'uint8_t', B.align)}")
    x_in = ctx.buf(n.inputs[0])
    if L.rdata is not None:  # <4b,4b>: the residual kernels read x requantized to their own format
        C_in = ctx.shape(n.inputs[0])[0]
        hw = int(torch.tensor(ctx.shape(n.inputs[0])[1:]).prod()) if len(ctx.shape(n.inputs[0])) > 1 else 1
        ctx.rx = max(ctx.rx, C_in * hw)
        rs = ctx.array(f"rs_{t}", "int8_t", L.rdata[0])
        pre += (f"fixq_requant({C_in}, {hw}, {rs}, {_word(L.rdata[1])}, {ROUNDING_C[ctx.eng.rounding]}, {x_in}, "
                f"fixq_rx, {ctx.counts(n)});\n    ")
        x_in = "fixq_rx"
    w, ws, ws_cols = weights(t, L.w, L.wshift)
    b = ctx.array(f"b_{t}", "int64_t", L.bias)
    accs = ctx.array(f"as_{t}", "uint8_t", L.acc_shift)
    lo = "NULL" if L.lo is None else ctx.array(f"lo_{t}", "int64_t", L.lo)
    hi = "NULL" if L.hi is None else ctx.array(f"hi_{t}", "int64_t", L.hi)
    os_ = ctx.array(f"os_{t}", "int8_t", L.out_shift)
    ctx.decls.append(f"static const fixq_conv_t L_{t} = {{{', '.join(map(str, geo))}, {w}, {ws}, {ws_cols}, {b}, {accs}, "
                     f"{lo}, {hi}, {os_}, {L.A}, {_word(L.Ty)}, {OVERFLOW_C[L.overflow]}, {ROUNDING_C[ctx.eng.rounding]}, "
                     f"{basis}}};")
    return pre + f"fixq_conv(&L_{t}, {x_in}, {ctx.buf(n.name)}, {ctx.counts(n)});"


def _emit_maxpool(ctx: _Ctx, n: MaxPool) -> str:
    C, H, W = ctx.shape(n.inputs[0])
    _, OH, OW = ctx.shape(n.name)
    t = _cid(n.name)
    ctx.decls.append(f"static const fixq_maxpool_t P_{t} = {{{C}, {H}, {W}, {n.kernel[0]}, {n.kernel[1]}, {n.stride[0]}, "
                     f"{n.stride[1]}, {n.padding[0]}, {n.padding[1]}, {n.dilation[0]}, {n.dilation[1]}, {OH}, {OW}}};")
    return f"fixq_maxpool(&P_{t}, {ctx.buf(n.inputs[0])}, {ctx.buf(n.name)});"


def _windows_1d(n, size: int, axis: int, out: int):
    if isinstance(n, AdaptiveAvgPool):
        return [a for a, _ in adaptive_windows(size, out)], [b for _, b in adaptive_windows(size, out)]
    k, s, p = n.kernel[axis], n.stride[axis], n.padding[axis]
    assert pool_out_size(size, k, s, p, 1, n.ceil_mode) == out
    return [max(0, o * s - p) for o in range(out)], [min(size, o * s - p + k) for o in range(out)]


def _emit_avg(ctx: _Ctx, n) -> str:
    C, H, W = ctx.shape(n.inputs[0])
    _, OH, OW = ctx.shape(n.name)
    t = _cid(n.name)
    h0, h1 = _windows_1d(n, H, 0, OH)
    w0, w1 = _windows_1d(n, W, 1, OW)
    T, Fy = ctx.eng.fmts[n.name]
    Fx = ctx.eng.F(n.inputs[0])
    arrs = [ctx.array(f"{k}_{t}", "int16_t", v) for k, v in (("h0", h0), ("h1", h1), ("w0", w0), ("w1", w1))]
    div = ctx.array(f"div_{t}", "int32_t", pool_divisors(n, (H, W)))
    sh = ctx.array(f"sh_{t}", "int8_t", per_channel(Fy - Fx, C))
    ctx.decls.append(f"static const fixq_avgpool_t P_{t} = {{{C}, {H}, {W}, {OH}, {OW}, {', '.join(arrs)}, {div}, "
                     f"{sh}, {_word(T)}, {ROUNDING_C[ctx.eng.rounding]}}};")
    return f"fixq_avgpool(&P_{t}, {ctx.buf(n.inputs[0])}, {ctx.buf(n.name)}, {ctx.counts(n)});"


def _emit_add(ctx: _Ctx, n: Add) -> str:
    C = ctx.shape(n.name)[0]
    hw = 1
    for s in ctx.shape(n.name)[1:]:
        hw *= s
    t = _cid(n.name)
    Fa, Fb = per_channel(ctx.eng.F(n.inputs[0]), C), per_channel(ctx.eng.F(n.inputs[1]), C)
    Fm = torch.maximum(Fa, Fb)
    T, Fy = ctx.eng.fmts[n.name]
    lo, hi = ("NULL", "NULL") if n.act is None else _bounds(ctx, t, n.act, Fm, C)
    sa, sb = ctx.array(f"sa_{t}", "uint8_t", Fm - Fa), ctx.array(f"sb_{t}", "uint8_t", Fm - Fb)
    os_ = ctx.array(f"os_{t}", "int8_t", Fm - per_channel(Fy, C))
    ctx.decls.append(f"static const fixq_add_t A_{t} = {{{C}, {hw}, {sa}, {sb}, {lo}, {hi}, {os_}, {_word(T)}, "
                     f"{ROUNDING_C[ctx.eng.rounding]}}};")
    return f"fixq_add(&A_{t}, {ctx.buf(n.inputs[0])}, {ctx.buf(n.inputs[1])}, {ctx.buf(n.name)}, {ctx.counts(n)});"


def _emit_concat(ctx: _Ctx, n: Concat) -> str:
    T, Fy = ctx.eng.fmts[n.name]
    Fy = per_channel(Fy, ctx.shape(n.name)[0])
    calls, c0 = [], 0
    for k, i in enumerate(n.inputs):
        C, H, W = ctx.shape(i)
        Fo = Fy[c0:c0 + C]
        sh = ctx.array(f"sh_{_cid(n.name)}_{k}", "int8_t", per_channel(ctx.eng.F(i), C) - Fo)
        calls.append(f"fixq_requant({C}, {H * W}, {sh}, {_word(T)}, {ROUNDING_C[ctx.eng.rounding]}, {ctx.buf(i)}, "
                     f"{ctx.buf(n.name)} + {c0 * H * W}, {ctx.counts(n)});")
        c0 += C
    return "\n    ".join(calls)


def _emit_clamp(ctx: _Ctx, n: Clamp) -> str:
    C, *rest = ctx.shape(n.name)
    hw = 1
    for s in rest:
        hw *= s
    lo, hi = _bounds(ctx, _cid(n.name), (n.lo, n.hi), ctx.eng.F(n.inputs[0]), C)
    return f"fixq_clamp({C}, {hw}, {lo}, {hi}, {ctx.buf(n.inputs[0])}, {ctx.buf(n.name)});"


def _emit_pad(ctx: _Ctx, n: Pad) -> str:
    C, H, W = ctx.shape(n.inputs[0])
    p = list(n.pads) + [0] * (8 - len(n.pads))
    if min(p) < 0 or p[6] or p[7]:
        raise EngineError(f"pad '{n.name}' crops or pads the batch dimension: not supported in C export")
    left, right, top, bottom, c0, c1 = p[:6]
    return f"fixq_pad({C}, {H}, {W}, {c0}, {c1}, {top}, {bottom}, {left}, {right}, {ctx.buf(n.inputs[0])}, {ctx.buf(n.name)});"


def _emit_slice(ctx: _Ctx, n: Slice) -> str:
    C, H, W = ctx.shape(n.inputs[0])
    idx = list(n.index) + [(None, None, None)] * (4 - len(n.index))
    if slice(*idx[0]).indices(1) != (0, 1, 1):
        raise EngineError(f"slice '{n.name}' slices the batch dimension: not supported in C export")
    (cs, _, cst), (hs, _, hst), (ws, _, wst) = (slice(*idx[d + 1]).indices(s) for d, s in enumerate((C, H, W)))
    OC, OH, OW = ctx.shape(n.name)
    return (f"fixq_slice({H}, {W}, {cs}, {cst}, {OC}, {hs}, {hst}, {OH}, {ws}, {wst}, {OW}, "
            f"{ctx.buf(n.inputs[0])}, {ctx.buf(n.name)});")


C_EMITTERS: dict[type, Callable[[_Ctx, object], str]] = {
    Conv: _emit_layer, Linear: _emit_layer, Add: _emit_add, Concat: _emit_concat, AvgPool: _emit_avg,
    AdaptiveAvgPool: _emit_avg, MaxPool: _emit_maxpool, Clamp: _emit_clamp, Pad: _emit_pad,
    Slice: _emit_slice, Flatten: lambda ctx, n: "",  # same memory: NCHW flattened is (C*H*W)
}


def _allocate(graph: Graph) -> tuple[dict[str, int], int]:
    """Arena offsets by liveness with first-fit reuse; flatten aliases its input."""
    root = {}
    for n in graph.nodes:
        root[n.name] = root[n.inputs[0]] if isinstance(n, Flatten) else n.name
    order = {n.name: k for k, n in enumerate(graph.nodes)}
    last = {r: order[r] for r in set(root.values())}
    for n in graph.nodes:
        for i in n.inputs:
            last[root[i]] = max(last[root[i]], order[n.name])
    last[root[graph.output]] = len(graph.nodes)
    size = {n.name: int(torch.tensor(graph.shapes[n.name]).prod()) for n in graph.nodes}
    live: list[tuple[int, int, str]] = []  # (offset, size, buffer)
    offsets, arena = {}, 0
    for n in graph.nodes:
        k = order[n.name]
        live = [b for b in live if last[b[2]] >= k]
        if root[n.name] != n.name:
            continue
        need, off = size[n.name], 0
        for o, s, _ in sorted(live):
            if off + need <= o:
                break
            off = max(off, o + s)
        live.append((off, need, n.name))
        offsets[n.name] = off
        arena = max(arena, off + need)
    return {name: offsets[root[name]] for name in root}, arena


@dataclass(frozen=True)
class ExportResult:
    out: Path
    rom_bytes: int
    ram_bytes: int
    act_type: str
    weight_type: str
    n_calls: int
    tables: tuple = ()  # lookup tables of table functions: dicts with node, op, entries, bytes


def export_c(graph: Graph, plan: QuantPlan, out: str | Path, meta: dict | None = None) -> ExportResult:
    """Write the C99 model (tables + calls), the runtime, ``main.c`` and a ``Makefile``.

    >>> res = export_c(graph, plan, "build/lenet")   # doctest: +SKIP
    >>> res.rom_bytes, res.ram_bytes                  # doctest: +SKIP
    """
    eng = Engine(graph, plan)
    for n in graph.nodes:
        if not isinstance(n, Input) and type(n) not in C_EMITTERS:
            raise EngineError(f"node '{n.name}' ({n.kind}) has no C emitter: the C export cannot run this op; "
                              "replace it or cut the model before it", hint="")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    offsets, arena = _allocate(graph)
    # unsigned U(T,F) codes need T + 1 bits in a signed C type (0..255 does not fit int8_t)
    words = [t for t, _ in eng.fmts.values() if t is not None] + [L.rdata[1] for L in eng.layers.values() if L.rdata]
    act_bits = max(int(t) + (0 if t.signed else 1) for t in words)
    w_bits = max(max(lp.weight.T, lp.kmeans.basis.T if lp.kmeans else 0) for lp in plan.layers.values())
    act_t, w_t = _storage_type(act_bits), _storage_type(w_bits)
    ctx = _Ctx(graph, eng, offsets, index={n.name: k for k, n in enumerate(graph.nodes)}, w_type=w_t)
    calls = []
    for n in graph.nodes:
        if isinstance(n, Input):
            continue
        c = C_EMITTERS[type(n)](ctx, n)
        if c:
            calls.append(f"/* {n.name} ({n.kind}) */\n    {c}")
    in_size = int(torch.tensor(graph.shapes[graph.input]).prod())
    out_size = int(torch.tensor(graph.shapes[graph.output]).prod())
    (out / "fixq_config.h").write_text(f"/* generated by fixq: storage types */\n#ifndef FIXQ_CONFIG_H\n#define FIXQ_CONFIG_H\n"
                                       f"#define FIXQ_ACT_T {act_t}\n#define FIXQ_W_T {w_t}\n#endif\n")
    (out / "model.h").write_text(
        "/* generated by fixq: the quantized model's interface */\n#ifndef FIXQ_MODEL_H\n#define FIXQ_MODEL_H\n"
        "#include \"fixq_rt.h\"\n" + "".join(f"#include \"{h}\"\n" for h in sorted(ctx.headers)) +
        f"#define FIXQ_IN_SIZE {in_size}\n#define FIXQ_OUT_SIZE {out_size}\n#define FIXQ_ARENA_SIZE {arena}\n"
        f"#define FIXQ_N_NODES {len(graph.nodes)}\n"
        "extern fixq_counts_t fixq_counts[FIXQ_N_NODES];\n"
        "FIXQ_ACT_T *fixq_model_input(void);\nconst FIXQ_ACT_T *fixq_model_output(void);\n"
        "void fixq_model_run(void);\n#endif\n")
    body = "\n".join(ctx.decls)
    (out / "model.c").write_text(
        f"/* generated by fixq from plan of '{plan.model}': data tables and kernel calls only */\n"
        "#include \"model.h\"\n\n"
        f"static FIXQ_ACT_T arena[FIXQ_ARENA_SIZE];\nfixq_counts_t fixq_counts[FIXQ_N_NODES];\n"
        + (f"static int64_t fixq_kscratch[{ctx.scratch}]; /* K-means basis maps */\n" if ctx.scratch else "")
        + (f"static FIXQ_ACT_T fixq_rx[{ctx.rx}]; /* K-means <4b,4b>: residual kernels' input codes */\n"
           if ctx.rx else "")
        + f"\n{body}\n\n"
        f"FIXQ_ACT_T *fixq_model_input(void) {{ return {ctx.buf(graph.input)}; }}\n"
        f"const FIXQ_ACT_T *fixq_model_output(void) {{ return {ctx.buf(graph.output)}; }}\n\n"
        "void fixq_model_run(void) {\n    " + "\n    ".join(calls) + "\n}\n")
    for f in sorted(RUNTIME_DIR.iterdir()):  # every runtime file: the Makefile compiles each fixq_rt*.c
        if f.is_file() and (f.suffix in (".c", ".h") or f.name == "Makefile"):
            shutil.copy(f, out / f.name)
    ram = (arena + ctx.rx) * CTYPE_BYTES[act_t] + 8 * ctx.scratch
    T_in, F_in = eng.fmts[graph.input]
    T_out, F_out = eng.fmts[graph.output]
    info = {"model": plan.model, "rom_bytes": ctx.rom, "ram_bytes": ram, "act_type": act_t, "weight_type": w_t,
            "input_shape": list(graph.shapes[graph.input]), "input_T": T_in, "input_signed": T_in.signed,
            "input_F": F_in.reshape(-1).tolist(),
            "output_T": T_out, "output_signed": T_out.signed, "output_F": F_out.reshape(-1).tolist(), "rounding": plan.rounding,
            "n_calls": len(calls), **({"tables": ctx.tables} if ctx.tables else {}), **(meta or {})}
    (out / "export.json").write_text(json.dumps(info, indent=1))
    plan.save(out / "plan.json")
    return ExportResult(out, ctx.rom, ram, act_t, w_t, len(calls), tuple(ctx.tables))
