"""The searches' coefficient-code options on the command line (issue #18): what ``fixq mixed``
and ``fixq kmeans`` hand their search (learned rounding by default, ``--no-learned-rounding``,
``--paper``, ``--bank-inputs``), and what they refuse before any work."""
import importlib

import pytest

from fixq.algorithms.learned import RoundingOptions
from fixq.app.cli import main
from fixq.planning.plan import PlanError


def _codes_the_search_gets(monkeypatch, digits_dir, tmp_path, command, module, search, flags):
    """The RoundingOptions ``fixq <command> <flags>`` passes to its search (``fixq.app.<module>.<search>``,
    replaced by a stand-in that records them and stops the command)."""
    seen = []

    def fake(session, config, opts, codes):
        seen.append(codes)
        raise PlanError("search reached")
    monkeypatch.setattr(importlib.import_module(f"fixq.app.{module}"), search, fake)
    argv = [command, "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "32", "--eval",
            str(digits_dir), "--eval-size", "64", "--out", str(tmp_path / "o"), "--quiet", *flags]
    assert main(argv) != 0
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("command,module,search", [("mixed", "commands_mixed", "search_mixed"),
                                                   ("kmeans", "commands_kmeans", "search_kmeans")])
@pytest.mark.parametrize("flag,want", [([], "sequential"), (["--bank-inputs", "base"], "base"),
                                       (["--bank-inputs", "sequential"], "sequential")])
def test_bank_inputs_option_reaches_the_searches(command, module, search, flag, want, digits_dir, tmp_path,
                                                 monkeypatch):
    """The search itself receives the RoundingOptions with the bank inputs asked on the command line."""
    codes = _codes_the_search_gets(monkeypatch, digits_dir, tmp_path, command, module, search,
                                   ["--learned-rounding", *flag])
    assert codes.learned and codes.bank_inputs == want


@pytest.mark.parametrize("off", [["--no-learned-rounding"], ["--paper"]])
@pytest.mark.parametrize("extra", [[], ["--bias-correction"]])
@pytest.mark.parametrize("command", ["mixed", "kmeans"])
def test_bank_inputs_without_learned_rounding_is_refused(command, extra, off, capsys, tmp_path):
    """--bank-inputs only means something for the learned code bank: with learned rounding off
    (or with bias correction only) it is an error naming the fix, before any output is written."""
    out = tmp_path / "o"
    argv = [command, "--model", "lenet-digits", "--calib", "c", "--eval", "e", "--out", str(out),
            "--bank-inputs", "base", *off, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--bank-inputs base" in err and "learned rounding is off" in err and "hint" not in err
    assert not out.exists()


_FLAGS = [([], True), (["--learned-rounding"], True), (["--no-learned-rounding"], False), (["--paper"], False),
          (["--paper", "--learned-rounding"], True)]


@pytest.mark.parametrize("command,module,search,flag,learned",
                         [("mixed", "commands_mixed", "search_mixed", *f) for f in _FLAGS]
                         + [("kmeans", "commands_kmeans", "search_kmeans", *f)
                            for f in _FLAGS + [(["--residual-data-bits", "4"], False)]])
def test_searches_learn_rounding_by_default(command, module, search, flag, learned, digits_dir, tmp_path,
                                           monkeypatch):
    """fixq mixed and fixq kmeans learn their low-bit codes unless told not to (--no-learned-rounding,
    --paper) or unable to (<4b,4b> residuals: off, not refused); the search receives exactly that."""
    codes = _codes_the_search_gets(monkeypatch, digits_dir, tmp_path, command, module, search, flag)
    if learned:
        assert codes.learned and codes.bias_correction and codes.iters == 600
        assert codes.bank_inputs == "sequential"
    else:
        assert codes is None  # nearest rounding, no bias correction: the plan is the paper's


def test_bank_inputs_option_reaches_the_searches_only():
    from fixq.app.common import rounding_options
    from fixq.app.parser import build_parser
    p = build_parser()
    base = ["--model", "lenet-digits", "--calib", "c", "--eval", "e", "--out", "o", "--learned-rounding"]
    assert rounding_options(p.parse_args(["mixed", *base])).bank_inputs == "sequential"
    assert rounding_options(p.parse_args(["kmeans", *base, "--bank-inputs", "base"])).bank_inputs == "base"
    with pytest.raises(SystemExit):  # quantize learns every layer in sequence: it has no bank
        p.parse_args(["quantize", *base, "--bank-inputs", "base"])
    with pytest.raises(PlanError, match="bank_inputs"):
        RoundingOptions(bank_inputs="float")


@pytest.mark.parametrize("flags,want", [([], "noise"), (["--order", "noise"], "noise"), (["--order", "energy"], "energy"),
                                        (["--paper"], "energy"), (["--paper", "--order", "noise"], "noise")])
def test_mixed_order_option_reaches_the_search(flags, want, digits_dir, tmp_path, monkeypatch):
    """fixq mixed hands --order to its search (noise by default; the paper's energy order under --paper
    unless --order is given)."""
    seen = []

    def fake(session, config, opts, codes):
        seen.append(opts.order)
        raise PlanError("search reached")
    monkeypatch.setattr(importlib.import_module("fixq.app.commands_mixed"), "search_mixed", fake)
    argv = ["mixed", "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "32", "--eval",
            str(digits_dir), "--eval-size", "64", "--out", str(tmp_path / "o"), "--quiet", *flags]
    assert main(argv) != 0 and seen == [want]
