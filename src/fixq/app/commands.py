"""Implementations of the ``fixq`` subcommands (argument parsing is in cli.py)."""
from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fixq.util import distributed as dist
from fixq.analysis.complexity import analyze
from fixq.graph.capture import capture
from fixq.algorithms.pipeline import Session, layer_table, method_label, open_session, run_config
from fixq.planning.plan import LayerConfig, PlanError, QuantConfig, QuantPlan, load_config
from fixq.util.progress import progress_label
from fixq.analysis.report import (COMPLEXITY_NOTE, FIGURE_CAPTIONS, complexity_markdown, layers_markdown, results_table,
                                  write_json)
from fixq.data.zoo import PRESETS, ZOO, Preprocess, build_model, require_weights, with_overrides

__all__ = ["dispatch", "resolve_preprocess", "make_config", "search_config", "prepare_out", "weights_label",
           "rounding_options"]


def prepare_out(path: str | Path, option: str = "--out") -> Path:
    """Create the output folder before any work, so a bad ``--out`` fails at once, in one line."""
    from .cli import UsageError
    from fixq.errors import os_error_reason
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


def _say(args, *msg) -> None:
    if not getattr(args, "quiet", False) and not getattr(args, "json", False):
        print(*msg)


def _say_paper(args) -> None:
    from .paper import paper_sentence
    if getattr(args, "paper_info", None):
        _say(args, "\n" + paper_sentence(args.paper_info))


def resolve_preprocess(args) -> tuple[Preprocess, tuple[int, ...] | None]:
    entry = ZOO.get(args.model)
    shape = getattr(args, "input_shape", None)
    if entry is None and args.model.lower().endswith(".onnx") and shape is None:
        from fixq.data.onnx_in import onnx_input_shape
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
    return load_config(config_file, cfg) if config_file else cfg


def search_config(args) -> QuantConfig:
    """The 2D-HQ base config of ``fixq mixed`` / ``fixq kmeans`` from their shared options."""
    return make_config(str(args.base_bits), args.data_bits, "2D", args.data_mode, args.method, args.bias_bits,
                       args.acc_bits, "saturate", args.rounding, data_method=args.data_method,
                       data_sign=args.data_sign, fc_mode=args.fc_mode)


def rounding_options(args):
    """:class:`fixq.algorithms.learned.RoundingOptions` from ``--learned-rounding`` / ``--bias-correction``
    (None when neither is asked)."""
    learned = getattr(args, "learned_rounding", False)
    bc = (getattr(args, "bias_correction", False) or learned) and not getattr(args, "no_bias_correction", False)
    if getattr(args, "no_bias_correction", False) and getattr(args, "bias_correction", False):
        raise PlanError("--bias-correction and --no-bias-correction contradict each other; give one")
    if not (learned or bc):
        return None
    from fixq.algorithms.learned import RoundingOptions
    return RoundingOptions(learned=learned, bias_correction=bc, iters=args.rounding_iters,
                           batch=args.rounding_batch, seed=args.seed)


def _device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PlanError("--device cuda asked but no CUDA GPU is visible to PyTorch; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise PlanError(f"--device must be cpu or cuda, got {name!r}")
    return name


def _session(args) -> Session:
    require_weights(args.model, args.weights, args.random_weights)
    if args.random_weights:
        import warnings
        warnings.warn(f"{args.model} runs on random weights (--random-weights): its accuracy is meaningless")
    pre, shape = resolve_preprocess(args)
    for k in ("calib_size", "eval_size", "batch_size", "workers"):
        v = getattr(args, k, None)
        if v is not None and (v < 0 if k == "workers" else v <= 0):
            raise PlanError(f"--{k.replace('_', '-')} must be {'>= 0' if k == 'workers' else 'positive'}, got {v}")
    return open_session(args.model, args.calib, args.eval_dir, args.weights, args.calib_size, args.eval_size,
                        args.seed, pre, shape, args.batch_size, args.workers, _device(args.device),
                        show_progress=not (args.quiet or args.json), skip_bad_images=args.skip_bad_images,
                        labels=getattr(args, "labels", None))


def _float_row(session: Session) -> dict:
    cost = analyze(session.graph).to_json()["total"]
    return {"top1": session.float_top1, "top5": session.float_top5, "rel_complexity_mmacs": cost["rel_complexity_mmacs"]}


def _header(session: Session, extra: str = "", args=None) -> str:
    """The report's opening lines (``args`` with ``--paper``: the sentence naming the paper's choices)."""
    from .paper import paper_sentence
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


def _common_report(session: Session, args=None) -> dict:
    im = {k: v for k, v in session.images.items() if k not in ("eval_files", "calib_files")}
    return {"model": session.model_name, "n_eval": session.images["n_eval"], "images": im,
            "preprocess": asdict(session.preprocess),
            "float": {"top1_error": session.float_top1, "top5_error": session.float_top5},
            "complexity_float": analyze(session.graph).to_json()["total"], "complexity_note": COMPLEXITY_NOTE,
            "timings": session.timings,
            "processes": dist.world(),
            "model_notes": list(session.graph.notes),
            **({"paper": args.paper_info} if getattr(args, "paper_info", None) else {})}


def cmd_quantize(args) -> int:
    config = make_config(args.coeff_bits, args.data_bits, args.coeff_mode, args.data_mode, args.method,
                         args.bias_bits, args.acc_bits, args.acc_overflow, args.rounding, args.config,
                         args.data_method, args.data_sign, args.fc_mode)
    out = prepare_out(args.out)
    session = _session(args)
    d = config.default
    codes = rounding_options(args)
    with progress_label(f"<{_bits_label(d.coeff_bits)},{_bits_label(d.data_bits)}> {d.coeff_mode}/{d.data_mode} "
                        f"{method_label(d)}"):
        run = run_config(session, config, exact=args.exact, codes=codes)
    if not dist.is_main():  # torchrun: rank 0 writes the outputs
        return 0
    run.plan.save(out / "plan.json")
    row = run.row(session)
    layers = layer_table(session, run)
    cost = analyze(session.graph, run.plan).to_json()
    report = {**_common_report(session, args), "config": {**config.to_json(), "exact": args.exact,
                                                    "device": args.device, "batch_size": args.batch_size,
                                                    "calib_size": args.calib_size, "eval_size": args.eval_size,
                                                    "seed": args.seed, "weights": weights_label(args)},
              "quant": {"top1_error": run.result.top1_error, "top5_error": run.result.top5_error},
              "agreement_top1": run.result.agreement_top1, "row": row, "layers": layers,
              "sqnr_images": run.result.sqnr_images, "complexity": cost,
              "float_ops": list(run.plan.float_ops), "notes": list(run.plan.notes)}
    if run.codes_rows is not None:
        report["coefficient_codes"] = {"method": codes.label(), "layers": run.codes_rows}
    write_json(out / "report.json", report)
    write_json(out / "images.json", {"calib_files": session.images["calib_files"],
                                     "eval_files": session.images["eval_files"]})
    if args.save_logits:
        import numpy as np
        np.save(args.save_logits, run.result.logits.numpy())
    _plots_for_run(session, layers, out, args.model)
    table = results_table([row], _float_row(session))
    md = (_header(session, args=args) + "\n## Accuracy\n\n" + table + "\n\n" + COMPLEXITY_NOTE +
          "\n\n## Layers\n\nSQNR measured on the first "
          f"{run.result.sqnr_images} evaluation images.\n\n" + layers_markdown(layers) +
          "\n\n" + _figure("sqnr.png") + "\n\n" + _figure("fig3_ranges.png") +
          "\n\n## Complexity and storage\n\n" + complexity_markdown(cost, note=False) + "\n")
    if run.codes_rows is not None:
        md += "\n" + codes_markdown(codes, run.codes_rows)
    if run.plan.notes:
        md += "\n## Notes\n\n" + "\n".join(f"- {x}" for x in run.plan.notes) + "\n"
    (out / "report.md").write_text(md)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "layers"}, default=str))
    else:
        print(table)
        _say_paper(args)
        _say(args, f"\nplan, report.json and report.md written to {out}/")
    return 0


def codes_markdown(opts, rows: list[dict]) -> str:
    """The report section of learned rounding / bias correction: one row per layer."""
    from fixq.analysis.report import markdown_table
    kept = sum(r["kept"] == "learned" for r in rows)
    head = (f"## Coefficient codes\n\n{opts.label()}. Output error = sum of squared differences to the float "
            "layer's output on the calibration images (float64), per layer with the inputs of the already-decided "
            f"earlier layers; a layer keeps nearest rounding when learned rounding is not lower ({kept} of "
            f"{len(rows)} layers use learned codes).\n\n")
    return head + markdown_table(["layer", "error nearest", "error learned", "kept", "codes changed", "bias", "s"],
                                 [[r["layer"], f"{r['nearest_error']:.4g}",
                                   "-" if r["learned_error"] is None else f"{r['learned_error']:.4g}", r["kept"],
                                   r["changed_codes"], r.get("bias", "-"), f"{r['seconds']:.1f}"]
                                  for r in rows]) + "\n"


def _figure(png: str) -> str:
    """A markdown image with its caption (the same words as the HTML report's)."""
    stem = png.rsplit(".", 1)[0]
    return f"![{stem}]({png})\n\n*{FIGURE_CAPTIONS[stem]}*"


def outlier_layer(graph) -> str:
    """The conv/linear layer whose largest coefficient stands furthest above its typical
    filter maximum: where a single 4D format wastes the most range (paper Fig. 3)."""
    best, name = -1.0, graph.layers()[0].name
    for n in graph.layers():
        w = n.weight.detach().abs().reshape(n.weight.shape[0], -1)
        per = w.amax(dim=1)
        ratio = float(per.max() / per.median().clamp_min(1e-12))
        if ratio > best:
            best, name = ratio, n.name
    return name


def _plots_for_run(session: Session, layers: list[dict], out: Path, model: str) -> None:
    from .plots import plot_fig3, plot_sqnr
    plot_sqnr(layers, out / "sqnr.png", f"{model}: per-layer SQNR")
    name = outlier_layer(session.graph)
    plot_fig3(session.graph.node(name).weight, name, out / "fig3_ranges.png")


def _grid(args) -> list[dict]:
    keys = ["coeff_bits", "data_bits", "coeff_mode", "data_mode", "method"]
    vals = [_split(getattr(args, k)) if getattr(args, k) is not None else [None] for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*vals)]


def _bits_label(v) -> str:
    return "flp" if v is None or str(v).lower() in ("flp", "float", "none") else f"{v}b"


def _split(v) -> list[str]:
    return [x.strip() for x in str(v).split(",") if x.strip()]


def cmd_sweep(args) -> int:
    grid = _grid(args)
    configs = [make_config(g["coeff_bits"], g["data_bits"], g["coeff_mode"], g["data_mode"], g["method"],
                           args.bias_bits, args.acc_bits, args.acc_overflow, args.rounding, args.config,
                           args.data_method, args.data_sign, args.fc_mode)
               for g in grid]
    out = prepare_out(args.out)
    session = _session(args)
    from fixq.algorithms.calibrate import needs_histograms
    session.observations(needs_histograms(session.graph, configs))  # one calibration pass for the grid
    rows = []
    codes = rounding_options(args)
    for i, (cfg, g) in enumerate(zip(configs, grid)):
        label = f"[{i + 1}/{len(configs)}] <{_bits_label(g['coeff_bits'])},{_bits_label(g['data_bits'])}> " \
                f"{g['coeff_mode']}/{g['data_mode']} {method_label(cfg.default)}"
        with progress_label(label):
            run = run_config(session, cfg, exact=args.exact, codes=codes)
        row = {"plan": f"plan-{i:02d}.json", **run.row(session)}
        rows.append(row)
        if not dist.is_main():
            continue
        run.plan.save(out / row["plan"])
        _say(args, f"[{i + 1}/{len(configs)}] {row['format']} {row['coeff_mode']}/{row['data_mode']} "
                   f"{row['method']}: top-1 error {row['quant_top1_error']:.2f}%")
    report = {**_common_report(session, args), "config": {"grid": grid, "rounding": args.rounding,
                                                    "acc_bits": args.acc_bits, "bias_bits": args.bias_bits,
                                                    "exact": args.exact, "seed": args.seed,
                                                    "weights": weights_label(args)},
              "rows": rows}
    if not dist.is_main():
        return 0
    write_json(out / "report.json", report)
    write_json(out / "images.json", {"calib_files": session.images["calib_files"],
                                     "eval_files": session.images["eval_files"]})
    table = results_table(rows, _float_row(session), plans=True)
    from .plots import plot_pareto
    plot_pareto(rows, out / "pareto.png", session.float_top1, f"{args.model}: top-1 error vs complexity")
    (out / "report.md").write_text(_header(session, args=args) + "\n## Sweep\n\n" + table + "\n\n" + COMPLEXITY_NOTE +
                                   "\n\n" + _figure("pareto.png") + "\n")
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print(table)
        _say_paper(args)
        _say(args, f"\nreport.json, report.md and one plan per row written to {out}/")
    return 0


def cmd_models(args) -> int:
    rows = []
    for e in ZOO.values():
        p = PRESETS[e.preprocess]
        rows.append({"name": e.name, "input": "x".join(map(str, p.input_shape(e.input_hw))),
                     "preprocess": e.preprocess, "weights": e.weights})
    if args.json:
        print(json.dumps(rows))
        return 0
    from fixq.analysis.report import markdown_table
    print(markdown_table(["model", "input CxHxW", "preprocess", "weights"],
                         [[r["name"], r["input"], r["preprocess"], r["weights"]] for r in rows]))
    print("\nAny other model: --model path/to/file.py:function (or package.module:function) --input-shape C,H,W")
    return 0


def cmd_demo(args) -> int:
    from fixq.data.digits import export_digits
    out = Path(args.out)
    data = export_digits(out / "data" / "digits-test", "test")
    session = open_session("lenet-digits", str(data), str(data), calib_size=100, seed=0,
                           show_progress=not (args.quiet or args.json))
    rows, runs = [], []
    for cb in ("8", "4"):
        for mode in ("4D", "3D", "2D"):
            run = run_config(session, make_config(coeff_bits=cb, coeff_mode=mode))
            rows.append(run.row(session))
            runs.append(run)
    best = runs[1]
    best.plan.save(out / "plan.json")
    report = {**_common_report(session), "rows": rows, "config": {"grid": "coeff 8,4 x 4D,3D,2D; data 8b 4D"},
              "layers": layer_table(session, best)}
    write_json(out / "report.json", report)
    table = results_table(rows, _float_row(session))
    (out / "report.md").write_text(_header(session) + "\n## Demo: LeNet on scikit-learn digits\n\n" + table +
                                   "\n\n" + COMPLEXITY_NOTE +
                                   "\n\n## Layers (<8b,8b> 3D)\n\n" + layers_markdown(report["layers"]) + "\n")
    if args.json:
        print(json.dumps(report, default=str))
        return 0
    print(f"fixq demo: LeNet on {session.images['n_eval']} held-out scikit-learn digits "
          f"(calibration on {session.images['n_calib']} others)\n")
    print(table)
    print(f"\nReport: {out / 'report.md'} (JSON: {out / 'report.json'}; <8b,8b> 3D plan: {out / 'plan.json'})")
    return 0


def cmd_analyze(args) -> int:
    pre, shape = resolve_preprocess(args)
    model, entry = build_model(args.model, args.weights, shape)
    if shape is None:
        shape = pre.input_shape(entry.input_hw if entry else None)
    graph = capture(model, torch.zeros(1, *shape), check=False)
    plan = QuantPlan.load(args.plan) if args.plan else None
    if plan is not None:
        from fixq.planning.plan_schema import check_plan_graph
        check_plan_graph(plan, graph, args.plan)
    cost = analyze(graph, plan).to_json()
    cost["model"], cost["input_shape"] = args.model, list(shape)
    if args.out:
        write_json(args.out, cost)
    if args.json:
        print(json.dumps(cost))
    else:
        print(complexity_markdown(cost, quantized=plan is not None))
    return 0


def cmd_report(args) -> int:
    from .html_report import render_html
    path = render_html(args.dir, args.out)
    print(f"wrote {path}")
    return 0


COMMANDS = {"report": cmd_report, "quantize": cmd_quantize, "sweep": cmd_sweep, "models": cmd_models, "demo": cmd_demo,
            "analyze": cmd_analyze}


def dispatch(args) -> int:
    from .commands_int import cmd_accumulators, cmd_export_c, cmd_export_onnx, cmd_run_c
    from .commands_kmeans import cmd_kmeans
    from .commands_mixed import cmd_mixed
    COMMANDS.update({"export-c": cmd_export_c, "run-c": cmd_run_c, "accumulators": cmd_accumulators,
                     "mixed": cmd_mixed, "kmeans": cmd_kmeans, "export-onnx": cmd_export_onnx})
    if args.command in DATA_PARALLEL and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return _data_parallel(args)
    return COMMANDS[args.command](args)


DATA_PARALLEL = ("quantize", "sweep", "mixed", "kmeans")


def _data_parallel(args) -> int:
    """One rank of ``torchrun --nproc-per-node N -m fixq COMMAND``: same results as one
    process (fixq.util.distributed); only rank 0 prints and writes."""
    import warnings
    dist.init_from_env(args.device)
    if not dist.is_main():
        args.quiet = True
        warnings.simplefilter("ignore")
    code = COMMANDS[args.command](args)
    dist.shutdown()
    return code
