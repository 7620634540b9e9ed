"""The ``fixq`` sub-commands quantize, sweep, models, demo, analyze and report, and the
dispatch of every sub-command (the others: :mod:`fixq.app.commands_int`,
:mod:`fixq.app.commands_mixed`, :mod:`fixq.app.commands_kmeans`; shared pieces:
:mod:`fixq.app.common`; argument parsing: :mod:`fixq.app.parser`)."""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import torch

from fixq.algorithms.calibrate import needs_histograms
from fixq.algorithms.pipeline import Session, layer_table, method_label, open_session, run_config
from fixq.analysis.complexity import analyze
from fixq.analysis.report import (COMPLEXITY_NOTE, FIGURE_CAPTIONS, complexity_markdown, layers_markdown,
                                  markdown_table, results_table, write_json)
from fixq.data.digits import export_digits
from fixq.data.zoo import PRESETS, ZOO, build_model
from fixq.graph.capture import capture
from fixq.planning.plan_io import load_plan
from fixq.planning.plan_schema import check_plan_graph
from fixq.util import distributed as dist
from fixq.util.progress import progress_label
from .commands_int import cmd_accumulators, cmd_export_c, cmd_export_onnx, cmd_run_c
from .commands_kmeans import cmd_kmeans
from .commands_mixed import cmd_mixed
from .common import (codes_markdown, common_report, float_row, make_config, prepare_out, report_header,
                     resolve_preprocess, rounding_options, say, say_paper, session_for, weights_label)
from .html_report import render_html
from .plots import plot_fig3, plot_pareto, plot_sqnr

__all__ = ["dispatch", "COMMANDS", "cmd_quantize", "cmd_sweep", "cmd_models", "cmd_demo", "cmd_analyze",
           "cmd_report", "outlier_layer"]


def cmd_quantize(args) -> int:
    config = make_config(args.coeff_bits, args.data_bits, args.coeff_mode, args.data_mode, args.method,
                         args.bias_bits, args.acc_bits, args.acc_overflow, args.rounding, args.config,
                         args.data_method, args.data_sign, args.fc_mode)
    out = prepare_out(args.out)
    session = session_for(args)
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
    report = {**common_report(session, args), "config": {**config.to_json(), "exact": args.exact,
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
    table = results_table([row], float_row(session))
    md = (report_header(session, args=args) + "\n## Accuracy\n\n" + table + "\n\n" + COMPLEXITY_NOTE +
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
        say_paper(args)
        say(args, f"\nplan, report.json and report.md written to {out}/")
    return 0


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
    session = session_for(args)
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
        say(args, f"[{i + 1}/{len(configs)}] {row['format']} {row['coeff_mode']}/{row['data_mode']} "
                   f"{row['method']}: top-1 error {row['quant_top1_error']:.2f}%")
    report = {**common_report(session, args), "config": {"grid": grid, "rounding": args.rounding,
                                                    "acc_bits": args.acc_bits, "bias_bits": args.bias_bits,
                                                    "exact": args.exact, "seed": args.seed,
                                                    "weights": weights_label(args)},
              "rows": rows}
    if not dist.is_main():
        return 0
    write_json(out / "report.json", report)
    write_json(out / "images.json", {"calib_files": session.images["calib_files"],
                                     "eval_files": session.images["eval_files"]})
    table = results_table(rows, float_row(session), plans=True)
    plot_pareto(rows, out / "pareto.png", session.float_top1, f"{args.model}: top-1 error vs complexity")
    (out / "report.md").write_text(report_header(session, args=args) + "\n## Sweep\n\n" + table + "\n\n" + COMPLEXITY_NOTE +
                                   "\n\n" + _figure("pareto.png") + "\n")
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print(table)
        say_paper(args)
        say(args, f"\nreport.json, report.md and one plan per row written to {out}/")
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
    print(markdown_table(["model", "input CxHxW", "preprocess", "weights"],
                         [[r["name"], r["input"], r["preprocess"], r["weights"]] for r in rows]))
    print("\nAny other model: --model path/to/file.py:function (or package.module:function) --input-shape C,H,W")
    return 0


def cmd_demo(args) -> int:
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
    report = {**common_report(session), "rows": rows, "config": {"grid": "coeff 8,4 x 4D,3D,2D; data 8b 4D"},
              "layers": layer_table(session, best)}
    write_json(out / "report.json", report)
    table = results_table(rows, float_row(session))
    (out / "report.md").write_text(report_header(session) + "\n## Demo: LeNet on scikit-learn digits\n\n" + table +
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
    plan = load_plan(args.plan) if args.plan else None
    if plan is not None:
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
    path = render_html(args.dir, args.out)
    print(f"wrote {path}")
    return 0


COMMANDS = {"report": cmd_report, "quantize": cmd_quantize, "sweep": cmd_sweep, "models": cmd_models, "demo": cmd_demo,
            "analyze": cmd_analyze, "export-c": cmd_export_c, "run-c": cmd_run_c, "accumulators": cmd_accumulators,
            "mixed": cmd_mixed, "kmeans": cmd_kmeans, "export-onnx": cmd_export_onnx}


def dispatch(args) -> int:
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
