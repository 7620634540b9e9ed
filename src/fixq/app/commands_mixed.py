"""``fixq mixed``: energy-based automatic 8/4-bit mixed precision (paper §5, Table 3)."""
from __future__ import annotations

import json

from fixq.algorithms.learned_bank import inputs_text
from fixq.algorithms.mixed_search import MixedOptions, search_mixed
from fixq.algorithms.acceptance import acceptance_rule, resolution_text
from fixq.analysis.report import markdown_table, write_json
from fixq.util import distributed as dist
from .common import (codes_markdown, common_report, prepare_out, report_header, rounding_options, say, say_paper,
                     search_codes_json, search_config, session_for)

__all__ = ["cmd_mixed", "table3"]


_ORDER_TEXT = {
    "energy": "In each layer the filters of lowest energy go low first (the paper; f: their share of the layer's "
              "energy).",
    "noise": "In each layer the filters whose low-bit codes add the least noise energy go low first (--order noise, "
             "the default; f: their share of the noise the layer adds with every filter low).",
}


def table3(res) -> str:
    """The paper's Table 3 shape: Conservative, tuned and Aggressive plans on the test images."""
    rows = [["<flp,flp>", res.float_top1_test, res.float_top5_test, "-", "-", "-"]]
    for s in (res.conservative, res.tuned, res.aggressive) + ((res.learned,) if res.learned else ()):
        rows.append([s.label, s.top1_error, s.top5_error, s.low_filters_pct, s.rel_complexity_mmacs, s.savings_pct])
    return markdown_table(["plan", "top-1 err %", "top-5 err %", "low-precision filters %",
                           "complexity [M MACs <8b,8b>]", "savings % vs all-8b 2D"], rows)


def _trials_table(res) -> str:
    rows = [[t.strategy, f"{t.f:.4g}", t.top1_error, t.drop_bound, t.low_filters_pct, t.rel_complexity_mmacs,
             t.savings_pct, "yes" if t.meets_target else "no"] for r in res.tuning.values() for t in r.trials]
    return markdown_table(["strategy", "f", "tune top-1 err %", "drop + margin", "low filters %", "complexity",
                           "savings %", "meets target"], rows)


def cmd_mixed(args) -> int:
    opts = MixedOptions(base_bits=args.base_bits, low_bits=args.low_bits,
                        target_drop=None if args.target_error is not None else args.target_drop,
                        target_error=args.target_error, probe_size=args.probe_size, tune_size=args.tune_size,
                        sensitivity_size=args.sensitivity_size, exclude=args.exclude, trials=args.trials,
                        strategies=("global", "per-layer") if args.strategy == "both" else (args.strategy,),
                        seed=args.seed, f0=args.f0, delta=args.delta,
                        margin_z=args.margin_z, order=args.order)
    config = search_config(args)
    codes = rounding_options(args)
    out = prepare_out(args.out)
    session = session_for(args)
    res = search_mixed(session, config, opts, codes)
    if not dist.is_main():  # torchrun: rank 0 writes the outputs
        return 0
    final = res.saved  # the tuned plan, bias-corrected when asked and that did not raise the tuning error
    final.plan.save(out / "plan.json")
    other = [s for s in res.tuning if s != res.strategy]
    trials = [t.to_json() for r in res.tuning.values() for t in r.trials]
    report = {**common_report(session, args),
              "float": {"top1_error": res.float_top1_test, "top5_error": res.float_top5_test,
                        "top1_error_tune": res.float_top1_tune},
              "quant": {"top1_error": final.top1_error, "top5_error": final.top5_error},
              "complexity": {"savings_pct": res.tuned.savings_pct,
                             "rel_complexity_mmacs": res.tuned.rel_complexity_mmacs,
                             "baseline": f"2D-HQ <{opts.base_bits}b,{args.data_bits}b> everywhere",
                             "baseline_rel_complexity_mmacs": res.conservative.rel_complexity_mmacs},
              "low_precision_filters_pct": {"overall": res.tuned.low_filters_pct, "layers": res.tuned.low_by_layer},
              "target": {"top1_error": res.target, "drop": opts.target_drop, "absolute": opts.target_error,
                         "measured_on": f"{res.n_tune} tuning images (disjoint from the {res.n_test} test images)",
                         "acceptance": acceptance_rule(opts.margin_z), "margin_z": opts.margin_z,
                         "resolution": res.resolution},
              "strategy": res.strategy, "order": res.order,
              "strategies": {s: {"best_f": None if r.best is None else r.best.f,
                                 "best_tune_top1_error": None if r.best is None else r.best.top1_error,
                                 "best_savings_pct": None if r.best is None else r.best.savings_pct,
                                 "stop": r.stop_reason} for s, r in res.tuning.items()},
              "thresholds": res.thresholds, "sensitivity": res.sensitivity, "trials": trials,
              "table3": [{"plan": s.label, "top1_error": s.top1_error, "top5_error": s.top5_error,
                          "savings_pct": s.savings_pct, "low_precision_filters_pct": s.low_filters_pct,
                          "rel_complexity_mmacs": s.rel_complexity_mmacs}
                         for s in (res.conservative, res.tuned, res.aggressive) + ((res.learned,) if res.learned else ())],
              "n_tune": res.n_tune, "n_test": res.n_test,
              "timings": {**session.timings, **res.seconds},
              "options": {k: v for k, v in vars(args).items() if k != "func"}}
    if codes is not None:
        report["coefficient_codes"] = search_codes_json(codes, res, final.label)
    write_json(out / "report.json", report)
    write_json(out / "images.json", {"calib_files": session.images["calib_files"],
                                     "eval_files": session.images["eval_files"]})
    t3 = table3(res)
    cmp = "; ".join(f"{s}: best f={r.best.f:.4g}, savings {r.best.savings_pct:.1f}% at {r.best.top1_error:.2f}% "
                    f"tuning error" if r.best else f"{s}: no plan met the target" for s, r in res.tuning.items())
    md = (report_header(session, args=args) + f"\n## Mixed precision ({opts.base_bits}b/{opts.low_bits}b per 2D filter)\n\n"
          f"Target: top-1 error <= {res.target:.2f}% on {res.n_tune} tuning images (accepted when the "
          f"{acceptance_rule(opts.margin_z)}); reported below on the other "
          f"{res.n_test} evaluation images. The plan was produced by the **{res.strategy}** threshold strategy"
          f"{' (better than ' + ', '.join(other) + ' at this target)' if other else ''}. {cmp}. "
          f"{_ORDER_TEXT[res.order]}\n\n"
          f"{resolution_text(res.resolution, f'the all-{opts.base_bits}-bit plan')}\n\n" + t3 +
          "\n\n## Trials\n\n" + _trials_table(res) +
          f"\n\nWall time: energies {res.seconds['energies_s']:.1f} s, sensitivity {res.seconds['sensitivity_s']:.1f} s, "
          f"tuning {res.seconds['tuning_s']:.1f} s, coefficient codes {res.seconds['codes_s']:.1f} s, "
          f"total {res.seconds['total_s']:.1f} s.\n")
    how = None
    if any("learned_in_bank" in r for r in res.codes_rows or ()):
        how = (f"errors of the learning pass before the search ({inputs_text(codes)}; the guard keeps nearest "
               "rounding when learned rounding is not lower); \"codes changed\" counts the saved plan's codes that "
               "differ from nearest rounding")
    if res.codes_in_search:
        near = [r["layer"] for r in res.codes_rows if "learned_in_bank" in r and not r["learned_in_bank"]]
        md += ("\nThe trials (the layer sensitivity included) ran with learned low-bit codes, decided once before "
               f"the search, {inputs_text(codes, f'all its filters at {opts.low_bits} bits')} (eligible layers); a "
               f"trial's low filters take those codes, its {opts.base_bits}-bit "
               "filters and the excluded layers nearest rounding"
               + (f" (learned rounding did not lower the output error of {', '.join(near)}: nearest there too)"
                  if near else "")
               + ". The tuned plan holds exactly the codes the tuner measured.\n")
    if res.bias_guard is not None:
        bg = res.bias_guard
        md += (f"\nBias correction of the tuned plan (last row): tuning top-1 {bg['tune_top1_corrected']:.2f}% vs "
               f"{bg['tune_top1_tuned']:.2f}% without it, so the saved plan is "
               + ("the bias-corrected one.\n" if bg["kept"] else "the tuned one (the correction raised the tuning "
                  "error; kept only when it does not).\n"))
    if codes is not None:
        md += "\n" + codes_markdown(codes, res.codes_rows, how)
    (out / "report.md").write_text(md)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k not in ("trials", "sensitivity")}, default=str))
    else:
        print(t3)
        say_paper(args)
        say(args, f"\nstrategy: {res.strategy}; {cmp}\nplan.json, report.json and report.md written to {out}/")
    return 0
