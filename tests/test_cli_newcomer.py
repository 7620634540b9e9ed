"""Issue #19, the first hour of a new user: no silent nonsense, README exit codes, clean
messages. Each test checks the exit code and the message's key words."""
import errno
import json
import shutil

import pytest

from fixq.app.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from fixq.data.digits import export_digits
    return export_digits(tmp_path_factory.mktemp("digits"), "test")


@pytest.fixture(scope="module")
def lenet_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "q"
    assert main(["quantize", "--model", "lenet-digits", "--calib", str(digits), "--calib-size", "32", "--eval",
                 str(digits), "--eval-size", "32", "--quiet", "--out", str(out)]) == 0
    return out


def _q(digits, tmp_path, *extra):
    return ["quantize", "--calib", digits, "--calib-size", 16, "--eval", digits, "--eval-size", 16, "--quiet",
            "--out", tmp_path / "o", *extra]


# ---------------------------------------------------------------- silent nonsense
def test_zoo_model_without_weights_refuses(capsys, tmp_path, digits):
    code, _, err = run(capsys, *_q(digits, tmp_path, "--model", "cifar10-resnet20"))
    assert code == 2 and "no bundled weights" in err and "--weights" in err and "--random-weights" in err
    code, _, err = run(capsys, *_q(digits, tmp_path, "--model", "cifar10-resnet20", "--weights", "x.th",
                                   "--random-weights"))
    assert code == 2 and "exclude each other" in err


def test_export_c_without_weights_refuses(capsys, tmp_path, lenet_run):
    code, _, err = run(capsys, "export-c", "--plan", lenet_run / "plan.json", "--model", "cifar10-resnet32",
                       "--out", tmp_path / "c", "--no-build")
    assert code == 2 and "cifar10-resnet32 has no bundled weights" in err and "resnet32-" in err


def _cifar_like(root, classes, n=3):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_random_weights_on_purpose_runs_and_says_so(capsys, tmp_path):
    data = _cifar_like(tmp_path / "cifar", ["cat", "dog", "ship"])
    with pytest.warns(UserWarning, match="random weights.*accuracy is meaningless"):
        code, _, err = run(capsys, "quantize", "--model", "cifar10-resnet20", "--random-weights", "--calib", data,
                           "--calib-size", 4, "--eval", data, "--quiet", "--out", tmp_path / "o")
    assert code == 0, err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["config"]["weights"] == "random (--random-weights)" and rep["n_eval"] == 5


def test_class_folders_mapped_by_name(capsys, tmp_path, digits):
    """Two digit classes: labels come from the names, so the bundled LeNet stays accurate."""
    sub = tmp_path / "two"
    for c in ("3", "7"):
        shutil.copytree(digits / c, sub / c)
    code, _, err = run(capsys, "quantize", "--model", "lenet-digits", "--calib", digits, "--calib-size", 32,
                       "--eval", sub, "--quiet", "--out", tmp_path / "o")
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert code == 0 and rep["float"]["top1_error"] < 10.0, err


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_class_names_unknown_to_the_zoo_refused(capsys, tmp_path, digits):
    code, _, err = run(capsys, *_q(digits, tmp_path, "--model", "cifar10-resnet20", "--random-weights"))
    assert code == 2 and "not cifar10 classes" in err and "airplane" in err


def test_class_count_checked_for_user_models(capsys, tmp_path, digits):
    sub = tmp_path / "two"
    for c in ("3", "7"):
        shutil.copytree(digits / c, sub / c)
    f = tmp_path / "net.py"
    f.write_text("import torch.nn as nn\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    code, _, err = run(capsys, "quantize", "--model", f"{f}:build", "--input-shape", "1,8,8", "--preprocess",
                       "digits", "--calib", sub, "--eval", sub, "--calib-size", 8, "--quiet", "--out", tmp_path / "o")
    assert code == 2 and "2 class folders" in err and "10 outputs" in err


def _edited_plan(lenet_run, tmp_path, mutate):
    d = json.loads((lenet_run / "plan.json").read_text())
    mutate(d)
    p = tmp_path / "edited.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("mutate,words", [
    (lambda d: d["layers"]["conv1"]["weight"].__setitem__("T", 99), ["$.layers.conv1.weight.T", "2..32"]),
    (lambda d: d["tensors"].pop("conv2"), ["no entry for tensor 'conv2'"]),
    (lambda d: d["layers"].pop("fc1"), ["no entry for layer 'fc1'"]),
    (lambda d: d["layers"]["fc2"].__setitem__("acc_bits", "32"), ["$.layers.fc2.acc_bits", "'32'"]),
    (lambda d: d.__setitem__("version", 7), ["has version 7", "reads plan version 1"]),
])
def test_edited_plan_refused_by_export_c(capsys, tmp_path, lenet_run, mutate, words):
    p = _edited_plan(lenet_run, tmp_path, mutate)
    code, _, err = run(capsys, "export-c", "--plan", p, "--out", tmp_path / "c", "--no-build")
    assert code == 2 and err.count("\n") == 1 and "internal error" not in err
    assert all(w in err for w in words), err
    assert not (tmp_path / "c" / "model.c").exists()


def test_config_file_validated(capsys, tmp_path, digits):
    for text, words in (('{"conv1": {"coeff_bits": 99}}', ["$.conv1.coeff_bits", "99"]),
                        ('{"conv1": {"coef_bits": 4}}', ["'coef_bits' was unexpected"]),
                        ('{"conv1": ', ["not valid JSON"])):
        cfg = tmp_path / "c.json"
        cfg.write_text(text)
        code, _, err = run(capsys, *_q(digits, tmp_path, "--model", "lenet-digits", "--config", cfg))
        assert code == 2 and all(w in err for w in words), err


# ---------------------------------------------------------------- errors and exit codes
def test_out_under_a_file_exit_2(capsys, tmp_path, digits):
    (tmp_path / "f").write_text("")
    code, _, err = run(capsys, "quantize", "--model", "lenet-digits", "--calib", digits, "--eval", digits,
                       "--quiet", "--out", tmp_path / "f" / "run")
    assert code == 2 and "--out" in err and "a file is in the way" in err and err.count("\n") == 1


def test_out_on_read_only_file_system_exit_2(capsys, tmp_path, digits, monkeypatch):
    import pathlib

    def ro(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))
    monkeypatch.setattr(pathlib.Path, "mkdir", ro)
    code, _, err = run(capsys, *_q(digits, tmp_path, "--model", "lenet-digits"))
    assert code == 2 and "read-only file system" in err and "internal error" not in err


def test_data_bits_abc_says_what_is_accepted(capsys, tmp_path, digits):
    code, _, err = run(capsys, *_q(digits, tmp_path, "--model", "lenet-digits", "--data-bits", "abc"))
    assert code == 2 and "data bits must be 2..32" in err and "flp" in err and "invalid literal" not in err


def test_bias_bits_out_of_range_is_exit_2(capsys, tmp_path, digits):
    code, _, err = run(capsys, *_q(digits, tmp_path, "--model", "lenet-digits", "--bias-bits", "40"))
    assert code == 2 and "bias bits" in err


def test_corrupt_image_named_and_skippable(capsys, tmp_path, digits):
    data = tmp_path / "d"
    shutil.copytree(digits, data)
    bad = data / "4" / "zz_broken.png"
    bad.write_bytes(b"not an image")
    code, _, err = run(capsys, "quantize", "--model", "lenet-digits", "--calib", data, "--calib-size", 8,
                       "--eval", data, "--quiet", "--out", tmp_path / "o")
    assert code == 2 and "zz_broken.png" in err and "folders must hold" not in err and "--skip-bad-images" in err
    code, _, err = run(capsys, "quantize", "--model", "lenet-digits", "--calib", data, "--calib-size", 8,
                       "--eval", data, "--quiet", "--skip-bad-images", "--out", tmp_path / "o")
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert code == 0, err
    assert rep["images"]["skipped_images"]["n"] == 1 and "4/zz_broken.png" in json.dumps(rep["images"])
    assert "Skipped 1 unreadable" in (tmp_path / "o" / "report.md").read_text()


def test_unknown_model_hint_said_once(capsys, tmp_path, digits):
    code, _, err = run(capsys, *_q(digits, tmp_path, "--model", "no-such-net"))
    assert code == 2 and err.count("fixq models") == 1


def test_flat_folder_says_no_class_subfolders(capsys, tmp_path, digits):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in list((digits / "1").iterdir())[:3]:
        shutil.copy(f, flat / f.name)
    code, _, err = run(capsys, "quantize", "--model", "lenet-digits", "--calib", flat, "--eval", flat,
                       "--quiet", "--out", tmp_path / "o")
    assert code == 2 and "no class subfolders" in err and "3 images" in err and "holds no images" not in err


def test_bug_is_exit_1_with_debug_hint(capsys, monkeypatch):
    from fixq.app import commands

    def boom(args):
        raise ValueError("an internal slip")
    monkeypatch.setattr(commands, "dispatch", boom)
    code, _, err = run(capsys, "models")
    assert code == 1 and "this is a bug in fixq" in err and "FIXQ_DEBUG=1" in err and "Traceback" not in err



def test_closed_stdout_pipe_is_not_a_bug():
    """`fixq models | head -1`: the reader closes the pipe early; fixq stops quietly (141, as a
    shell reports SIGPIPE), without the 'internal error' line."""
    import os
    import subprocess
    import sys
    for buffered in ("1", None):  # PYTHONUNBUFFERED=1, and Python's default (block-buffered pipe)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        if buffered:
            env["PYTHONUNBUFFERED"] = buffered
        for args in (["models"], ["models", "--json"], ["--help"]):
            p = subprocess.Popen([sys.executable, "-m", "fixq", *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env)
            p.stdout.close()  # closed before fixq writes: its first write (or flush) meets a broken pipe
            err = p.stderr.read().decode()
            code = p.wait()
            # argparse's --help ignores a closed stdout where it writes unbuffered (exit 0)
            assert code == 141 or (args == ["--help"] and code == 0), (buffered, args, code, err)
            assert "internal error" not in err and "Error" not in err, (buffered, args, code, err)

def test_library_warnings_one_clean_line(tmp_path, digits):
    """As a terminal user sees them: a real process, no pytest warning capture in between."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import fixq
    env = {**os.environ, "PYTHONPATH": str(Path(fixq.__file__).parents[1])}
    argv = [str(a) for a in _q(digits, tmp_path, "--model", "lenet-digits", "--coeff-mode", "2D")]
    p = subprocess.run([sys.executable, "-m", "fixq", *argv], capture_output=True, text=True, env=env, timeout=600)
    lines = [x for x in p.stderr.splitlines() if "fully connected" in x]
    assert p.returncode == 0 and len(lines) == 2, p.stderr
    assert all(x.startswith("fixq: warning: layer 'fc") for x in lines)
    assert ".py:" not in p.stderr and "warnings.warn" not in p.stderr


# ---------------------------------------------------------------- help, version, models
def test_version(capsys):
    from fixq import __version__
    assert main(["--version"]) == 0 and f"fixq {__version__}" in capsys.readouterr().out


def test_every_option_has_help_with_its_default():
    import argparse
    from fixq.app.parser import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        text = p.format_help()
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help, f"fixq {name} {a.option_strings or a.dest} has no help"
            if a.option_strings and a.default not in (None, False) and not isinstance(a.default, bool):
                assert "default" in p._get_formatter()._get_help_string(a), (name, a.option_strings)
        if name == "quantize":
            for opt in ("--seed", "--batch-size", "--bias-bits", "--acc-bits", "--rounding"):
                assert opt in text
            assert "without it" in text and "(default: 0)" in text


def test_models_names_each_weights_file(capsys):
    code, out, _ = run(capsys, "models", "--json")
    w = {r["name"]: r["weights"] for r in json.loads(out)}
    assert code == 0
    for d in (20, 32, 44, 56, 110):
        assert f"resnet{d}-" in w[f"cifar10-resnet{d}"]


# ---------------------------------------------------------------- reports
def test_sweep_rows_name_plan_files_and_reports_explain(capsys, tmp_path, digits):
    out = tmp_path / "s"
    code, stdout, err = run(capsys, "sweep", "--model", "lenet-digits", "--calib", digits, "--calib-size", 16,
                            "--eval", digits, "--eval-size", 16, "--coeff-bits", "8,4", "--quiet", "--out", out)
    rep = json.loads((out / "report.json").read_text())
    assert code == 0 and [r["plan"] for r in rep["rows"]] == ["plan-00.json", "plan-01.json"]
    assert all((out / r["plan"]).is_file() for r in rep["rows"])
    md = (out / "report.md").read_text()
    assert "| plan-01.json" in md and "<8b,8b> units" in md and "paper Table 1" in md
    assert "*Figure: top-1 error vs relative complexity" in md and "paper Table 1" in rep["complexity_note"]
    assert run(capsys, "report", out)[0] == 0
    page = (out / "report.html").read_text()
    assert "plan-01.json" in page and "Preprocessing:" in page and "paper Table 1" in page
    assert "Figure: top-1 error vs relative complexity" in page


def test_html_report_keeps_layer_formats(capsys, lenet_run):
    assert run(capsys, "report", lenet_run)[0] == 0
    page = (lenet_run / "report.html").read_text()
    md = (lenet_run / "report.md").read_text()
    assert "Preprocessing:" in page and "8b 3D F" in page and "A32 F" in page
    assert "Figure (paper Fig. 3)" in page and "*Figure: signal-to-quantization-noise" in md


def test_analyze_without_plan_costs_float_and_each_format(capsys):
    code, out, _ = run(capsys, "analyze", "--model", "cifar10-resnet20")
    assert code == 0 and "Savings" not in out and "-800" not in out
    assert "The float network (<flp,flp>) costs" in out and "<4b,8b>" in out


def test_progress_lines_in_a_log_carry_the_config_label(capsys):
    from fixq.util.progress import progress, progress_label
    with progress_label("[3/12] <4b,8b> 2D/4D maxabs"):
        assert list(progress(range(3), "fixed-point eval")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert err.startswith("[3/12] <4b,8b> 2D/4D maxabs fixed-point eval: 3/3 done") and "\r" not in err


def test_quantize_progress_in_a_log_is_labelled_lines(capsys, tmp_path, digits):
    argv = [a for a in _q(digits, tmp_path, "--model", "lenet-digits", "--coeff-bits", "4") if a != "--quiet"]
    code, _, err = run(capsys, *argv)
    assert code == 0 and "\r" not in err
    assert "<4b,8b> 3D/4D maxabs/mse fixed-point eval: 16/16 images in" in err and "float eval: 16/16 images in" in err
    assert "img/s)" in err  # images are streamed: lines count images, with the rate


def test_corrupt_json_files_from_earlier_runs_exit_2(capsys, tmp_path, digits):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "export.json").write_text("{broken")
    code, _, err = run(capsys, "run-c", tmp_path / "c", "--data", digits, "--out", tmp_path / "l.npy")
    assert code == 2 and "export.json is not valid JSON" in err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text("[")
    code, _, err = run(capsys, "report", tmp_path / "r")
    assert code == 2 and "report.json is not valid JSON" in err


def test_analyze_with_a_plan_states_savings_and_the_unit_once(capsys, lenet_run):
    import re
    code, out, _ = run(capsys, "analyze", "--model", "lenet-digits", "--plan", lenet_run / "plan.json")
    assert code == 0 and re.search(r"Savings vs <8b,8b>: -?\d+\.\d%; vs <flp,flp>: \d+\.\d%", out)
    assert out.count("paper Table 1") == 1
    assert (lenet_run / "report.md").read_text().count("paper Table 1") == 1
