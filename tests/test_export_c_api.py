"""The generated C as firmware uses it: int32/int64 sums, the API with prefixes (two models
in one program), the README example, the pixel table, packed 4-bit weights, the strict
warning set, and the ARM targets (Cortex-M4 on QEMU, ARM Linux under qemu-arm)."""
import re
import shutil
import subprocess

import pytest
import torch

from fixq.backends.engine import Engine
from fixq.backends.export_c import export_c, run_c_program
from fixq.backends.export_c.run import STRICT_FLAGS, UBSAN_FLAGS, build
from fixq.backends.export_c.targets import build_target, runner_for, size_report, tools_missing
from fixq.data.zoo import CifarResNet, LeNet

from helpers import DepthwiseNet, make_graph, plan_for
from shared_data import resnet_weights
from test_export_c import c_vs_engine

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                                reason="needs gcc and make")
STRICT = STRICT_FLAGS  # fixq.backends.export_c.run's strict warning set


def test_int32_and_int64_sums(tmp_path):
    """8-bit layers take the int32 loops, 16-bit data x 16-bit weights cannot (the proof
    says so) and take int64: both equal the engine under UBSan."""
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    res8, _ = c_vs_engine(g, plan_for(g, (3, 16, 16), coeff_mode="3D"), (3, 16, 16), tmp_path / "a", n=8)
    assert {v["acc"] for v in res8.layers.values()} == {"int32"}
    res16, _ = c_vs_engine(g, plan_for(g, (3, 16, 16), coeff_bits=16, data_bits=16, coeff_mode="3D"),
                           (3, 16, 16), tmp_path / "b", n=8)
    assert {v["acc"] for v in res16.layers.values()} == {"int64"}
    assert res16.act_type == "int32_t" or res16.act_type == "int16_t"


def _lib(cdir, tmp, tag):
    """model.c and the runtime compiled in their own folder (their fixq_config.h)."""
    objs = []
    for src in ["model.c"] + sorted(p.name for p in cdir.glob("fixq_rt*.c")):
        o = tmp / f"{tag}_{src}.o"
        r = subprocess.run(["gcc", *STRICT, "-O2", "-c", src, "-o", str(o)], cwd=cdir, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        objs.append(str(o))
    return objs


TWO = r"""
#include <stdio.h>
#include "a/model.h"
#include "b/model.h"
FIXQ_NETA_ARENA_DEFINE(arena_a);
FIXQ_NETB_ARENA_DEFINE(arena_b);
int main(void) {
    static fixq_neta_in_t ia[FIXQ_NETA_IN_SIZE];
    static fixq_netb_in_t ib[FIXQ_NETB_IN_SIZE];
    fixq_neta_out_t oa[FIXQ_NETA_OUT_SIZE];
    fixq_netb_out_t ob[FIXQ_NETB_OUT_SIZE];
    fixq_neta_ctx ca;
    fixq_netb_ctx cb;
    FILE *f = fopen("in_a.bin", "rb");
    int k;
    if (!f || fread(ia, sizeof ia[0], FIXQ_NETA_IN_SIZE, f) != FIXQ_NETA_IN_SIZE) return 2;
    fclose(f);
    f = fopen("in_b.bin", "rb");
    if (!f || fread(ib, sizeof ib[0], FIXQ_NETB_IN_SIZE, f) != FIXQ_NETB_IN_SIZE) return 2;
    fclose(f);
    if (fixq_neta_init(&ca, arena_a, sizeof arena_a - 8) != FIXQ_ERR_ARENA) return 3;
    if (fixq_neta_init(&ca, arena_a, sizeof arena_a) || fixq_netb_init(&cb, arena_b, sizeof arena_b)) return 3;
    if (fixq_neta_run(&ca, ia, oa) || fixq_netb_run(&cb, ib, ob) || fixq_neta_run(&ca, NULL, oa) != FIXQ_ERR_NULL)
        return 4;
    for (k = 0; k < FIXQ_NETA_OUT_SIZE; k++) printf("a %d\n", (int)oa[k]);
    for (k = 0; k < FIXQ_NETB_OUT_SIZE; k++) printf("b %d\n", (int)ob[k]);
    return 0;
}
"""


def test_two_models_link_into_one_program(tmp_path):
    """Different prefixes, different activation types (int8 vs int16 arenas), one program
    (C and C++ compilers see the same header); both equal the engine."""
    ga = make_graph(LeNet(8), (1, 8, 8))
    pa = plan_for(ga, (1, 8, 8), coeff_mode="3D", data_sign="signed")
    gb = make_graph(DepthwiseNet(), (3, 16, 16))
    pb = plan_for(gb, (3, 16, 16), coeff_mode="2D")
    ra = export_c(ga, pa, tmp_path / "a", name="neta")
    rb = export_c(gb, pb, tmp_path / "b", name="netb")
    assert ra.act_type != rb.act_type
    torch.manual_seed(0)
    ea, eb = Engine(ga, pa), Engine(gb, pb)
    qa, qb = ea.quantize_input(torch.randn(1, 1, 8, 8)), eb.quantize_input(torch.randn(1, 3, 16, 16))
    from fixq.backends.export_c.run import NP_TYPES
    import json
    for q, r, f in ((qa, ra, "in_a.bin"), (qb, rb, "in_b.bin")):
        info = json.loads((r.out / "export.json").read_text())
        q.numpy().astype(NP_TYPES[info["input_ctype"]]).tofile(tmp_path / f)
    (tmp_path / "two.c").write_text(TWO)
    objs = _lib(ra.out, tmp_path, "a") + _lib(rb.out, tmp_path, "b")
    r = subprocess.run(["gcc", *STRICT, "-O2", "-o", "two", "two.c", *objs], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("g++"):  # the header is C++-clean (extern "C")
        r = subprocess.run(["g++", "-fsyntax-only", "-x", "c++", "-"], input='#include "a/model.h"\n#include "b/model.h"\n',
                           cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(["./two"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = {t: [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith(t)] for t in "ab"}
    assert got["a"] == ea.run(qa).reshape(-1).tolist()
    assert got["b"] == eb.run(qb).reshape(-1).tolist()


def _readme_example() -> str:
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"### Deploying the C.*?```c\n(.*?)```", text, re.S)
    assert m, "README has no Deploying the C example"
    return m.group(1)


def test_readme_firmware_example_compiles_and_runs(tmp_path, digits_dir):
    """The README's firmware example, on the bundled digits LeNet with its preprocessing:
    pixels through the model's table, the top class equals the engine's on real images."""
    from fixq.analysis.evaluate import ImageSet, load_images
    from fixq.backends.export_c.pixels import load_pixels
    from fixq.graph.capture import capture
    from fixq.data.zoo import PRESETS, build_model
    from dataclasses import asdict
    model, _ = build_model("lenet-digits")
    g = capture(model, torch.zeros(2, 1, 8, 8))
    s = ImageSet.scan(digits_dir)
    pre = PRESETS["digits"]
    x, _ = load_images(s, range(64), pre, show_progress=False)
    plan = plan_for(g, (1, 8, 8), coeff_mode="3D")
    res = export_c(g, plan, tmp_path / "c", name="lenet", meta={"preprocess": asdict(pre)})
    px = load_pixels(s, range(8), pre)
    eng = Engine(g, plan)
    want_codes = eng.quantize_input(x[:8])
    # the pixel table equals fixq's preprocessing + quantization on these images
    got, _ = run_c_program(res.out, pixels=px)
    assert torch.equal(got, eng.run(want_codes).reshape(8, -1))
    main = _readme_example() + r"""
#include <stdio.h>
int main(void) {
    static uint8_t img[FIXQ_LENET_IN_SIZE];
    int n = 0, c;
    FILE *f = fopen("px.bin", "rb");
    while (f && fread(img, 1, sizeof img, f) == sizeof img) {
        c = classify(img);
        printf("%d\n", c);
        n++;
    }
    return n == 8 ? 0 : 1;
}
"""
    (res.out / "fw.c").write_text(main)
    px.transpose(0, 2, 3, 1).tofile(res.out / "px.bin")  # camera buffers are HWC
    srcs = ["fw.c", "model.c"] + sorted(p.name for p in res.out.glob("fixq_rt*.c"))
    r = subprocess.run(["gcc", *STRICT, "-O2", "-o", "fw", *srcs], cwd=res.out, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["./fw"], cwd=res.out, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    top = [int(v) for v in r.stdout.split()]
    logits = eng.run(want_codes).reshape(8, -1)
    assert top == [int(torch.argmax(row)) for row in logits]  # first maximum, as the loop takes it


def test_packed_4bit_weights_same_outputs_less_rom(tmp_path):
    """A mixed 8/4 plan (4-bit depthwise and grouped layers): packed weights give the same
    outputs as one code per byte and less ROM."""
    from fixq.algorithms.calibrate import calibrate
    from fixq.planning.plan import LayerConfig, QuantConfig
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    cfg = QuantConfig(LayerConfig(coeff_mode="3D"), overrides=(("dw", {"coeff_bits": 4}), ("grp", {"coeff_bits": 4}),
                                                               ("pw", {"coeff_bits": 4})))
    torch.manual_seed(0)
    plan = calibrate(g, [(torch.randn(16, 3, 16, 16), None)], cfg, show_progress=False)
    packed, _ = c_vs_engine(g, plan, (3, 16, 16), tmp_path / "p", n=8)
    plain = export_c(g, plan, tmp_path / "u", pack=False)
    build(plain.out, cflags=UBSAN_FLAGS)
    assert {k: v["weights"] for k, v in packed.layers.items() if k in ("L_dw", "L_grp", "L_pw")} == \
        {"L_dw": "int4 packed", "L_grp": "int4 packed", "L_pw": "int4 packed"}
    assert plain.layers["L_stem"]["weights"] == "int8_t" and plain.layers["L_dw"]["weights"] == "int8_t"
    nodes = {n.name: n for n in g.nodes}
    n4 = sum(nodes[n].weight.numel() for n in ("dw", "grp", "pw"))
    assert plain.rom_bytes - packed.rom_bytes >= n4 // 2 - 3  # half a byte per 4-bit code
    eng = Engine(g, plan)
    q = eng.quantize_input(torch.randn(8, 3, 16, 16))
    assert torch.equal(run_c_program(plain.out, q)[0], run_c_program(packed.out, q)[0])


def test_runtime_and_model_pass_the_strict_warning_set(tmp_path):
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    res = export_c(g, plan_for(g, (3, 16, 16), coeff_mode="2D"), tmp_path / "c")
    for cc in ("gcc", "clang"):
        if shutil.which(cc) is None:
            continue
        for counts in ("0", "1"):
            r = subprocess.run([cc, *STRICT, "-O2", f"-DFIXQ_COUNTS={counts}", "-c", "model.c",
                                *sorted(p.name for p in res.out.glob("fixq_rt*.c"))], cwd=res.out,
                               capture_output=True, text=True)
            assert r.returncode == 0, f"{cc}: {r.stderr}"


@pytest.mark.parametrize("target", ["cortex-m4", "arm-linux"])
def test_arm_targets_equal_the_engine_lenet(tmp_path, target):
    if tools_missing(target):
        pytest.skip(f"{target} needs {', '.join(tools_missing(target))} (apt-get install gcc-arm-none-eabi "
                    "libnewlib-arm-none-eabi qemu-system-arm qemu-user gcc-arm-linux-gnueabihf)")
    g = make_graph(LeNet(8), (1, 8, 8))
    plan = plan_for(g, (1, 8, 8), coeff_mode="2D", data_mode="3D", acc_bits=16)
    res = export_c(g, plan, tmp_path / "c", name="lenet")
    eng = Engine(g, plan)
    q = eng.quantize_input(torch.randn(6, 1, 8, 8) * 2)
    got, sat = run_c_program(res.out, q, runner=runner_for(target), exe=build_target(res.out, target))
    assert torch.equal(got, eng.run(q).reshape(6, -1))
    assert sat["acc"] == sum(v.get("acc", 0) for v in eng.saturations().values())
    if target == "cortex-m4":
        assert sat["ticks"] > 0
        assert size_report(res.out)[0].startswith("Cortex-M4")


def test_cortex_m4_and_arm_linux_resnet20(tmp_path):
    missing = tools_missing("cortex-m4") + tools_missing("arm-linux")
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    from fixq.graph.capture import capture
    from fixq.data.zoo import load_weights
    m = load_weights(CifarResNet(20), str(resnet_weights(20)))
    g = capture(m, torch.randn(2, 3, 32, 32))
    plan = plan_for(g, (3, 32, 32), coeff_mode="3D", data_sign="signed")
    res = export_c(g, plan, tmp_path / "c")
    eng = Engine(g, plan)
    q = eng.quantize_input(torch.randn(2, 3, 32, 32))
    want = eng.run(q).reshape(2, -1)
    for target in ("cortex-m4", "arm-linux"):
        got, _ = run_c_program(res.out, q, runner=runner_for(target), exe=build_target(res.out, target))
        assert torch.equal(got, want), target


@pytest.mark.parametrize("target", ["cortex-m4", "arm-linux"])
def test_cli_run_c_target_lenet_digits_equals_quantize(tmp_path, digits_dir, capsys, target):
    """The trained digits LeNet through the CLI: `fixq run-c --target cortex-m4|arm-linux` on the
    evaluation images of a `quantize --exact` run gives its logits exactly."""
    if tools_missing(target):
        pytest.skip(f"{target} needs {', '.join(tools_missing(target))}")
    import numpy as np
    from fixq.app.cli import main
    q = tmp_path / "q"
    assert main(["quantize", "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "64",
                 "--eval", str(digits_dir), "--eval-size", "24", "--exact", "--quiet",
                 "--save-logits", str(tmp_path / "q.npy"), "--out", str(q)]) == 0
    assert main(["export-c", "--plan", str(q / "plan.json"), "--out", str(tmp_path / "c"), "--no-build"]) == 0
    assert main(["run-c", str(tmp_path / "c"), "--data", str(digits_dir), "--images", str(q / "images.json"),
                 "--target", target, "--out", str(tmp_path / "c.npy")]) == 0
    assert f"({target})" in capsys.readouterr().out
    a, b = np.load(tmp_path / "q.npy"), np.load(tmp_path / "c.npy")
    assert a.shape == b.shape == (24, 10) and (a == b).all()
