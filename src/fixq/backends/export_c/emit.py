"""C99 export: ``model.h``/``model.c`` hold integer tables and the ordered kernel calls,
nothing else; the arithmetic is the hand-written runtime ``fixq_rt.{h,c}``. The tables
come from :class:`fixq.backends.engine.Engine`, so C and engine share every integer.

Notation: codes at F fractional bits; ``S`` exact-sum format; ``Facc`` accumulator;
shifts are ``S - Fw - Fx`` (weights), ``S - Facc`` (accumulator), ``Facc - Fy`` (output).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fixq.backends.engine import Engine, EngineError
from fixq.backends.exact_sums import pool_out_size
from fixq.backends.pooling import adaptive_windows, pool_divisors
from fixq.graph.ir import (AdaptiveAvgPool, Add, AvgPool, Clamp, Concat, Conv, Flatten, Graph, Linear, MaxPool, Pad,
                           Slice)
from fixq.numerics.formats import bound_codes, per_channel
from fixq.planning.safety import C_LIMITS, check_table, max_code, sum_fits_int32
from .files import mac_bytes
from .pack import store_weights

__all__ = ["C_EMITTERS", "RUNTIME_DIR", "EmitCtx", "CTYPE_BYTES"]

RUNTIME_DIR = Path(__file__).parent / "runtime"
ROUNDING_C = {"half_up": "FIXQ_HALF_UP", "nearest_even": "FIXQ_NEAREST_EVEN", "floor": "FIXQ_FLOOR"}
OVERFLOW_C = {"saturate": "FIXQ_SATURATE", "wrap": "FIXQ_WRAP"}
# output rows per pass of the runtime's hwc loop nest: fixq_config.h defines FIXQ_ROWS to this
# (fixq_rt_conv.c's fallback for hand-made configs is the same value, tests/test_export_c_pack.py)
HWC_ROWS = 4
CTYPE_BYTES = {"int8_t": 1, "int16_t": 2, "int32_t": 4, "int64_t": 8, "uint8_t": 1, "uint16_t": 2}


def _word(T) -> str:
    """A data word for the runtime: ``T``, or ``(T | FIXQ_UNSIGNED)`` for an unsigned U(T,F)."""
    return str(int(T)) if getattr(T, "signed", True) else f"({int(T)} | FIXQ_UNSIGNED)"


def _storage_type(bits: int) -> str:
    return "int8_t" if bits <= 8 else "int16_t" if bits <= 16 else "int32_t"


@dataclass
class EmitCtx:
    """What an emitter sees: the graph, the engine's integer tables, the arena offsets, and
    the declarations/ROM it adds. An emitter returns the C call(s) of one node; buffers are
    ``act + offset`` (activations), ``scr`` (the shared kernel scratch, ``need_scratch``
    bytes), counters ``SAT(k)`` (``uint64_t *`` or NULL)."""

    graph: Graph
    eng: Engine
    offsets: dict[str, int]
    decls: list[str] = field(default_factory=list)
    rom: int = 0
    index: dict[str, int] = field(default_factory=dict)
    headers: set[str] = field(default_factory=set)  # extra runtime headers the calls need
    hwc_rows: int = HWC_ROWS  # output rows per pass of the hwc nest (fixq_config.h FIXQ_ROWS)
    tables: list[dict] = field(default_factory=list)  # lookup tables (name, node, op, entries, bytes)
    w_type: str = "int8_t"
    act_type: str = "int8_t"
    pack: bool = True
    scratch: int = 0  # int64 words for K-means basis maps
    rx: int = 0       # FIXQ_ACT_T words for <4b,4b> residual inputs (arena, after the activations)
    rx_off: int = 0   # their offset in the activation words (``act + rx_off``)
    scratch_bytes: int = 0  # the largest kernel scratch
    layers: dict = field(default_factory=dict)  # per conv/linear: storage, acc32 (export.json)
    rom_parts: dict = field(default_factory=dict)
    div64: bool = False  # an average pool needs 64-bit division (fixq_config.h: FIXQ_DIV64)

    def array(self, name: str, ctype: str, values, part: str = "tables") -> str:
        vals = [int(v) for v in torch.as_tensor(values).reshape(-1).tolist()]
        check_table(name, self.w_type if ctype == "FIXQ_W_T" else ctype, vals)  # DESIGN §5a: every value fits
        lines = [", ".join(str(v) for v in vals[i:i + 24]) for i in range(0, len(vals), 24)]
        body = ",\n    ".join(lines) if lines else "0"
        self.decls.append(f"static const {ctype} {name}[{max(1, len(vals))}] = {{\n    {body}\n}};")
        nbytes = CTYPE_BYTES[self.w_type if ctype == "FIXQ_W_T" else ctype] * max(1, len(vals))
        self.rom += nbytes
        self.rom_parts[part] = self.rom_parts.get(part, 0) + nbytes
        return name

    def tab(self, name: str, values) -> str:
        """A ``fixq_tab_t``: int32 where every value fits, else int64."""
        vals = torch.as_tensor(values).reshape(-1)
        lo, hi = C_LIMITS["int32_t"]
        if vals.numel() == 0 or (int(vals.min()) >= lo and int(vals.max()) <= hi):
            return f"{{{self.array(name, 'int32_t', vals)}, NULL}}"
        return f"{{NULL, {self.array(name, 'int64_t', vals)}}}"

    def weights(self, name: str, w: torch.Tensor, hwc: bool = False) -> tuple[str, str, dict]:
        """Weight codes (O, cin/groups, kh, kw) in the smallest storage (pack.store_weights)."""
        return store_weights(self, name, w, hwc)

    def conv_scratch(self, mg: int, K: int, geo: list, hwc: bool) -> None:
        """Mirror of fixq_conv_scratch() in fixq_rt_conv.c."""
        a8 = lambda n: (n + 7) // 8 * 8  # noqa: E731
        m = mac_bytes(self.act_type, self.w_type)
        W, kh, kw, sh, sw, pw, oh, ow = geo[2], geo[5], geo[6], geo[7], geo[8], geo[10], geo[-2], geo[-1]
        if hwc:  # a ring of the input rows of FIXQ_ROWS output rows
            rows = kh + sh * (min(oh, self.hwc_rows) - 1)
            col = a8(rows * max(pw + W, (ow - 1) * sw + kw) * mg * m)
        else:
            col = a8(K * ow * m) if mg > 1 else 0
        self.scratch_bytes = max(self.scratch_bytes, col + (8 + 8 * self.hwc_rows) * ow + a8(2 * K * m))

    def buf(self, name: str) -> str:
        return f"act + {self.offsets[name]}"

    def counts(self, node) -> str:
        return f"SAT({self.index[node.name]})"

    def shape(self, name: str) -> tuple[int, ...]:
        return self.graph.shapes[name]


def _cid(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


_ABSENT = "{NULL, NULL}"


def _bounds(ctx: EmitCtx, tag: str, act, F: torch.Tensor, C: int) -> tuple[str, str]:
    lo, hi = bound_codes(act, F, C, ctx.eng.rounding)
    return tuple(_ABSENT if c is None else ctx.tab(f"{k}_{tag}", c) for k, c in (("lo", lo), ("hi", hi)))


def _conv_struct(ctx: EmitCtx, tag: str, geo: list, w, wshift, Tx, rest: str) -> str:
    """Declare one ``fixq_conv_t`` (weights in their storage, the 32-bit decision, ``rest``:
    the fields after ``acc32``); returns its name."""
    uniform = bool((wshift == wshift[:, :1]).all())  # 4D/3D formats, per-tensor data
    ws = ctx.array(f"ws_{tag}", "uint8_t", wshift[:, :1] if uniform else wshift)
    mg, K = w.shape[1], w.shape[1] * w.shape[2] * w.shape[3]
    # fixq_rt_conv.c's hwc loop nest: weights [cout][kh][kw][cin/groups]
    hwc = mg > 1 and uniform and geo[11] == 1 and geo[12] == 1
    warr, wstore, winfo = ctx.weights(f"w_{tag}", w, hwc)
    acc32 = sum_fits_int32(w.abs().sum(dim=(2, 3)), wshift, Tx)
    ctx.conv_scratch(mg, K, geo, hwc)
    ctx.decls.append(f"static const fixq_conv_t {tag} = {{{', '.join(map(str, geo))}, {warr}, {wstore}, {ws}, "
                     f"{1 if uniform else wshift.shape[1]}, {int(acc32)}, {int(hwc)}, {rest}}};")
    ctx.layers[tag] = {"weights": winfo["weights"], **winfo, "hwc": hwc, "acc": "int32" if acc32 else "int64"}
    return tag


def _emit_layer(ctx: EmitCtx, n) -> str:
    L = ctx.eng.layers[n.name]
    t = _cid(n.name)
    Tx = ctx.eng.fmts[n.inputs[0]][0]
    if isinstance(n, Conv):
        C, H, W = ctx.shape(n.inputs[0])
        _, OH, OW = ctx.shape(n.name)
        geo = [C, H, W, L.w.shape[0], n.groups, L.w.shape[2], L.w.shape[3], *n.stride, *n.padding, *n.dilation, OH, OW]
    else:
        OH = OW = 1
        geo = [L.w.shape[1], 1, 1, L.w.shape[0], 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1]
    pre, basis, bmaps = "", "NULL, NULL", "NULL"
    if L.basis is not None:  # K-means: the K shared basis maps first, into the int64 scratch
        B = L.basis
        K = B.w.shape[0]
        bgeo = list(geo)
        bgeo[3] = K
        kb = _conv_struct(ctx, f"KB_{t}", bgeo, B.w, B.wshift, Tx,
                          "{NULL, NULL}, NULL, {NULL, NULL}, {NULL, NULL}, NULL, 64, 64, 0, 0, NULL, NULL")
        ctx.scratch = max(ctx.scratch, K * OH * OW)
        pre = f"fixq_conv_sums(&{kb}, {ctx.buf(n.inputs[0])}, kscr, scr);\n    "
        basis, bmaps = (f"{ctx.array(f'la_{t}', 'int32_t', B.assign)}, "
                        f"{ctx.array(f'ls_{t}', 'uint8_t', B.align)}"), "kscr"
    x_in = ctx.buf(n.inputs[0])
    if L.rdata is not None:  # <4b,4b>: the residual kernels read x requantized to their own format
        C_in = ctx.shape(n.inputs[0])[0]
        hw = int(torch.tensor(ctx.shape(n.inputs[0])[1:]).prod()) if len(ctx.shape(n.inputs[0])) > 1 else 1
        ctx.rx = max(ctx.rx, C_in * hw)
        rs = ctx.array(f"rs_{t}", "int8_t", L.rdata[0])
        x_in = f"act + {ctx.rx_off}"  # the arena's residual-input buffer
        pre += (f"fixq_requant({C_in}, {hw}, {rs}, {_word(L.rdata[1])}, {ROUNDING_C[ctx.eng.rounding]}, "
                f"{ctx.buf(n.inputs[0])}, {x_in}, {ctx.counts(n)});\n    ")
        Tx = L.rdata[1]
    b = ctx.tab(f"b_{t}", L.bias)
    accs = ctx.array(f"as_{t}", "uint8_t", L.acc_shift)
    lo = _ABSENT if L.lo is None else ctx.tab(f"lo_{t}", L.lo)
    hi = _ABSENT if L.hi is None else ctx.tab(f"hi_{t}", L.hi)
    os_ = ctx.array(f"os_{t}", "int8_t", L.out_shift)
    lt = _conv_struct(ctx, f"L_{t}", geo, L.w, L.wshift, Tx,
                      f"{b}, {accs}, {lo}, {hi}, {os_}, {L.A}, {_word(L.Ty)}, {OVERFLOW_C[L.overflow]}, "
                      f"{ROUNDING_C[ctx.eng.rounding]}, {basis}")
    return pre + f"fixq_conv(&{lt}, {x_in}, {ctx.buf(n.name)}, {bmaps}, scr, {ctx.counts(n)});"


def _emit_maxpool(ctx: EmitCtx, n: MaxPool) -> str:
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


def _emit_avg(ctx: EmitCtx, n) -> str:
    C, H, W = ctx.shape(n.inputs[0])
    _, OH, OW = ctx.shape(n.name)
    t = _cid(n.name)
    h0, h1 = _windows_1d(n, H, 0, OH)
    w0, w1 = _windows_1d(n, W, 1, OW)
    T, Fy = ctx.eng.fmts[n.name]
    Fx = ctx.eng.F(n.inputs[0])
    arrs = [ctx.array(f"{k}_{t}", "int16_t", v) for k, v in (("h0", h0), ("h1", h1), ("w0", w0), ("w1", w1))]
    div = ctx.array(f"div_{t}", "int32_t", pool_divisors(n, (H, W)))
    shv = per_channel(Fy - Fx, C)
    sh = ctx.array(f"sh_{t}", "int8_t", shv)
    # numerator (window sum << (Fy - Fx)) and divisor (K << (Fx - Fy)) below 2^31: 32-bit division
    Kmax = int(pool_divisors(n, (H, W)).max())
    up, down = max(0, int(shv.max())), max(0, int((-shv).max()))
    div32 = Kmax * max_code(ctx.eng.fmts[n.inputs[0]][0]) * 2 ** up < 2 ** 31 and Kmax * 2 ** down < 2 ** 31
    ctx.div64 = ctx.div64 or not div32
    ctx.decls.append(f"static const fixq_avgpool_t P_{t} = {{{C}, {H}, {W}, {OH}, {OW}, {', '.join(arrs)}, {div}, "
                     f"{sh}, {_word(T)}, {ROUNDING_C[ctx.eng.rounding]}, {int(div32)}}};")
    return f"fixq_avgpool(&P_{t}, {ctx.buf(n.inputs[0])}, {ctx.buf(n.name)}, {ctx.counts(n)});"


def _emit_add(ctx: EmitCtx, n: Add) -> str:
    C = ctx.shape(n.name)[0]
    hw = 1
    for s in ctx.shape(n.name)[1:]:
        hw *= s
    t = _cid(n.name)
    Fa, Fb = per_channel(ctx.eng.F(n.inputs[0]), C), per_channel(ctx.eng.F(n.inputs[1]), C)
    Fm = torch.maximum(Fa, Fb)
    T, Fy = ctx.eng.fmts[n.name]
    lo, hi = (_ABSENT, _ABSENT) if n.act is None else _bounds(ctx, t, n.act, Fm, C)
    sa, sb = ctx.array(f"sa_{t}", "uint8_t", Fm - Fa), ctx.array(f"sb_{t}", "uint8_t", Fm - Fb)
    os_ = ctx.array(f"os_{t}", "int8_t", Fm - per_channel(Fy, C))
    ctx.decls.append(f"static const fixq_add_t A_{t} = {{{C}, {hw}, {sa}, {sb}, {lo}, {hi}, {os_}, {_word(T)}, "
                     f"{ROUNDING_C[ctx.eng.rounding]}}};")
    return f"fixq_add(&A_{t}, {ctx.buf(n.inputs[0])}, {ctx.buf(n.inputs[1])}, {ctx.buf(n.name)}, {ctx.counts(n)});"


def _emit_concat(ctx: EmitCtx, n: Concat) -> str:
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


def _emit_clamp(ctx: EmitCtx, n: Clamp) -> str:
    C, *rest = ctx.shape(n.name)
    hw = 1
    for s in rest:
        hw *= s
    lo, hi = _bounds(ctx, _cid(n.name), (n.lo, n.hi), ctx.eng.F(n.inputs[0]), C)
    return f"fixq_clamp({C}, {hw}, (fixq_tab_t){lo}, (fixq_tab_t){hi}, {ctx.buf(n.inputs[0])}, {ctx.buf(n.name)});"


def _emit_pad(ctx: EmitCtx, n: Pad) -> str:
    C, H, W = ctx.shape(n.inputs[0])
    p = list(n.pads) + [0] * (8 - len(n.pads))
    if min(p) < 0 or p[6] or p[7]:
        raise EngineError(f"pad '{n.name}' crops or pads the batch dimension: not supported in C export")
    left, right, top, bottom, c0, c1 = p[:6]
    return f"fixq_pad({C}, {H}, {W}, {c0}, {c1}, {top}, {bottom}, {left}, {right}, {ctx.buf(n.inputs[0])}, {ctx.buf(n.name)});"


def _emit_slice(ctx: EmitCtx, n: Slice) -> str:
    C, H, W = ctx.shape(n.inputs[0])
    idx = list(n.index) + [(None, None, None)] * (4 - len(n.index))
    if slice(*idx[0]).indices(1) != (0, 1, 1):
        raise EngineError(f"slice '{n.name}' slices the batch dimension: not supported in C export")
    (cs, _, cst), (hs, _, hst), (ws, _, wst) = (slice(*idx[d + 1]).indices(s) for d, s in enumerate((C, H, W)))
    OC, OH, OW = ctx.shape(n.name)
    return (f"fixq_slice({H}, {W}, {cs}, {cst}, {OC}, {hs}, {hst}, {OH}, {ws}, {wst}, {OW}, "
            f"{ctx.buf(n.inputs[0])}, {ctx.buf(n.name)});")


C_EMITTERS: dict[type, Callable[[EmitCtx, object], str]] = {
    Conv: _emit_layer, Linear: _emit_layer, Add: _emit_add, Concat: _emit_concat, AvgPool: _emit_avg,
    AdaptiveAvgPool: _emit_avg, MaxPool: _emit_maxpool, Clamp: _emit_clamp, Pad: _emit_pad,
    Slice: _emit_slice, Flatten: lambda ctx, n: "",  # same memory: NCHW flattened is (C*H*W)
}


