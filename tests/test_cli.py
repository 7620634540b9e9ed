"""Every subcommand's happy path on tiny inputs, and the bad-input paths (exit code 2)."""
import json

import pytest
import yaml

from fixq.app.cli import main

from shared_data import resnet_weights


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_models_lists_zoo(capsys):
    code, out, _ = run(capsys, "models", "--json")
    names = {r["name"] for r in json.loads(out)}
    assert code == 0 and {"lenet-digits", "cifar10-resnet20", "efficientnet-lite0", "resnet50"} <= names


def test_quantize_happy_path(capsys, tmp_path, digits_dir):
    out = tmp_path / "q"
    code, stdout, _ = run(capsys, "quantize", "--model", "lenet-digits", "--calib", digits_dir, "--calib-size", 64,
                          "--eval", digits_dir, "--eval-size", 100, "--coeff-mode", "2D", "--data-mode", "3D",
                          "--exact", "--quiet", "--save-logits", tmp_path / "l.npy", "--out", out)
    assert code == 0 and "<8b,8b>" in stdout
    rep = json.loads((out / "report.json").read_text())
    for k in ("model", "config", "float", "quant", "agreement_top1", "n_eval", "layers"):
        assert k in rep
    assert rep["n_eval"] == 100 and rep["images"]["same_folder"]
    assert {"top1_error", "top5_error"} <= set(rep["quant"])
    layer = next(x for x in rep["layers"] if x["name"] == "conv1")
    assert layer["coeff_format"]["granularity"] == "2D" and "sqnr_db" in layer and "saturations" in layer
    imgs = json.loads((out / "images.json").read_text())
    assert not set(imgs["calib_files"]) & set(imgs["eval_files"])
    import numpy as np
    assert np.load(tmp_path / "l.npy").shape == (100, 10)
    assert (out / "plan.json").exists() and (out / "report.md").read_text().startswith("# fixq report")


def test_quantize_with_config_overrides(capsys, tmp_path, digits_dir):
    cfg = tmp_path / "o.yaml"
    cfg.write_text(yaml.safe_dump({"conv*": {"coeff_bits": 4, "coeff_mode": "2D"}, "fc2": {"acc_bits": 24}}))
    out = tmp_path / "q"
    code, _, _ = run(capsys, "quantize", "--model", "lenet-digits", "--calib", digits_dir, "--calib-size", 32,
                     "--eval", digits_dir, "--eval-size", 32, "--config", cfg, "--quiet", "--out", out)
    assert code == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["layers"]["conv1"]["weight"]["T"] == 4 and plan["layers"]["conv2"]["weight"]["granularity"] == "2D"
    assert plan["layers"]["fc1"]["weight"]["T"] == 8 and plan["layers"]["fc2"]["acc_bits"] == 24


def test_sweep_rows(capsys, tmp_path, digits_dir):
    out = tmp_path / "s"
    code, stdout, _ = run(capsys, "sweep", "--model", "lenet-digits", "--calib", digits_dir, "--calib-size", 32,
                          "--eval", digits_dir, "--eval-size", 64, "--coeff-bits", "8,4", "--coeff-mode", "4D,2D",
                          "--method", "maxabs,mse", "--quiet", "--out", out)
    rep = json.loads((out / "report.json").read_text())
    assert code == 0 and len(rep["rows"]) == 8
    assert {r["format"] for r in rep["rows"]} == {"<8b,8b>", "<4b,8b>"}
    assert all(r["float_top1_error"] == rep["float"]["top1_error"] for r in rep["rows"])


def test_demo(capsys, tmp_path):
    code, stdout, _ = run(capsys, "demo", "--out", tmp_path / "d", "--quiet")
    assert code == 0 and "<4b,8b>" in stdout and "2D" in stdout
    rep = json.loads((tmp_path / "d" / "report.json").read_text())
    assert len(rep["rows"]) == 6 and rep["float"]["top1_error"] < 5.0
    assert all(r["quant_top1_error"] < 10.0 for r in rep["rows"])


def test_analyze(capsys, tmp_path):
    code, out, _ = run(capsys, "analyze", "--model", "alexnet", "--json", "--out", tmp_path / "a.json")
    cost = json.loads(out)
    assert code == 0 and cost["total"]["macs"] == 714_188_480
    assert {"name", "macs", "rel_complexity_mmacs", "coeff_bits", "data_bits", "storage_bits"} <= set(cost["layers"][0])


def test_user_model_file(capsys, tmp_path, digits_dir):
    f = tmp_path / "mynet.py"
    f.write_text("import torch.nn as nn\n"
                 "def build():\n    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))\n")
    code, _, _ = run(capsys, "quantize", "--model", f"{f}:build", "--input-shape", "1,8,8", "--preprocess", "digits",
                     "--calib", digits_dir, "--calib-size", 16, "--eval", digits_dir, "--eval-size", 16,
                     "--quiet", "--out", tmp_path / "u")
    assert code == 0


@pytest.mark.parametrize("argv,msg", [
    (["--model", "no-such-net"], "unknown model"),
    (["--calib", "/nonexistent/dir"], "does not exist"),
    (["--coeff-mode", "5D"], "coefficient mode"),
    (["--coeff-bits", "40"], "bits must be"),
    (["--weights", "WRONG"], "does not match"),
    (["--model", "x.py:f"], "--input-shape"),
    (["--method", "minmax"], "unknown range method"),
])
def test_bad_input_exit_2(capsys, tmp_path, digits_dir, argv, msg):
    base = {"--model": "lenet-digits", "--calib": str(digits_dir), "--eval": str(digits_dir),
            "--out": str(tmp_path / "o"), "--calib-size": "8", "--eval-size": "8"}
    if "WRONG" in argv:
        import torch
        torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "w.pt")
        argv = ["--weights", str(tmp_path / "w.pt")]
    kv = dict(base)
    kv.update(dict(zip(argv[::2], argv[1::2])))
    code, _, err = run(capsys, "quantize", "--quiet", *[x for kvp in kv.items() for x in kvp])
    assert code == 2, err
    assert msg in err and err.startswith("fixq: error:") and "Traceback" not in err


def test_empty_data_folder_exit_2(capsys, tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    code, _, err = run(capsys, "quantize", "--model", "lenet-digits", "--calib", tmp_path / "empty",
                       "--eval", tmp_path / "empty", "--out", tmp_path / "o", "--quiet")
    assert code == 2 and "holds no images" in err


def test_mismatched_cifar_weights_name_first_key(capsys, tmp_path, digits_dir):
    w = resnet_weights(32)
    code, _, err = run(capsys, "quantize", "--model", "cifar10-resnet20", "--weights", w, "--calib", digits_dir,
                       "--eval", digits_dir, "--out", tmp_path / "o", "--quiet")
    assert code == 2 and "key 'layer1.3.conv1.weight'" in err


def test_plots_and_html_report(capsys, tmp_path, digits_dir):
    out = tmp_path / "q"
    code, _, _ = run(capsys, "quantize", "--model", "lenet-digits", "--calib", digits_dir, "--calib-size", 32,
                     "--eval", digits_dir, "--eval-size", 32, "--quiet", "--out", out)
    assert code == 0
    for png in ("sqnr.png", "fig3_ranges.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    code, stdout, _ = run(capsys, "report", out)
    page = (out / "report.html").read_text()
    assert code == 0 and page.count("data:image/png;base64,") == 2 and "conv1" in page
    code, _, err = run(capsys, "report", tmp_path / "nothing")
    assert code == 2 and "no report.json" in err


def test_sweep_writes_pareto_plot(capsys, tmp_path, digits_dir):
    out = tmp_path / "s"
    code, _, _ = run(capsys, "sweep", "--model", "lenet-digits", "--calib", digits_dir, "--calib-size", 16,
                     "--eval", digits_dir, "--eval-size", 16, "--coeff-bits", "8,4", "--quiet", "--out", out)
    assert code == 0 and (out / "pareto.png").stat().st_size > 5000
    assert run(capsys, "report", out)[0] == 0


def test_pareto_front_rule():
    from fixq.app.plots import pareto_front
    pts = [(40.0, 19.5), (20.0, 26.0), (40.0, 18.7), (20.0, 21.1), (120.0, 18.9)]
    assert pareto_front(pts) == [3, 2]


def test_accumulators_command(capsys, tmp_path, digits_dir):
    out = tmp_path / "q"
    assert run(capsys, "quantize", "--model", "lenet-digits", "--calib", digits_dir, "--calib-size", 32,
               "--eval", digits_dir, "--eval-size", 16, "--quiet", "--out", out)[0] == 0
    code, stdout, _ = run(capsys, "accumulators", "--plan", out / "plan.json", "--calib", digits_dir,
                          "--calib-size", 32, "--out", tmp_path / "acc.json")
    rows = json.loads((tmp_path / "acc.json").read_text())["rows"]
    assert code == 0 and "A bit-identical to A=32" in stdout
    assert [r["name"] for r in rows] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(8 <= r["A_identical"] <= 32 and r["A_exact"] >= 2 for r in rows)


def test_2d_on_linear_warns(capsys, tmp_path, digits_dir):
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["quantize", "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "16",
              "--eval", str(digits_dir), "--eval-size", "8", "--coeff-mode", "2D", "--quiet",
              "--out", str(tmp_path / "w")])
    msgs = [str(w.message) for w in caught if "fully connected" in str(w.message)]
    assert len(msgs) == 2 and "'fc1'" in msgs[0] and "'fc2'" in msgs[1]
    plan = json.loads((tmp_path / "w" / "plan.json").read_text())
    assert plan["layers"]["fc1"]["weight"]["granularity"] == "3D" and plan["layers"]["conv1"]["weight"]["granularity"] == "2D"
