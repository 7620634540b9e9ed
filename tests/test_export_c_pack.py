"""Weight storage of the generated C (DESIGN §5c): int4/int8 per 2D filter (FIXQ_WS_P48) for
mixed 8/4 plans, int4 packed K-means residuals, and no 64-bit division linked when every
average pool divides in 32 bits. Packed and unpacked C equal the integer engine bit for bit,
and the ROM saved is exactly what the codes allow."""
import json
import re
import shutil
import subprocess

import pytest
import torch

from fixq.algorithms.calibrate import observe, plan_from
from fixq.backends.engine import Engine
from fixq.backends.export_c import export_c, run_c_program
from fixq.backends.export_c.pack import p48_bytes, p48_layout, p48_unpack
from fixq.backends.export_c.run import UBSAN_FLAGS, build
from fixq.backends.export_c.targets import M4_FLAGS
from fixq.algorithms.kmeans import cluster_kernels
from fixq.algorithms.mixed import filter_bits, filter_energies
from fixq.planning.plan import LayerConfig, QuantConfig

import fixq.backends.export_c.pack as pk

from helpers import DepthwiseNet, make_graph, plan_for

needs_cc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None, reason="needs gcc and make")
SHAPE = (3, 16, 16)


def _net():
    """DepthwiseNet with weights from a fixed seed (not from what earlier tests left in the generator)."""
    torch.manual_seed(0)
    return make_graph(DepthwiseNet(), SHAPE)


def _expected_bytes(w: torch.Tensor) -> int:
    """Bytes the exporter must store codes ``w`` (O, mg, kh, kw) in, worked out from the codes
    alone: all in [-8, 7] -> two per byte; some 2D filters in [-8, 7] -> a nibble per narrow
    code, a byte per other code, rows on whole bytes, uint16 row offsets (int32 from 64 KiB) and
    a 1-bit mask per filter, if that (with the descriptor) saves at least 1/8 of one byte per
    code; else one byte per code."""
    O, mg = w.shape[:2]
    f = w.reshape(O, mg, -1)
    narrow = ((f >= -8) & (f <= 7)).all(dim=2)
    if narrow.all():
        return (w.numel() + 1) // 2
    khw = f.shape[2]
    rows = [(khw * (2 * mg - int(narrow[i].sum())) + 1) // 2 for i in range(O)]
    mixed = sum(rows) + (2 if sum(rows[:-1]) < 65536 else 4) * O + (O * mg + 7) // 8
    return mixed if narrow.any() and 8 * (mixed + pk.P48_STRUCT) <= 7 * w.numel() else w.numel()


def _codes(eng: Engine) -> list[torch.Tensor]:
    """Every weight table the C holds: layer codes and K-means basis kernels."""
    out = []
    for L in eng.layers.values():
        out.append(L.w)
        if L.basis is not None:
            out.append(L.basis.w)
    return out


def _packed_vs_plain(g, plan, tmp, n=6):
    """Export packed and unpacked; both, built under UBSan, equal the engine on n inputs.
    Returns (packed, plain) ExportResults."""
    eng = Engine(g, plan)
    torch.manual_seed(3)
    q = eng.quantize_input(torch.randn(n, *SHAPE) * 1.5)
    want = eng.run(q).reshape(n, -1)
    res = []
    for tag, pack in (("p", True), ("u", False)):
        r = export_c(g, plan, tmp / tag, pack=pack)
        build(r.out, cflags=UBSAN_FLAGS)
        got, _ = run_c_program(r.out, q)
        assert torch.equal(got, want), f"pack={pack}: C differs from the engine"
        res.append(r)
    packed, plain = res
    assert all(-128 <= int(c.min()) and int(c.max()) <= 127 for c in _codes(eng))  # plain storage is int8 throughout
    saved = sum(w.numel() - _expected_bytes(w) for w in _codes(eng))
    assert plain.rom_bytes - packed.rom_bytes == saved
    n_F = sum(eng.fmts[k][1].reshape(-1).numel() for k in (g.input, g.output))  # fixq_<name>_in_F, _out_F
    parts = json.loads((packed.out / "export.json").read_text())["rom_parts"]
    assert packed.rom_bytes == sum(parts.values()) + n_F  # the index is counted
    return packed, plain, saved


def test_p48_layout_round_trips_and_counts_its_bytes():
    torch.manual_seed(0)
    for shape in ((5, 3, 3, 3), (4, 1, 3, 3), (6, 7, 1, 1), (3, 2, 1, 2)):
        w = torch.randint(-128, 128, shape)
        w[::2, ::2] = torch.randint(-8, 8, w[::2, ::2].shape)  # narrow filters
        data, row, mask = p48_layout(w)
        assert torch.equal(p48_unpack(data, row, mask, shape), w)
        assert len(data) + 2 * len(row) + len(mask) == p48_bytes(w)
    w = torch.randint(-128, 128, (4, 200, 11, 11))  # rows start beyond 64 KiB: int32 offsets
    w[:, 1] = 0
    data, row, mask = p48_layout(w)
    assert row[-1] >= 2 ** 16 and p48_bytes(w) == len(data) + 4 * 4 + (4 * 200 + 7) // 8


@needs_cc
def test_mixed_8_4_plan_packs_per_2d_filter(tmp_path):
    """A mixed plan from the energy algorithm (2D formats, 4 or 8 bits per 2D filter) on
    depthwise, 1x1, grouped+dilated and linear layers: int4/int8 per 2D filter storage, same
    outputs as one byte per code, and exactly the expected ROM saved."""
    g = _net()
    torch.manual_seed(2)
    x = torch.randn(16, *SHAPE)
    E = filter_energies(g, [x], show_progress=False)
    bits = filter_bits({k: E[k] for k in ("dw", "pw", "grp", "fc")}, 0.3)
    assert all((b == 4).any() and (b == 8).any() for b in bits.values())
    obs = observe(g, [(x, None)], show_progress=False)
    plan = plan_from(obs, QuantConfig(LayerConfig(coeff_mode="2D", data_mode="3D", acc_bits=24)), "t",
                     filter_bits=bits)
    packed, plain, saved = _packed_vs_plain(g, plan, tmp_path)
    kinds = {k: v["weights"] for k, v in packed.layers.items()}
    assert kinds["L_grp"] == "int4/int8 per 2D filter", kinds  # fc (5 x 32 codes): the index and descriptor
    assert kinds["L_fc"] == "int8_t", kinds  # eat more than 1/8 of its bytes (the ROM rule is checked above)
    assert {v["weights"] for v in plain.layers.values()} == {"int8_t"}
    grp = packed.layers["L_grp"]
    assert 0 < grp["narrow_filters"] < grp["filters"] == 8 * 8 and grp["index_bytes"] == 2 * 8 + 8
    parts = json.loads((packed.out / "export.json").read_text())["rom_parts"]
    assert parts["weight index"] == sum(v["index_bytes"] for v in packed.layers.values()) > 0
    assert saved > 0
    strict = ["-std=c99", "-Wall", "-Wextra", "-Wconversion", "-Wsign-conversion", "-Wshadow", "-Wcast-align",
              "-pedantic", "-Werror", "-O2", "-c", "model.c", *sorted(p.name for p in packed.out.glob("fixq_rt*.c"))]
    r = subprocess.run(["gcc", *strict], cwd=packed.out, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@needs_cc
def test_hwc_and_depthwise_layouts_pack_per_2d_filter(tmp_path, monkeypatch):
    """An 8-bit plan with one format per layer (4D: the [cout][kh][kw][cin] loop nest for dense
    convs) where many 2D filters of the stem (3x3), the depthwise conv, the 1x1 conv and the
    linear layer have small codes. The 1x1 conv (8 x 8 codes) stays int8: its index (16 + 8
    bytes) outweighs the nibbles saved."""
    monkeypatch.setattr(pk, "P48_STRUCT", 0)  # the 8-channel depthwise layer saves less than its descriptor
    g, plan = _shrunk_4d_plan()
    packed, _, saved = _packed_vs_plain(g, plan, tmp_path)
    for tag in ("L_stem", "L_dw", "L_fc"):
        assert packed.layers[tag]["weights"] == "int4/int8 per 2D filter", (tag, packed.layers[tag])
    assert packed.layers["L_stem"]["hwc"] and packed.layers["L_fc"]["hwc"] and not packed.layers["L_dw"]["hwc"]
    assert packed.layers["L_pw"]["weights"] == "int8_t" and packed.layers["L_pw"]["narrow_filters"] > 8 * 8 // 2
    assert saved > 0


def _shrunk_4d_plan():
    g = _net()
    for name, sel in (("stem", slice(None, None, 2)), ("dw", slice(None, 7)), ("pw", slice(1, None)),
                      ("fc", slice(1, None))):
        w = g.node(name).weight
        if name == "dw":
            w[sel] = w[sel] / 64
        else:
            w[:, sel] = w[:, sel] / 64
    return g, plan_for(g, SHAPE, coeff_mode="4D")


@needs_cc
def test_int32_row_offsets_unpack_in_c(tmp_path, monkeypatch):
    """The int32 row-offset branch (layers whose rows start past 64 KiB) read by the C: forced
    on a small model, packed C still equals the engine; the unpacking is compiled only where
    some layer uses it (FIXQ_P48)."""
    import fixq.backends.export_c.pack as pk
    from test_export_c import c_vs_engine
    g, plan = _shrunk_4d_plan()
    monkeypatch.setattr(pk, "row_bytes", lambda row: 4)
    monkeypatch.setattr(pk, "P48_STRUCT", 0)
    res, _ = c_vs_engine(g, plan, SHAPE, tmp_path / "r32", n=4)
    text = (res.out / "model.c").read_text()
    assert re.search(r"static const int32_t \w+_row\[", text) and not re.search(r"static const uint16_t \w+_row\[", text)
    assert "#define FIXQ_P48 1" in (res.out / "fixq_config.h").read_text()
    plain = export_c(g, plan_for(g, SHAPE, coeff_mode="3D"), tmp_path / "no48", pack=False)
    assert "#define FIXQ_P48 0" in (plain.out / "fixq_config.h").read_text()


@needs_cc
@pytest.mark.parametrize("kbits", [(8, 4), (8, 4, 4)], ids=["8b-basis-4b-resid", "resid-4b-data"])
def test_kmeans_residuals_pack(tmp_path, kbits):
    """K-means layers: the 4-bit residual kernels go through the same storage choice (all
    codes in [-8, 7]: int4 packed); same outputs as unpacked, exactly the expected ROM saved."""
    g = _net()
    torch.manual_seed(2)
    x = torch.randn(16, *SHAPE)
    obs = observe(g, [(x, None)], show_progress=False)
    km = {n: cluster_kernels(g.node(n).weight, 2, seed=0) for n in ("pw", "fc")}
    plan = plan_from(obs, QuantConfig(LayerConfig(coeff_mode="2D", data_mode="3D", acc_bits=24)), "t", kmeans=km,
                     kmeans_bits=kbits)
    packed, plain, saved = _packed_vs_plain(g, plan, tmp_path)
    assert packed.layers["L_pw"]["weights"] == packed.layers["L_fc"]["weights"] == "int4 packed"
    assert plain.layers["L_pw"]["weights"] == "int8_t"
    n4 = g.node("pw").weight.numel() + g.node("fc").weight.numel()
    assert saved >= n4 // 2


M4_DIV64 = ("__aeabi_ldivmod", "__aeabi_uldivmod", "__divdi3", "__moddi3", "__udivdi3", "__umoddi3")


def _m4_undefined(cdir, tmp, defs=()) -> set[str]:
    """Undefined symbols of model.c + the runtime compiled for the Cortex-M4 (what they link)."""
    objs = []
    for src in ["model.c"] + sorted(p.name for p in cdir.glob("fixq_rt*.c")):
        o = tmp / f"{src}.o"
        r = subprocess.run(["arm-none-eabi-gcc", *M4_FLAGS, *defs, "-c", str(cdir / src), "-o", str(o)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        objs.append(str(o))
    r = subprocess.run(["arm-none-eabi-nm", "-u", *objs], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in r.stdout.splitlines() if line.strip().startswith("U ")}


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("arm-none-eabi-nm") is None,
                    reason="needs arm-none-eabi-gcc and arm-none-eabi-nm (apt-get install gcc-arm-none-eabi)")
def test_no_64bit_division_linked_when_every_pool_is_div32(tmp_path):
    """DepthwiseNet has an average pool and an adaptive (global-style) average pool: with 8-bit
    data both divide in 32 bits, FIXQ_DIV64 is 0 and the Cortex-M4 objects need no 64-bit
    division helper; forcing -DFIXQ_DIV64=1 brings it back (the check can see it); 30-bit data
    need it, and the exporter says so."""
    g = _net()
    res = export_c(g, plan_for(g, SHAPE, coeff_mode="3D"), tmp_path / "c8")
    assert "#define FIXQ_DIV64 0" in (res.out / "fixq_config.h").read_text()
    (tmp_path / "o8").mkdir()
    assert not _m4_undefined(res.out, tmp_path / "o8") & set(M4_DIV64)
    (tmp_path / "o8f").mkdir()
    assert _m4_undefined(res.out, tmp_path / "o8f", ["-DFIXQ_DIV64=1"]) & set(M4_DIV64)
    res30 = export_c(g, plan_for(g, SHAPE, coeff_mode="3D", data_bits=30), tmp_path / "c30")
    assert "#define FIXQ_DIV64 1" in (res30.out / "fixq_config.h").read_text()
    r = subprocess.run(["gcc", "-std=c99", "-DFIXQ_DIV64=0", "-c", "fixq_rt.c", "-o", "/dev/null"], cwd=res30.out,
                       capture_output=True, text=True)  # a model that needs it cannot be built without it
    assert r.returncode != 0 and "needs 64-bit division" in r.stderr
    (tmp_path / "o30").mkdir()
    assert _m4_undefined(res30.out, tmp_path / "o30") & set(M4_DIV64)


@needs_cc
def test_div64_model_equals_the_engine(tmp_path):
    """30-bit data: an average pool beyond 32-bit division (FIXQ_DIV64 1) stays exact."""
    from test_export_c import c_vs_engine
    g = _net()
    res, _ = c_vs_engine(g, plan_for(g, SHAPE, coeff_mode="3D", data_bits=30), SHAPE, tmp_path, n=4)
    assert "#define FIXQ_DIV64 1" in (res.out / "fixq_config.h").read_text()


@needs_cc
@pytest.mark.parametrize("rows", [1, 8])
def test_rows_per_pass_come_from_the_exporter(tmp_path, rows):
    """The arena's kernel scratch is sized for ``hwc_rows`` output rows per pass and
    fixq_config.h defines FIXQ_ROWS to it: other values than the default still equal the
    engine under UBSan, and the runtime's fallback for hand-made configs is the exporter's
    default."""
    from fixq.backends.export_c.emit import HWC_ROWS, RUNTIME_DIR
    src = (RUNTIME_DIR / "fixq_rt_conv.c").read_text()
    assert re.search(r"#ifndef FIXQ_ROWS\n#define FIXQ_ROWS (\d+)\n#endif", src).group(1) == str(HWC_ROWS)
    g, plan = _shrunk_4d_plan()
    eng = Engine(g, plan)
    torch.manual_seed(3)
    q = eng.quantize_input(torch.randn(4, *SHAPE) * 1.5)
    r = export_c(g, plan, tmp_path / "c", hwc_rows=rows)
    assert f"#define FIXQ_ROWS {rows} " in (r.out / "fixq_config.h").read_text()
    assert any(v.get("hwc") for v in r.layers.values())
    build(r.out, cflags=UBSAN_FLAGS)
    got, _ = run_c_program(r.out, q)
    assert torch.equal(got, eng.run(q).reshape(4, -1))
    if rows != HWC_ROWS:
        default = export_c(g, plan, tmp_path / "d")
        assert (r.arena_bytes > default.arena_bytes) == (rows > HWC_ROWS)
