"""What the ``fixq`` sub-commands share: the output folder check, the config and session
built from the parsed options, the report header and common report fields, and the
``--quiet``/``--json`` aware printing. Every ``commands*`` module imports these from here.

>>> make_config("8", "8", "3D", "4D").default.coeff_bits
8
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fixq.algorithms.learned import RoundingOptions
from fixq.algorithms.pipeline import Session, open_session
from fixq.analysis.complexity import analyze
from fixq.analysis.report import COMPLEXITY_NOTE, markdown_table
from fixq.data.onnx_in import onnx_input_shape
from fixq.data.zoo import PRESETS, ZOO, Preprocess, require_weights, with_overrides
from fixq.errors import os_error_reason
from fixq.planning.plan import LayerConfig, PlanError, QuantConfig
from fixq.planning.plan_schema import read_config
from fixq.util import distributed as dist
from .paper import paper_sentence
from .parser import UsageError

__all__ = ["prepare_out", "weights_label", "say", "say_paper", "resolve_preprocess", "make_config", "search_config",
           "rounding_options", "device_for", "session_for", "float_row", "report_header", "common_report",
           "codes_markdown", "search_codes_json"]


def prepare_out(path: str | Path, option: str = "--out") -> Path:
    """Create the output folder before any work, so a bad ``--out`` fails at once, in one line."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".fixq-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write there ({os_error_reason(e)})", hint="") from None
    return out


def weights_label(args) -> str:
    """What the report says about the weights: the file, 'random (--random-weights)' or 'bundled'."""
    if getattr(args, "random_weights", False):
        return "random (--random-weights)"
    return args.weights or "bundled"


def say(args, *msg) -> None:
    if not getattr(args, "quiet", False) and not getattr(args, "json", False):
        print(*msg)


def say_paper(args) -> None:
    if getattr(args, "paper_info", None):
        say(args, "\n" + paper_sentence(args.paper_info))


def resolve_preprocess(args) -> tuple[Preprocess, tuple[int, ...] | None]:
    entry = ZOO.get(args.model)
    shape = getattr(args, "input_shape", None)
    if entry is None and args.model.lower().endswith(".onnx") and shape is None:
        shape = onnx_input_shape(args.model)
        if shape is None:
            raise PlanError(f"{args.model} has a dynamic input shape: give --input-shape C,H,W")
    if entry is None and not args.model.lower().endswith(".onnx") and shape is None:
        if ":" in args.model:
            raise PlanError(f"--input-shape C,H,W is required for a model outside the zoo ({args.model})")
    name = getattr(args, "preprocess", None)
    if name is not None and name not in PRESETS:
        raise PlanError(f"unknown --preprocess {name!r}; presets: {', '.join(PRESETS)}")
    if entry is not None and name is None:
        pre = PRESETS[entry.preprocess]
    else:
        pre = PRESETS[name or "imagenet"]
        if shape is not None and name is None:
            pre = replace(pre, resize=pre.resize if pre.crop == shape[1] else shape[1], crop=shape[1],
                          grayscale=shape[0] == 1,
                          mean=pre.mean[:1] * shape[0] if shape[0] == 1 else pre.mean,
                          std=pre.std[:1] * shape[0] if shape[0] == 1 else pre.std)
    pre = with_overrides(pre, resize=getattr(args, "resize", None), crop=getattr(args, "crop", None),
                         mean=getattr(args, "mean", None), std=getattr(args, "std", None),
                         grayscale=getattr(args, "grayscale", None))
    return pre, shape


def make_config(coeff_bits="8", data_bits="8", coeff_mode="3D", data_mode="4D", method=None,
                bias_bits=8, acc_bits=32, acc_overflow="saturate", rounding="half_up",
                config_file: str | None = None, data_method: str | None = None,
                data_sign: str = "auto", fc_mode: str = "auto") -> QuantConfig:
    """The CLI's config: ``method`` names the range method of coefficients and data alike
    (unless ``data_method``); neither given: the defaults of :class:`LayerConfig`."""
    d = LayerConfig()
    cfg = QuantConfig(LayerConfig(coeff_bits=coeff_bits, data_bits=data_bits, coeff_mode=coeff_mode,
                                  data_mode=data_mode, method=method or d.method,
                                  data_method=data_method or method or d.data_method, data_sign=data_sign,
                                  fc_mode=fc_mode, bias_bits=bias_bits, acc_bits=acc_bits, acc_overflow=acc_overflow), rounding)
    return read_config(config_file, cfg) if config_file else cfg


def search_config(args) -> QuantConfig:
    """The 2D-HQ base config of ``fixq mixed`` / ``fixq kmeans`` from their shared options."""
    return make_config(str(args.base_bits), args.data_bits, "2D", args.data_mode, args.method, args.bias_bits,
                       args.acc_bits, "saturate", args.rounding, data_method=args.data_method,
                       data_sign=args.data_sign, fc_mode=args.fc_mode)


def rounding_options(args):
    """:class:`fixq.algorithms.learned.RoundingOptions` from ``--learned-rounding`` / ``--bias-correction``
    (None when neither is asked)."""
    learned, residual44 = getattr(args, "learned_rounding", False), getattr(args, "residual_data_bits", None)
    if learned is None:  # a search's default: on, except for <4b,4b> residuals, which it cannot learn
        learned = not residual44
        args.learned_rounding = learned  # the report's options say what ran
    bc = (getattr(args, "bias_correction", False) or learned) and not getattr(args, "no_bias_correction", False)
    if getattr(args, "no_bias_correction", False) and getattr(args, "bias_correction", False):
        raise PlanError("--bias-correction and --no-bias-correction contradict each other; give one")
    bank = getattr(args, "bank_inputs", None)
    if bank is not None and not learned:
        why = ("--residual-data-bits (its <4b,4b> residual branch cannot be learned)" if residual44
               else "--no-learned-rounding, or --paper")
        raise PlanError(f"--bank-inputs {bank} sets the inputs of the code bank that learned rounding learns "
                        f"before the search, and learned rounding is off ({why}); drop --bank-inputs"
                        + ("" if residual44 else ", or drop --no-learned-rounding (with --paper: add "
                                                 "--learned-rounding)"), hint="")
    if not (learned or bc):
        return None
    return RoundingOptions(learned=learned, bias_correction=bc, iters=args.rounding_iters,
                           batch=args.rounding_batch, seed=args.seed,
                           bank_inputs=bank or RoundingOptions.bank_inputs)


def device_for(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PlanError("--device cuda asked but no CUDA GPU is visible to PyTorch; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise PlanError(f"--device must be cpu or cuda, got {name!r}")
    return name


def session_for(args) -> Session:
    require_weights(args.model, args.weights, args.random_weights)
    if args.random_weights:
        warnings.warn(f"{args.model} runs on random weights (--random-weights): its accuracy is meaningless")
    pre, shape = resolve_preprocess(args)
    for k in ("calib_size", "eval_size", "batch_size", "workers"):
        v = getattr(args, k, None)
        if v is not None and (v < 0 if k == "workers" else v <= 0):
            raise PlanError(f"--{k.replace('_', '-')} must be {'>= 0' if k == 'workers' else 'positive'}, got {v}")
    return open_session(args.model, args.calib, args.eval_dir, args.weights, args.calib_size, args.eval_size,
                        args.seed, pre, shape, args.batch_size, args.workers, device_for(args.device),
                        show_progress=not (args.quiet or args.json), skip_bad_images=args.skip_bad_images,
                        labels=getattr(args, "labels", None))


def float_row(session: Session) -> dict:
    cost = analyze(session.graph).to_json()["total"]
    return {"top1": session.float_top1, "top5": session.float_top5, "rel_complexity_mmacs": cost["rel_complexity_mmacs"]}


def report_header(session: Session, extra: str = "", args=None) -> str:
    """The report's opening lines (``args`` with ``--paper``: the sentence naming the paper's choices)."""
    im = session.images
    paper = paper_sentence(getattr(args, "paper_info", None))
    return (f"# fixq report: {session.model_name}\n\n{time.strftime('%Y-%m-%d %H:%M:%S')}{extra}\n\n"
            f"Calibration: {im['n_calib']} images from `{im['calib_dir']}`; evaluation: {im['n_eval']} images "
            f"from `{im['eval_dir']}` (seed {im['seed']}"
            f"{', disjoint subsets of one folder' if im['same_folder'] else ''}; lists in images.json).\n"
            + (f"Skipped {im['skipped_images']['n']} unreadable images (--skip-bad-images; listed in "
               "report.json).\n" if im.get("skipped_images", {}).get("n") else "")
            + f"Preprocessing: {asdict(session.preprocess)}\n"
            + "".join(f"\nModel note: {x}\n" for x in session.graph.notes)
            + (f"\n{paper}\n" if paper else ""))


def common_report(session: Session, args=None) -> dict:
    im = {k: v for k, v in session.images.items() if k not in ("eval_files", "calib_files")}
    return {"model": session.model_name, "n_eval": session.images["n_eval"], "images": im,
            "preprocess": asdict(session.preprocess),
            "float": {"top1_error": session.float_top1, "top5_error": session.float_top5},
            "complexity_float": analyze(session.graph).to_json()["total"], "complexity_note": COMPLEXITY_NOTE,
            "timings": session.timings,
            "processes": dist.world(),
            "model_notes": list(session.graph.notes),
            **({"paper": args.paper_info} if getattr(args, "paper_info", None) else {})}


def search_codes_json(codes, res, saved: str) -> dict:
    """report.json's ``coefficient_codes`` of ``fixq mixed`` / ``fixq kmeans``: ``codes`` the
    RoundingOptions, ``res`` the search result (its ``codes_rows``, ``codes_in_search`` and
    ``bias_guard``), ``saved`` the label of the plan written to plan.json; ``bank_inputs`` is the
    code bank's (None without learned rounding)."""
    return {"method": codes.label(), "layers": res.codes_rows,
            "bank_inputs": codes.bank_inputs if codes.learned else None,
            "in_search": res.codes_in_search, "bias_guard": res.bias_guard, "saved": saved}


def codes_markdown(opts, rows: list[dict], how: str | None = None) -> str:
    """The report section of learned rounding / bias correction: one row per layer; ``how``
    replaces the sentence saying where the errors were measured (``fixq mixed``)."""
    kept = sum(r["kept"] == "learned" for r in rows)
    how = how or ("per layer with the inputs of the already-decided earlier layers; a layer keeps nearest rounding "
                  "when learned rounding is not lower")
    head = (f"## Coefficient codes\n\n{opts.label()}. Output error = sum of squared differences to the float "
            f"layer's output on the calibration images (float64), {how} ({kept} of "
            f"{len(rows)} layers use learned codes).\n\n")
    return head + markdown_table(["layer", "error nearest", "error learned", "kept", "codes changed", "bias", "s"],
                                 [[r["layer"], f"{r['nearest_error']:.4g}",
                                   "-" if r["learned_error"] is None else f"{r['learned_error']:.4g}", r["kept"],
                                   r["changed_codes"], r.get("bias", "-"), f"{r['seconds']:.1f}"]
                                  for r in rows]) + "\n"
