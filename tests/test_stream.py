"""Streaming (bounded memory), the flat-folder + labels layout, and torch.distributed runs
that must give the numbers of one process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixq.app.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- streaming ---------------------------------------------------------------------------

def test_session_holds_no_image_set_and_passes_one_batch(digits_dir, monkeypatch):
    """Structure, not a memory number: every pass sees at most one batch of images, and the
    session keeps no image tensor (streams, labels and N x classes logits only)."""
    import fixq.analysis.evaluate as ev
    import fixq.algorithms.observe as ob
    from fixq.app.common import make_config
    from fixq.algorithms.pipeline import open_session, run_config
    from fixq.backends.simulate import Simulator
    seen = []
    f0, s0, o0 = ev.run_float, Simulator.run, ob._forward_observed
    monkeypatch.setattr(ev, "run_float", lambda g, x, *a, **k: (seen.append(x.shape[0]), f0(g, x, *a, **k))[1])
    monkeypatch.setattr(Simulator, "run", lambda self, x, *a, **k: (seen.append(x.shape[0]), s0(self, x, *a, **k))[1])
    monkeypatch.setattr(ob, "_forward_observed", lambda g, x, *a: (seen.append(x.shape[0]), o0(g, x, *a))[1])
    s = open_session("lenet-digits", str(digits_dir), str(digits_dir), calib_size=50, eval_size=90,
                     batch_size=16, workers=0, show_progress=False)
    run = run_config(s, make_config())  # default data method mse: a second calibration pass
    assert seen and max(seen) <= 16 and len(seen) >= 4 + 6 + 4  # calib x2 passes, eval, float eval
    assert run.result.logits.shape == (90, 10) and run.result.sqnr_images == 90

    def tensors(o, depth=0):
        if isinstance(o, torch.Tensor):
            yield o
        elif depth < 4 and isinstance(o, dict):
            for v in o.values():
                yield from tensors(v, depth + 1)
        elif depth < 4 and isinstance(o, (list, tuple)):
            for v in o:
                yield from tensors(v, depth + 1)
        elif depth < 4 and hasattr(o, "__dict__") and not isinstance(o, torch.nn.Module):
            yield from tensors(vars(o), depth + 1)
    images = [t for t in tensors(s) if t.dim() >= 3 and t.shape[0] > 1]
    assert not images, [tuple(t.shape) for t in images]


def test_streamed_equals_in_memory(digits_dir):
    """The streamed session gives the numbers of the in-memory Python API on the same batches."""
    from fixq.algorithms.calibrate import calibrate
    from fixq.app.common import make_config
    from fixq.analysis.evaluate import evaluate_quant
    from fixq.algorithms.pipeline import open_session, run_config
    from fixq.backends.simulate import Simulator
    s = open_session("lenet-digits", str(digits_dir), str(digits_dir), calib_size=40, eval_size=70,
                     batch_size=16, workers=2, show_progress=False)
    cfg = make_config(data_mode="3D")
    run = run_config(s, cfg)
    xc, xe = s.calib_stream.tensor(), s.eval_stream.tensor()
    plan = calibrate(s.graph, [(xc[i:i + 16], None) for i in range(0, 40, 16)], cfg, "lenet-digits",
                     show_progress=False)
    assert plan.to_json() == run.plan.to_json()
    res = evaluate_quant(Simulator(s.graph, plan), xe, s.eval_y, s.float_logits, 16, show_progress=False)
    assert torch.equal(res.logits, run.result.logits) and res.sqnr_db == run.result.sqnr_db
    assert res.saturations == run.result.saturations


def test_float64_temporaries_are_bounded_and_give_the_same_numbers(digits_dir, monkeypatch):
    """The mse range search and the SQNR sums work on blocks of values (temporaries bounded
    by a constant, not by the batch's largest tensor); tiny blocks give the same plan and
    SQNR as one block."""
    import fixq.analysis.evaluate as ev
    import fixq.algorithms.observe as ob
    from fixq.app.common import make_config
    from fixq.algorithms.pipeline import open_session, run_config
    from fixq.numerics.ranges import MSE_CANDIDATES

    def go():
        s = open_session("lenet-digits", str(digits_dir), str(digits_dir), calib_size=40, eval_size=40,
                         batch_size=16, workers=0, show_progress=False)
        return run_config(s, make_config(data_mode="3D", data_method="mse"))
    whole = go()
    seen = []
    real = ob.fake_quantize
    monkeypatch.setattr(ob, "fake_quantize", lambda c, *a: (seen.append(c.numel()), real(c, *a))[1])
    monkeypatch.setattr(ob, "MSE_CHUNK", 64)
    monkeypatch.setattr(ev, "CHUNK", 50)
    small = go()
    assert seen and max(seen) <= 64 * 2 and len(seen) > 10 * MSE_CANDIDATES  # many small blocks were used
    assert small.plan.to_json() == whole.plan.to_json()
    assert torch.equal(small.result.logits, whole.result.logits)
    assert small.result.sqnr_db.keys() == whole.result.sqnr_db.keys()
    for k, v in whole.result.sqnr_db.items():
        assert abs(small.result.sqnr_db[k] - v) <= 1e-9 * max(1.0, abs(v)), k


# ---- flat folder + labels file -----------------------------------------------------------

@pytest.fixture
def flat(tmp_path, digits_dir):
    """40 digits as an ImageFolder and the same images flat (sorted names keep the order)."""
    tree, flat = tmp_path / "tree", tmp_path / "flat"
    rows = []
    for c in range(10):
        (tree / str(c)).mkdir(parents=True)
        for f in sorted((Path(digits_dir) / str(c)).glob("*.png"))[:4]:
            shutil.copy(f, tree / str(c) / f.name)
            rows.append((f"c{c}_{f.name}", c, f))
    flat.mkdir()
    for name, _, f in rows:
        shutil.copy(f, flat / name)
    (tmp_path / "val.txt").write_text("".join(f"{n} {c}\n" for n, c, _ in reversed(rows)))
    (tmp_path / "idx.txt").write_text("# ground truth\n" + "".join(f"{c}\n" for _, c, _ in rows))
    return tmp_path


def _quant(capsys, tmp, eval_dir, *extra):
    out = tmp / ("o" + str(len(list(tmp.glob("o*")))))
    code, _, err = run(capsys, "quantize", "--model", "lenet-digits", "--calib", tmp / "tree", "--calib-size", 20,
                       "--eval", eval_dir, "--batch-size", 16, "--workers", 0, "--quiet", "--out", out, *extra)
    return code, err, out


def test_labels_file_both_forms_match_imagefolder(capsys, flat):
    code, err, o_tree = _quant(capsys, flat, flat / "tree")
    assert code == 0, err
    ref = json.loads((o_tree / "report.json").read_text())
    for lab in ("val.txt", "idx.txt"):
        code, err, o = _quant(capsys, flat, flat / "flat", "--labels", flat / lab)
        assert code == 0, err
        rep = json.loads((o / "report.json").read_text())
        assert rep["n_eval"] == 40 and rep["images"]["labels_file"].endswith(lab)
        for k in ("quant", "float", "agreement_top1"):
            assert rep[k] == ref[k], (lab, k)
        assert (o / "plan.json").read_bytes() == (o_tree / "plan.json").read_bytes()


BAD = [
    ("val.txt", lambda t: t.replace("c3_", "zz_", 1), "is not in"),
    ("val.txt", lambda t: "\n".join(t.splitlines()[1:]) + "\n", "have no line in labels file"),
    ("val.txt", lambda t: t + "c0_x.png 1 2\n", "expected 'filename class_index'"),
    ("val.txt", lambda t: t.replace(" 7\n", " seven\n", 1), "is not a class index"),
    ("val.txt", lambda t: t.replace(" 7\n", " 10\n", 1), "label 10 is out of range"),
    ("val.txt", lambda t: t.replace(" 7\n", " -1\n", 1), "is negative"),
    ("val.txt", lambda t: t + t.splitlines()[0] + "\n", "is listed twice"),
    ("idx.txt", lambda t: t + "3\n", "41 labels for the 40 images"),
    ("idx.txt", lambda t: t.replace("\n3\n", "\n3 x.png\n", 1), "use one form"),
    ("idx.txt", lambda t: "# nothing\n", "has no labels"),
]


@pytest.mark.parametrize("which,edit,msg", BAD, ids=[b[2] for b in BAD])
def test_labels_file_errors_exit_2_one_line(capsys, flat, which, edit, msg):
    f = flat / which
    f.write_text(edit(f.read_text()))
    code, err, _ = _quant(capsys, flat, flat / "flat", "--labels", f)
    lines = [x for x in err.splitlines() if x.startswith("fixq: error")]
    assert code == 2 and len(lines) == 1 and msg in lines[0] and str(f) in lines[0], err
    if msg not in ("have no line in labels file", "has no labels"):
        assert " line " in lines[0]


def test_labels_file_missing(capsys, flat):
    code, err, _ = _quant(capsys, flat, flat / "flat", "--labels", flat / "nope.txt")
    assert code == 2 and "nope.txt does not exist" in err


# ---- torch.distributed -------------------------------------------------------------------

def _torchrun(args, n: int, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "fixq", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", ["quantize", "mixed"])
def test_two_gloo_processes_match_one(tmp_path, digits_dir, command, capsys):
    """2 ranks on CPU (gloo) write the plan of 1 process byte for byte, with the same top-1,
    top-5 and agreement. Uneven shards: 3 calibration batches, 5 evaluation batches."""
    common = ["--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "40", "--eval", str(digits_dir),
              "--eval-size", "72", "--batch-size", "16", "--workers", "0", "--quiet"]
    if command == "quantize":
        common += ["--data-mode", "3D", "--coeff-mode", "2D"]
    else:
        common += ["--target-drop", "3", "--trials", "3", "--probe-size", "40", "--sensitivity-size", "20"]
    outs = {n: tmp_path / f"n{n}" for n in (1, 2)}
    assert main([command, *common, "--out", str(outs[1])]) == 0  # one process, no torchrun
    r = _torchrun([command, *common, "--out", str(outs[2])], 2, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (outs[1] / "plan.json").read_bytes() == (outs[2] / "plan.json").read_bytes()
    a, b = (json.loads((outs[n] / "report.json").read_text()) for n in (1, 2))
    for k in ("quant", "float", "agreement_top1", "layers", "table3", "trials"):
        assert a.get(k) == b.get(k), k
    assert a["n_eval"] == b["n_eval"] == 72 and (a["processes"], b["processes"]) == (1, 2)
