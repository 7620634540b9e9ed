"""Weight storage of one conv/linear layer in the generated C (DESIGN.md §5c): the smallest
of int4 packed (every code in [-8, 7]), int4/int8 per 2D filter, int8, int16, int32. The
choice is made on the codes, so every storage is lossless.

Notation: codes ``w[i, j, ky, kx]``, ``O`` output channels, ``mg = cin / groups`` input
channels per kernel, ``khw = kh * kw`` (a linear layer is ``O x in`` filters of 1x1); 2D
filter ``(i, j)`` is *narrow* when its ``khw`` codes all lie in ``[-8, 7]``.

``FIXQ_WS_P48`` (int4/int8 per 2D filter) stores row ``i`` from byte ``row[i]`` as a nibble
stream (low nibble first): its filters ``j = 0 .. mg-1`` in order, each ``khw`` codes in
``(ky, kx)`` order, one nibble per code (two's complement 4 bits) when ``(i, j)`` is narrow,
two nibbles (low, high: two's complement 8 bits) otherwise; a row ends on a byte. The index
is ``row`` (``uint16[O]`` where every row starts below 2^16, else ``int32[O]``) and ``mask``
(bit ``f % 8`` of byte ``f / 8`` set when filter ``f = i * mg + j`` is narrow). It is chosen
only when data + index + the descriptor (P48_STRUCT) save at least ``P48_MIN_SAVING`` of
the int8 bytes; the runtime's unpacking is compiled only into models that use it (FIXQ_P48).
Unpacking costs time (scalar): a row is unpacked once per pass of FIXQ_ROWS output rows in the
hwc loop nest, once per output row in the im2col nest, once per channel in the depthwise one.
On ResNet-20's <8b,8b> 3D plan (a few narrow filters in 6 layers) P48 saved 633 bytes of 277 KB
(0.2%) and the unpacking took 13.6% of the C's perf samples (benchmarks/results/c_speed_notes.md).
Layers where few filters are narrow therefore stay int8; mixed 8/4-bit plans (most low-energy
filters narrow) still pack.

>>> data, row, mask = p48_layout(torch.tensor([[[[1, -2]], [[100, 3]]]]))   # O=1, mg=2, 1x2
>>> data, row, mask      # filter 0 narrow: nibbles 1, 0xE; filter 1: bytes 100, 3
([225, 100, 3], [0], [1])
"""
from __future__ import annotations

import torch

from fixq.backends.engine import EngineError
from fixq.planning.safety import C_LIMITS

__all__ = ["WSTORE", "P48_NAME", "P48_STRUCT", "P48_MIN_SAVING", "narrow_filters", "p48_layout", "p48_unpack", "p48_bytes", "row_bytes", "store_weights"]

WSTORE = {"int8_t": "FIXQ_WS_I8", "int16_t": "FIXQ_WS_I16", "int32_t": "FIXQ_WS_I32"}
P48_NAME = "int4/int8 per 2D filter"
P48_STRUCT = 32  # bytes of the fixq_wmix_t descriptor (4 pointers on a 64-bit host; 16 on 32-bit targets)
P48_MIN_SAVING = 0.125  # P48 only where it saves >= 1/8 of the layer's int8 bytes (module docstring)


def _nibbles_to_bytes(nib: list[int]) -> list[int]:
    nib = nib + [0] * (len(nib) % 2)
    return [nib[k] | (nib[k + 1] << 4) for k in range(0, len(nib), 2)]


def narrow_filters(w: torch.Tensor) -> torch.Tensor:
    """``(O, mg)`` bool: the 2D filters whose codes all lie in [-8, 7]."""
    f = w.reshape(w.shape[0], w.shape[1], -1).long()
    return ((f >= -8) & (f <= 7)).all(dim=2)


def row_bytes(row: list[int]) -> int:
    """Bytes of one row offset: uint16 where every row starts below 2^16, else int32."""
    return 2 if not row or row[-1] < 2 ** 16 else 4


def p48_bytes(w: torch.Tensor) -> int:
    """ROM of FIXQ_WS_P48 for codes ``w`` (O, mg, kh, kw): data, row table and mask."""
    O, mg = w.shape[:2]
    khw = w[0, 0].numel()
    size = ((2 * mg - narrow_filters(w).sum(dim=1)) * khw + 1) // 2  # bytes per row
    last = int(size[:-1].sum())  # where the last row starts
    return int(size.sum()) + (2 if last < 2 ** 16 else 4) * O + (O * mg + 7) // 8


def p48_layout(w: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """(data bytes, row byte offsets, mask bytes) of FIXQ_WS_P48 for codes ``w`` (O, mg, kh, kw)."""
    O, mg = w.shape[:2]
    narrow = narrow_filters(w).reshape(-1).tolist()
    codes = w.reshape(O * mg, -1).long().tolist()
    data, row = [], []
    for i in range(O):
        row.append(len(data))
        nib = []
        for f in range(i * mg, (i + 1) * mg):
            for v in codes[f]:
                nib += [v & 15] if narrow[f] else [v & 15, (v >> 4) & 15]
        data += _nibbles_to_bytes(nib)
    mask = [sum(1 << b for b in range(8) if k + b < len(narrow) and narrow[k + b]) for k in range(0, len(narrow), 8)]
    return data, row, mask


def p48_unpack(data: list[int], row: list[int], mask: list[int], shape) -> torch.Tensor:
    """The codes (O, mg, kh, kw) back from FIXQ_WS_P48, as the runtime's weight_row reads them."""
    O, mg, kh, kw = shape
    out = torch.zeros(O, mg, kh * kw, dtype=torch.long)
    for i in range(O):
        n = 2 * row[i]
        for j in range(mg):
            f = i * mg + j
            for t in range(kh * kw):
                u = (data[n >> 1] >> (4 * (n & 1))) & 15
                if (mask[f >> 3] >> (f & 7)) & 1:
                    out[i, j, t], n = u - ((u & 8) << 1), n + 1
                else:
                    u |= ((data[(n + 1) >> 1] >> (4 * ((n + 1) & 1))) & 15) << 4
                    out[i, j, t], n = u - ((u & 128) << 1), n + 2
    return out.reshape(O, mg, kh, kw)


def store_weights(ctx, name: str, w: torch.Tensor, hwc: bool = False) -> tuple[str, str, dict]:
    """Declare the weight codes ``w`` (O, mg, kh, kw) of one layer in ``ctx`` (an EmitCtx) in
    the smallest storage; plain and int4-packed storages are laid out ``[O][kh][kw][mg]`` when
    ``hwc``, else ``[O][mg][kh][kw]``. Returns (the ``weight`` initializer, FIXQ_WS_* storage,
    export.json info: storage name, bytes, index bytes, narrow/all 2D filters)."""
    vals = w.reshape(-1).long()
    lo, hi = (int(vals.min()), int(vals.max())) if vals.numel() else (0, 0)
    narrow = narrow_filters(w) if vals.numel() else torch.zeros(0, dtype=torch.bool)
    info = {"filters": int(narrow.numel()), "narrow_filters": int(narrow.sum())}
    flat = (w.permute(0, 2, 3, 1) if hwc else w).reshape(-1).long()
    if ctx.pack and -8 <= lo and hi <= 7:
        packed = _nibbles_to_bytes((flat & 15).tolist())
        info.update(weights="int4 packed", bytes=len(packed), index_bytes=0)
        return ctx.array(name, "uint8_t", packed, "weights"), "FIXQ_WS_P4", info
    if ctx.pack and -128 <= lo and hi <= 127 and 0 < info["narrow_filters"] and \
            p48_bytes(w) + P48_STRUCT <= (1 - P48_MIN_SAVING) * vals.numel():  # the descriptor counted
        data, row, mask = p48_layout(w)
        d = ctx.array(name, "uint8_t", data, "weights")
        rb = row_bytes(row)
        r = ctx.array(f"{name}_row", "uint16_t" if rb == 2 else "int32_t", row, "weight index")
        m = ctx.array(f"{name}_mask", "uint8_t", mask, "weight index")
        rows = f"{r}, NULL" if rb == 2 else f"NULL, {r}"
        ctx.decls.append(f"static const fixq_wmix_t {name}_mix = {{{d}, {rows}, {m}}};")
        info.update(weights=P48_NAME, bytes=len(data) + rb * len(row) + len(mask),
                    index_bytes=rb * len(row) + len(mask))
        return f"&{name}_mix", "FIXQ_WS_P48", info
    for ct in ("int8_t", "int16_t", "int32_t"):
        if C_LIMITS[ct][0] <= lo and hi <= C_LIMITS[ct][1]:
            info.update(weights=ct, bytes=flat.numel() * int(ct[3:-2]) // 8, index_bytes=0)
            return ctx.array(name, ct, flat, "weights"), WSTORE[ct], info
    raise EngineError(f"C table {name}: weight codes beyond int32")
