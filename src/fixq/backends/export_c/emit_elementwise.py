"""C emitters of the element-wise ops of mobile CNNs (DESIGN.md §5b), registered into
:data:`fixq.backends.export_c.emit.C_EMITTERS`; kernels in ``runtime/fixq_rt_elementwise.{h,c}``.

Notation: codes at F fractional bits; a table function's tables hold the output code of
every input code (``2**Tin`` entries each, one per distinct ``(Fin, Fout)`` of the node's
channels, stored in the narrowest C type that holds the output codes, identical tables
shared between nodes); above MAX_TABLE_BITS input bits the same tables are stored as
segments (uint16 starts, codes, int8 steps, shift and saturation bytes, int32 offsets
per table: ``fixq_table_seg``); a multiply's shift is ``Fa + Fb - Fy`` per channel.

>>> res = export_c(graph, plan, "build/mnv3")              # doctest: +SKIP
>>> [(t["node"], t["op"], t["bytes"]) for t in res.tables][:1]  # doctest: +SKIP
[('hardswish', 'hardswish', 256)]
"""
from __future__ import annotations

import hashlib

from fixq.graph.ir import ChannelShuffle, Mul, Table
from fixq.numerics.formats import code_limits
from fixq.planning.elementwise import mul_shift
from .emit import C_EMITTERS, CTYPE_BYTES, ROUNDING_C, EmitCtx, _cid, _word

__all__ = ["register", "table_form"]

HEADER = "fixq_rt_elementwise.h"


def _ch_hw(ctx: EmitCtx, name: str) -> tuple[int, int]:
    C, *rest = ctx.shape(name)
    hw = 1
    for s in rest:
        hw *= s
    return C, hw


def _table_ctype(Tout) -> str:
    lo, hi = code_limits(Tout)
    if lo >= 0 and hi <= 255:
        return "uint8_t"
    return "int8_t" if lo >= -128 and hi <= 127 else "int16_t" if lo >= -2 ** 15 and hi < 2 ** 15 else "int32_t"


def _emit_table_seg(ctx: EmitCtx, n: Table, ti) -> str:
    """The segmented form (inputs wider than MAX_TABLE_BITS, at most 16 bits): int32 offsets,
    uint16 starts (minus qmin), codes in the narrowest type, int8 steps (NULL when all 0),
    modes = shift | 128 * saturated (NULL when all 0)."""
    s = ti.seg
    C, hw = _ch_hw(ctx, n.name)
    t = _cid(n.name)
    ctype = _table_ctype(ti.Tout)
    mode = s.shift + 128 * s.sat.long()
    cache = ctx.__dict__.setdefault("_table_cache", {})
    key = ("seg", ctype, *(hashlib.sha1(v.numpy().tobytes()).hexdigest()
                           for v in (s.start, s.code, s.step, mode, s.offset)))
    rom0 = ctx.rom
    if key in cache:  # identical segments (and flags) of an earlier node: shared, stored once
        arrs, shared = cache[key], True
    else:
        arrs = (ctx.array(f"tso_{t}", "int32_t", s.offset), ctx.array(f"tss_{t}", "uint16_t", s.start - ti.qmin),
                ctx.array(f"tab_{t}", ctype, s.code),
                ctx.array(f"tst_{t}", "int8_t", s.step) if bool(s.step.any()) else "NULL",
                ctx.array(f"tsm_{t}", "uint8_t", mode) if bool(mode.any()) else "NULL")
        cache[key], shared = arrs, False
    off, start, tab, step, mod = arrs
    idx = ctx.array(f"tix_{t}", "uint16_t", ti.index)
    ptrs = ", ".join(tab if c == ctype else "NULL" for c in ("int8_t", "uint8_t", "int16_t", "int32_t"))
    ctx.decls.append(f"static const fixq_table_seg_t T_{t} = {{{C}, {hw}, {_word(ti.Tin)}, {off}, {start}, {ptrs}, "
                     f"{step}, {mod}, {idx}}};")
    ctx.headers.add(HEADER)
    ctx.tables.append({"node": n.name, "op": n.op, "tables": len(s.offset) - 1, "entries": 2 ** int(ti.Tin),
                       "segments": len(s.start), "ctype": ctype, "bytes": ctx.rom - rom0,
                       "shared_with": tab if shared else None})
    return f"fixq_table_seg(&T_{t}, {ctx.buf(n.inputs[0])}, {ctx.buf(n.name)}, {ctx.counts(n)});"


def _seg_bytes(ti) -> int:
    """ROM of the segmented form of ``ti`` (offsets, starts, codes, steps, modes)."""
    s, S = ti.seg, len(ti.seg.start)
    mode = bool(s.shift.any()) or bool(s.sat.any())
    return 4 * len(s.offset) + (2 + CTYPE_BYTES[_table_ctype(ti.Tout)] + int(bool(s.step.any())) + int(mode)) * S


def table_form(ti) -> str:
    """``"segmented"`` or ``"dense"``: the C form of a node's tables, the smaller in ROM
    (segmented only exists above MAX_TABLE_BITS; both are the same codes and flags)."""
    if ti.seg is None:
        return "dense"
    s = ti.seg  # the dense expansion: K tables of 2^Tin codes, flags where some segment saturates
    dense = (len(s.offset) - 1) * 2 ** int(ti.Tin) * (CTYPE_BYTES[_table_ctype(ti.Tout)] + int(bool(s.sat.any())))
    return "segmented" if _seg_bytes(ti) < dense else "dense"


def _emit_table(ctx: EmitCtx, n: Table) -> str:
    """A table node in whichever exact form is smaller in ROM: above MAX_TABLE_BITS the
    segmented form unless the dense expansion of the same codes is not larger (steep
    functions at high output resolution make one segment per input code)."""
    ti = ctx.eng.tables[n.name]
    if table_form(ti) == "segmented":
        return _emit_table_seg(ctx, n, ti)
    tables, sat_f = ti.dense()
    C, hw = _ch_hw(ctx, n.name)
    t = _cid(n.name)
    ctype = _table_ctype(ti.Tout)
    cache = ctx.__dict__.setdefault("_table_cache", {})
    key = (ctype, hashlib.sha1(tables.numpy().tobytes()).hexdigest(), tuple(tables.shape),
           hashlib.sha1(sat_f.numpy().tobytes()).hexdigest())  # shared only with the same saturation flags
    rom0 = ctx.rom
    if key in cache:  # an identical table of an earlier node: shared, stored once
        tab, sat, shared = cache[key] + (True,)
    else:
        tab = ctx.array(f"tab_{t}", ctype, tables)
        sat = ctx.array(f"tsat_{t}", "uint8_t", sat_f.long()) if bool(sat_f.any()) else "NULL"
        cache[key], shared = (tab, sat), False
    idx = ctx.array(f"tix_{t}", "uint16_t", ti.index)
    ptrs = ", ".join(tab if c == ctype else "NULL" for c in ("int8_t", "uint8_t", "int16_t", "int32_t"))
    ctx.decls.append(f"static const fixq_table_t T_{t} = {{{C}, {hw}, {_word(ti.Tin)}, {ptrs}, {idx}, {sat}}};")
    ctx.headers.add(HEADER)
    ctx.tables.append({"node": n.name, "op": n.op, "tables": int(tables.shape[0]), "entries": int(tables.shape[1]),
                       "ctype": ctype, "bytes": ctx.rom - rom0, "shared_with": tab if shared else None})
    return f"fixq_table(&T_{t}, {ctx.buf(n.inputs[0])}, {ctx.buf(n.name)}, {ctx.counts(n)});"


def _emit_mul(ctx: EmitCtx, n: Mul) -> str:
    C, hw = _ch_hw(ctx, n.name)
    hwa, hwb = (_ch_hw(ctx, i)[1] for i in n.inputs)
    t = _cid(n.name)
    sh = ctx.array(f"ms_{t}", "int8_t", mul_shift(ctx.eng.fmts, n, C))
    ctx.decls.append(f"static const fixq_mul_t M_{t} = {{{C}, {hwa}, {hwb}, {sh}, {_word(ctx.eng.fmts[n.name][0])}, "
                     f"{ROUNDING_C[ctx.eng.rounding]}}};")
    ctx.headers.add(HEADER)
    return f"fixq_mul(&M_{t}, {ctx.buf(n.inputs[0])}, {ctx.buf(n.inputs[1])}, {ctx.buf(n.name)}, {ctx.counts(n)});"


def _emit_shuffle(ctx: EmitCtx, n: ChannelShuffle) -> str:
    C, hw = _ch_hw(ctx, n.name)
    ctx.headers.add(HEADER)
    return f"fixq_shuffle({C}, {hw}, {n.groups}, {ctx.buf(n.inputs[0])}, {ctx.buf(n.name)});"


def register() -> None:
    """Add the element-wise emitters to the C emitter table (idempotent)."""
    CTYPE_BYTES.setdefault("uint16_t", 2)
    C_EMITTERS.update({Table: _emit_table, Mul: _emit_mul, ChannelShuffle: _emit_shuffle})
