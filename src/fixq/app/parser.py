"""The ``fixq`` command line: the argument parser of every sub-command and the options a
user typed explicitly (:func:`explicit_options`, for ``--paper``'s departures).

>>> build_parser().parse_args(["models"]).command
'models'
"""
from __future__ import annotations

import argparse

from fixq import __version__
from fixq.errors import FixqError

__all__ = ["build_parser", "explicit_options", "UsageError"]


class UsageError(FixqError):
    """Bad command-line input; printed as one line, exit code 2."""


def _csv(v: str) -> list[str]:
    return [x.strip() for x in v.split(",") if x.strip()]


def _floats(v: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in _csv(v))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {v!r}") from None


def _shape(v: str) -> tuple[int, ...]:
    try:
        s = tuple(int(x) for x in v.lower().replace("x", ",").split(",") if x)
    except ValueError:
        s = ()
    if len(s) != 3 or min(s) <= 0:
        raise argparse.ArgumentTypeError(f"--input-shape wants C,H,W (e.g. 3,32,32), got {v!r}")
    return s


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default (when it has one worth saying)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS \
                and action.option_strings \
                and "default" not in h:
            h += " (default: %(default)s)"
        return h


WEIGHTS_HELP = ("state dict file (plain or {'state_dict': ...}, keys may be prefixed 'module.'), or 'torchvision' "
                "to download; without it: the model's bundled weights (lenet-digits, efficientnet-lite0), and "
                "an error for a zoo model whose weights are not bundled (see `fixq models`)")


RANDOM_HELP = "run a zoo model on random weights on purpose (tests, timing): its accuracy is meaningless"


def _add_model(p: argparse.ArgumentParser, data: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="zoo name (see `fixq models`), file.py:function, "
                   "package.module:function or file.onnx")
    g.add_argument("--weights", help=WEIGHTS_HELP)
    g.add_argument("--random-weights", action="store_true", help=RANDOM_HELP)
    g.add_argument("--input-shape", type=_shape, help="C,H,W; required for a model outside the zoo")
    if not data:
        return
    d = p.add_argument_group("data (ImageFolder layout: DIR/<class>/<image>)")
    d.add_argument("--calib", required=True, help="folder of calibration images")
    d.add_argument("--calib-size", type=int, default=512, help="calibration images drawn with --seed")
    d.add_argument("--eval", required=True, dest="eval_dir", help="folder of evaluation images")
    d.add_argument("--labels", help="labels file for a flat --eval folder (ImageNet val): 'filename class_index' "
                   "lines, or one class_index per line in sorted filename order")
    d.add_argument("--eval-size", type=int, help="evaluation images (default: all not used for calibration)")
    d.add_argument("--seed", type=int, default=0, help="seed of the calibration/evaluation image draw")
    d.add_argument("--preprocess", help="preset: imagenet, cifar10, digits, mnist, efficientnet-lite, googlenet "
                   "(default: the zoo model's own, imagenet otherwise)")
    d.add_argument("--resize", type=int, help="resize the short side to this many pixels (default: the preset's)")
    d.add_argument("--crop", type=int, help="centre crop to this size (default: the preset's)")
    d.add_argument("--mean", type=_floats, help="per-channel mean, comma-separated (default: the preset's)")
    d.add_argument("--std", type=_floats, help="per-channel std, comma-separated (default: the preset's)")
    d.add_argument("--grayscale", action="store_true", default=None,
                   help="convert images to one channel (default: the preset's)")
    d.add_argument("--skip-bad-images", action="store_true",
                   help="skip images that cannot be decoded and count them in the report (default: stop on one)")
    r = p.add_argument_group("run")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--batch-size", type=int, default=128, help="images per simulation batch")
    r.add_argument("--workers", type=int, default=None,
                   help="image decoding processes per rank (0: in the main process; default: the CPUs available)")


PAPER_HELP = ("the paper's choices in one switch: maxabs ranges (eq. 6) for coefficients and data, signed Q(T,F) "
              "data, half-up rounding, 32-bit accumulators, 8-bit biases, fully connected layers 4D, the paper's "
              "first/last-layer exclusions, nearest coefficient rounding (the searches' learned rounding off) (and, "
              "for kmeans, Table 4 with every other layer in floating point); "
              "options given explicitly win, wherever they appear, and the report names them as departures")


FC_HELP = "fully connected layers: auto (follow --coeff-mode; 2D means 3D) or 4D (one format per layer, paper §3)"


def _add_quant(p: argparse.ArgumentParser, multi: bool = False) -> None:
    g = p.add_argument_group("quantization" + (" (comma-separated lists form the grid)" if multi else ""))
    t = str if multi else None
    g.add_argument("--coeff-bits", type=t, default="8", help="coefficient bits 2..32, or flp")
    g.add_argument("--data-bits", type=t, default="8", help="data (activation) bits 2..32, or flp")
    g.add_argument("--coeff-mode", type=t, default="3D", help="4D (per layer), 3D (per kernel), 2D (per filter)")
    g.add_argument("--data-mode", type=t, default="4D", help="4D (per tensor) or 3D (per channel)")
    g.add_argument("--method", type=t, default=None,
                   help="range method of coefficients and data: maxabs (paper eq. 6), percentile:P, mse or affine "
                        "(default: maxabs coefficients, mse data)")
    g.add_argument("--data-method", default=None, help="range method of the data only (overrides --method)")
    g.add_argument("--data-sign", default="auto", choices=["auto", "signed"],
                   help="auto: unsigned U(T,F) data where the graph proves x >= 0 (after ReLU/ReLU6, "
                        "pools of such tensors...); signed: Q(T,F) everywhere, as in the paper")
    g.add_argument("--fc-mode", default="auto", choices=["auto", "4D"], help=FC_HELP)
    g.add_argument("--bias-bits", type=int, default=8, help="bias word length 2..32")
    g.add_argument("--acc-bits", type=int, default=32, help="accumulator word length 2..32")
    g.add_argument("--acc-overflow", default="saturate", choices=["saturate", "wrap"],
                   help="what an accumulator does past its range")
    g.add_argument("--rounding", default="half_up", choices=["half_up", "nearest_even", "floor"],
                   help="one rounding mode for the whole model")
    g.add_argument("--config", help="YAML/JSON of per-layer overrides {layer-glob: {coeff_bits: 4, ...}}")
    g.add_argument("--exact", action="store_true", help="float64 simulation, bit-exact with the integer engine")
    g.add_argument("--paper", action="store_true", help=PAPER_HELP)


def _add_codes(p: argparse.ArgumentParser, search: bool = False) -> None:
    """Learned rounding and bias correction of the coefficient codes (fixq.algorithms.learned);
    ``search``: also the inputs of the code bank a search learns before its trials."""
    g = p.add_argument_group("coefficient codes (stored in the plan; every backend uses them)")
    what = ("choose each coefficient's rounding (down or up inside its Q(T,F) partition grid) so that "
            "each layer's output on the calibration images matches the float layer's (AdaRound-style, "
            "seeded by --seed; a layer keeps nearest rounding when that is not worse)")
    if search:  # on by default: measured better on every model we have (benchmarks/RESULTS.md, DESIGN §9a)
        g.add_argument("--learned-rounding", action=argparse.BooleanOptionalAction, default=None,
                       help=what + " (default: on, except with --residual-data-bits, whose <4b,4b> residual "
                                   "branch the learning does not model); --no-learned-rounding: nearest rounding, "
                                   "as the paper (and --paper)")
    else:
        g.add_argument("--learned-rounding", action="store_true", help=what)
    g.add_argument("--bias-correction", action="store_true",
                   help="fold each output channel's mean error on the calibration images into its bias "
                        "(quantized to the bias format); implied by --learned-rounding unless --no-bias-correction")
    g.add_argument("--no-bias-correction", action="store_true", help="--learned-rounding without bias correction")
    g.add_argument("--rounding-iters", type=int, default=600 if search else 1000,
                   help="optimiser steps per layer of --learned-rounding" + (
                       " (a search learns its layers before its trials: mixed once per layer, kmeans once per "
                       "candidate (layer, K) it measures)" if search else ""))
    g.add_argument("--rounding-batch", type=int, default=1024,
                   help="sampled output pixels (of 32768 over all calibration images) per step of --learned-rounding")
    if search:
        g.add_argument("--bank-inputs", default=None, choices=["sequential", "base"],
                       help="with learned rounding: the low-bit codes are learned before the trials, each layer "
                            "fed by the earlier low layers with their codes decided (sequential, the default) "
                            "or by the all-base-bits plan (base)")


def _add_output(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--out", required=out_required, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the final table")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def _add_plan_model(p: argparse.ArgumentParser, plan_help: str) -> None:
    """A plan and the model it belongs to (commands that act on a saved plan)."""
    p.add_argument("--plan", required=True, help=plan_help)
    p.add_argument("--model", help="zoo name, file.py:function or file.onnx (default: the model named in the plan)")
    p.add_argument("--weights", help=WEIGHTS_HELP)
    p.add_argument("--random-weights", action="store_true", help=RANDOM_HELP)
    p.add_argument("--input-shape", type=_shape, help="C,H,W; required for a model outside the zoo")
    p.add_argument("--preprocess", help="preprocessing preset (default: the zoo model's own)")


def _add_search_quant(g) -> None:
    """Formats shared by the plan searches (coefficients are 2D at the searched bits)."""
    g.add_argument("--data-bits", default="8", help="data (activation) bits 2..32, or flp")
    g.add_argument("--data-mode", default="4D", help="4D (per tensor) or 3D (per channel)")
    g.add_argument("--method", default=None, help="range method of coefficients (and data unless --data-method); "
                   "default: maxabs coefficients, mse data")
    g.add_argument("--data-method", help="range method of the data (default: --method, else mse)")
    g.add_argument("--data-sign", default="auto", choices=["auto", "signed"],
                   help="auto: unsigned data where the graph proves x >= 0; signed: as in the paper")
    g.add_argument("--fc-mode", default="auto", choices=["auto", "4D"], help=FC_HELP)
    g.add_argument("--paper", action="store_true", help=PAPER_HELP)
    g.add_argument("--bias-bits", type=int, default=8, help="bias word length 2..32")
    g.add_argument("--acc-bits", type=int, default=32, help="accumulator word length 2..32")
    g.add_argument("--rounding", default="half_up", choices=["half_up", "nearest_even", "floor"],
                   help="one rounding mode for the whole model")
    g.add_argument("--margin-z", type=float, default=1.0,
                   help="a trial meets the target when its top-1 drop + Z standard errors of its paired difference "
                        "to the all-base plan is within the target (1: the one-standard-error rule)")


def _version() -> str:
    return f"fixq {__version__}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fixq", description="Fixed-point (dynamic, hybrid 4D/3D/2D) quantization "
                                 "of trained CNNs for DSPs, FPGAs and MCUs, with exact reports.",
                                 epilog="Exit codes: 0 success, 2 bad usage or input (one line with a hint), "
                                 "1 a bug in fixq (FIXQ_DEBUG=1 prints the traceback).")
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=_Help, **kw)


    p = add("quantize", help="calibrate, plan, simulate and evaluate one configuration")
    _add_model(p)
    _add_quant(p)
    p.add_argument("--save-logits", help="write the fixed-point outputs on the eval images (.npy, eval order)")
    _add_codes(p)
    _add_output(p)

    p = add("sweep", help="evaluate a grid of configurations sharing one float evaluation")
    _add_model(p)
    _add_quant(p, multi=True)
    _add_codes(p)
    _add_output(p)

    p = add("mixed", help="energy-based automatic 8/4-bit mixed precision per 2D filter (tuning loop)")
    _add_model(p)
    g = p.add_argument_group("mixed precision")
    g.add_argument("--probe-size", type=int, default=64, help="calibration images for the filter energies")
    t = g.add_mutually_exclusive_group()
    t.add_argument("--target-drop", type=float, default=1.0, help="allowed top-1 points over float")
    t.add_argument("--target-error", type=float, help="absolute top-1 error target in percent")
    g.add_argument("--base-bits", type=int, default=8, help="coefficient bits of the high-energy filters")
    g.add_argument("--low-bits", type=int, default=4, help="coefficient bits of the low-energy filters")
    g.add_argument("--exclude", default="first,last,depthwise",
                   help="layers kept at base bits: names, first, last, depthwise (every depthwise conv) or none")
    g.add_argument("--trials", type=int, default=12, help="evaluations per strategy (f = 0 included)")
    g.add_argument("--tune-size", type=int, help="evaluation images used for tuning (default half); the rest report")
    g.add_argument("--sensitivity-size", type=int, default=256, help="tuning images for per-layer sensitivity")
    g.add_argument("--strategy", default="both", choices=["both", "global", "per-layer"],
                   help="one threshold f for all layers, one scaled per layer by sensitivity, or both")
    g.add_argument("--f0", type=float, default=0.05, help="first threshold f tried (a share of energy or noise: "
                                                          "--order)")
    g.add_argument("--delta", type=float, default=0.05, help="first threshold step")
    g.add_argument("--order", default="noise", choices=["noise", "energy"],
                   help="which 2D filters of a layer go low first: those whose low-bit codes add the least noise "
                        "energy (default), or those of lowest energy (the paper; --paper); f is the share of that "
                        "quantity")
    _add_search_quant(g)
    _add_codes(p, search=True)
    _add_output(p)

    p = add("kmeans", help="K-means clustered kernels: 8-bit basis kernels plus 4-bit residuals")
    _add_model(p)
    g = p.add_argument_group("K-means")
    g.add_argument("--layers", default="auto", help="auto (every conv/linear of groups 1) or name,name,...")
    g.add_argument("--k", default="auto", help="auto (under the accuracy budget), N, or layer=K,...")
    g.add_argument("--base-bits", type=int, default=8, help="basis kernel bits")
    g.add_argument("--residual-bits", type=int, default=4, help="residual kernel bits")
    g.add_argument("--residual-data-bits", type=int, default=None,
                   help="give the residual kernels their own data format of this many bits (4: the paper's "
                        "<4b,4b> residuals, eq. 9), calibrated like any data format; default: they read the "
                        "layer's data, <4b,8b>")
    g.add_argument("--exclude", default="first,last",
                   help="layers never clustered with --layers auto (first, last, names, none; --paper: first, as "
                        "the paper): the last layer's error goes straight into the logits, as in fixq mixed")
    t = g.add_mutually_exclusive_group()
    t.add_argument("--target-drop", type=float, default=2.0, help="allowed top-1 points over float")
    t.add_argument("--target-error", type=float, help="absolute top-1 error target in percent")
    g.add_argument("--tune-size", type=int, help="evaluation images used for the K search (default half)")
    g.add_argument("--sensitivity-size", type=int, default=256, help="tuning images per candidate K measurement")
    g.add_argument("--restarts", type=int, default=4, help="k-means++ initialisations per clustering")
    g.add_argument("--table4-others", default="quant", choices=["quant", "flp"],
                   help="Table 4's other layers: quant (the 2D-HQ base plan) or flp (floating point, as the "
                        "paper's Table 4)")
    _add_search_quant(g)
    _add_codes(p, search=True)
    _add_output(p)

    p = add("models", help="list zoo models, their input size, preprocessing and weights")
    p.add_argument("--json", action="store_true", help="print the list as JSON")

    p = add("demo", help="the whole flow on the bundled LeNet and scikit-learn digits (no network)")
    p.add_argument("--out", default="fixq-demo", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the final table")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")

    p = add("export-c", help="write C99 code (integer tables + calls) and the runtime for a plan")
    _add_plan_model(p, "plan.json of a quantize run")
    p.add_argument("--out", required=True, help="folder for the C sources")
    p.add_argument("--no-build", action="store_true", help="do not run make")
    p.add_argument("--name", default="model", help="C symbol prefix: fixq_<name>_run, FIXQ_<NAME>_* (default model)")
    p.add_argument("--no-pack", action="store_true",
                   help="one weight code per byte or more: no 4-bit or 4/8-bit per-filter packing (no unpacking)")

    p = add("export-onnx", help="write a QDQ ONNX model for a plan and compare it with the simulation")
    _add_plan_model(p, "plan.json of a quantize/mixed/kmeans run")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--data", help="ImageFolder to compare on (default: the plan run's evaluation folder)")
    p.add_argument("--images", help="images.json of the run: its eval_files, in order (default: next to the plan)")
    p.add_argument("--n", type=int, default=1000, help="compare on the first N images")

    p = add("run-c", help="run an exported C program on images, outputs like quantize --save-logits")
    p.add_argument("cdir", help="folder written by export-c")
    p.add_argument("--data", required=True, help="ImageFolder of images (sorted order)")
    p.add_argument("--n", type=int, help="first N images (default: all)")
    p.add_argument("--images", help="images.json of a quantize run: use its eval_files, in that order")
    p.add_argument("--out", required=True, help="logits .npy")
    p.add_argument("--target", default="host", choices=["host", "cortex-m4", "arm-linux"],
                   help="where the C runs: this machine, qemu-system-arm mps2-an386 (Cortex-M4), qemu-arm")

    p = add("accumulators", help="per layer: accumulator bits for the exact sum and for bit-identical output")
    _add_plan_model(p, "plan.json of a quantize run")
    p.add_argument("--calib", required=True, help="folder of calibration images (ImageFolder layout)")
    p.add_argument("--calib-size", type=int, default=256, help="calibration images drawn with --seed")
    p.add_argument("--seed", type=int, default=0, help="seed of the image draw")
    p.add_argument("--out", help="write the table as JSON")

    p = add("report", help="render a run folder (quantize/sweep --out) as one HTML page")
    p.add_argument("dir", help="folder holding report.json")
    p.add_argument("--out", help="HTML file (default: DIR/report.html)")

    p = add("analyze", help="MACs, relative complexity and storage per layer")
    _add_model(p, data=False)
    p.add_argument("--plan", help="plan.json whose formats to cost "
                   "(default: the float network and each uniform format)")
    p.add_argument("--preprocess", help="preset for the input size of a user model")
    p.add_argument("--out", help="write the table as JSON")
    p.add_argument("--json", action="store_true", help="print the table as JSON on stdout")
    return ap


_UNSET = object()


def explicit_options(argv: list[str]) -> set[str]:
    """The argparse dests the user gave on the command line (abbreviations included):
    ``argv`` parsed again with every optional default replaced by a marker.

    >>> sorted(explicit_options(["models", "--json"]))
    ['command', 'json']
    """
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                for a in sp._actions:
                    if a.option_strings and not a.required and a.dest != "help":
                        a.default = _UNSET
    ns = parser.parse_args(argv)
    return {k for k, v in vars(ns).items() if v is not _UNSET}
