"""``fixq kmeans``: K-means clustered kernels, 8-bit basis + 4-bit residuals (paper §6, Tables 4, 6)."""
from __future__ import annotations

import json

from fixq.algorithms.kmeans import layer_savings
from fixq.algorithms.kmeans_search import KMeansOptions, search_kmeans
from fixq.algorithms.learned_bank import kmeans_inputs_text
from fixq.algorithms.acceptance import acceptance_rule, resolution_text
from fixq.analysis.report import markdown_table, write_json
from fixq.util import distributed as dist
from .common import (codes_markdown, common_report, prepare_out, report_header, rounding_options, say, say_paper,
                     search_codes_json, search_config, session_for)

__all__ = ["cmd_kmeans", "table4", "sweep_table", "table6", "search_text"]

MIN_LOSS = 0.2  # top-1 points plain low bits must add before a recovery ratio means anything

_H = ["plan", "top-1 err %", "top-5 err %", "logit SQNR dB", "layer complexity [M MACs]", "layer savings %",
      "network savings %"]


def table4(res) -> str:
    t = res.table4
    rows = [[r["plan"], r["top1_error"], r["top5_error"], r["logit_sqnr_db"], r["layer_rel_complexity_mmacs"],
             r["layer_savings_pct"], r["network_savings_pct"]] for r in t["rows"]]
    return markdown_table(_H, rows)


def sweep_table(res) -> str:
    """Table 4's layer at every candidate K (4-bit residuals): recovery vs layer savings."""
    noisy = res.table4["plain_low_loss"] < MIN_LOSS  # top-1 ratio of test-set noise: not printed
    rows = [[r["K"], r["top1_error"], r["logit_sqnr_db"], r["layer_savings_pct"],
             "-" if noisy or r["top1_recovered_pct"] is None else r["top1_recovered_pct"],
             "-" if r["noise_recovered_pct"] is None else r["noise_recovered_pct"]] for r in res.table4["sweep"]]
    return markdown_table(["K", "top-1 err %", "logit SQNR dB", "layer savings %", "top-1 recovered %",
                           "logit noise recovered %"], rows)


def table6(res) -> str:
    rows = [["<flp,flp>", res.float_top1_test, res.float_top5_test, "-", "-", "-"]]
    rows += [[r["plan"], r["top1_error"], r["top5_error"], r["logit_sqnr_db"], r["rel_complexity_mmacs"],
              r["network_savings_pct"]] for r in res.table6]
    return markdown_table(["plan", "top-1 err %", "top-5 err %", "logit SQNR dB", "complexity [M MACs <8b,8b>]",
                           "network savings %"], rows)


def search_text(res) -> str:
    """How K was chosen: the trials on the tuning images, first the all-smallest-K plan (none with a given K)."""
    if not res.trials:
        return "K given (`--k`): no search."
    if res.trials[0]["meets_target"]:
        head = ("K search on the tuning images: the first trial, every eligible layer at its smallest K, met the "
                "target, so it was kept and no candidate was measured alone:")
    else:
        head = ("K search on the tuning images: the first trial, every eligible layer at its smallest K, missed the "
                "target; then every candidate (layer, K) was measured alone and the budget beta bisected:")
    rows = [["smallest K" if t["beta"] is None else f"{t['beta']:.4g}", len(t["ks"]), t["savings_pct"],
             t["top1_error"], t["drop_bound"], "yes" if t["meets_target"] else "no"] for t in res.trials]
    return head + "\n\n" + markdown_table(["beta", "layers clustered", "network savings %", "tuning top-1 err %",
                                            "drop + margin (points)", "meets"], rows)


def cmd_kmeans(args) -> int:
    opts = KMeansOptions(base_bits=args.base_bits, residual_bits=args.residual_bits, layers=args.layers, k=args.k,
                         exclude=args.exclude, target_drop=None if args.target_error is not None else args.target_drop,
                         target_error=args.target_error, tune_size=args.tune_size,
                         sensitivity_size=args.sensitivity_size, restarts=args.restarts, seed=args.seed,
                         margin_z=args.margin_z, table4_others=args.table4_others,
                         residual_data_bits=args.residual_data_bits)
    config = search_config(args)
    codes = rounding_options(args)
    out = prepare_out(args.out)
    session = session_for(args)
    res = search_kmeans(session, config, opts, codes)
    if not dist.is_main():  # torchrun: rank 0 writes the outputs
        return 0
    res.plan.save(out / "plan.json")
    N = {n.name: n.weight.shape[0] for n in session.graph.layers()}
    layers = {n: {"k": K, "N": N[n], "layer_savings_pct": 100.0 * layer_savings(N[n], K, args.base_bits, args.residual_bits,
                                                                 residual_data_bits=args.residual_data_bits)}
              for n, K in res.ks.items()}
    final = res.table6[res.saved]
    report = {**common_report(session, args),
              "float": {"top1_error": res.float_top1_test, "top5_error": res.float_top5_test,
                        "top1_error_tune": res.float_top1_tune},
              "quant": {"top1_error": final["top1_error"], "top5_error": final["top5_error"]},
              "complexity": {"savings_pct": final["network_savings_pct"],
                             "rel_complexity_mmacs": final["rel_complexity_mmacs"],
                             "baseline": f"2D-HQ <{args.base_bits}b,{args.data_bits}b> everywhere"},
              "layers": layers, "table4": res.table4, "table6": res.table6,
              "target": {"top1_error": res.target, "drop": opts.target_drop, "absolute": opts.target_error,
                         "measured_on": f"{res.n_tune} tuning images (disjoint from the {res.n_test} test images)",
                         "acceptance": acceptance_rule(opts.margin_z), "margin_z": opts.margin_z,
                         "resolution": res.resolution},
              "k_search": {"noise": {n: {str(k): v for k, v in d.items()} for n, d in res.noise.items()},
                           "trials": res.trials},
              "n_tune": res.n_tune, "n_test": res.n_test, "timings": {**session.timings, **res.seconds},
              "options": {k: v for k, v in vars(args).items() if k != "func"}}
    if codes is not None:
        report["coefficient_codes"] = search_codes_json(codes, res, final["plan"])
    write_json(out / "report.json", report)
    write_json(out / "images.json", {"calib_files": session.images["calib_files"],
                                     "eval_files": session.images["eval_files"]})
    t4, t6 = table4(res), table6(res)
    others = ("; every other layer in floating point, as the paper's Table 4; network savings = this layer's "
              "savings over the all-base network" if res.table4.get("others") == "flp" else "")
    rec = res.table4["recovered_pct"]
    lost = res.table4["plain_low_loss"]
    if rec is None or lost < MIN_LOSS:
        rec_s = (f"plain 2D-HQ <{args.residual_bits}b,8b> changes the top-1 error by {lost:+.2f} points on this layer "
                 "alone: below the noise of this test set, so no top-1 recovery ratio is meaningful")
    else:
        rec_s = f"K-means recovers {rec:.0f}% of the {lost:.2f} top-1 points plain 2D-HQ <{args.residual_bits}b,8b> adds"
    nrec = res.table4["noise_recovered_pct"]
    if nrec is not None:
        rec_s += (f"; of the logit noise (vs float, test images) plain <{args.residual_bits}b,8b> adds over "
                  f"<{args.base_bits}b,8b>, K-means {opts.rlabel()} residuals remove {nrec:.0f}%")
    ks = ", ".join(f"{n}: K={K}" for n, K in res.ks.items()) or "none (no K met the target)"
    md = (report_header(session, args=args) + f"\n## K-means clustered kernels (basis {args.base_bits}b + residuals "
          f"{args.residual_bits}b{' on ' + str(args.residual_data_bits) + '-bit data' if args.residual_data_bits else ''})\n\nTarget: top-1 error <= {res.target:.2f}% on {res.n_tune} tuning images "
          f"(accepted when the {acceptance_rule(opts.margin_z)}); errors below are on the other {res.n_test} images.\n\n"
          + (f"{resolution_text(res.resolution, f'the all-{args.base_bits}-bit plan')}\n\n" if res.resolution else "")
          + f"### Table 4 shape: layer `{res.table4['layer']}` "
          f"(N={res.table4['N']}, K={res.table4['K']}{others})\n\n{t4}\n\n{rec_s}.\n\nThe same layer at every candidate K "
          f"({args.residual_bits}-bit residuals; recovered = share of what plain <{args.residual_bits}b,8b> adds "
          f"over <{args.base_bits}b,8b> that K-means removes):\n\n{sweep_table(res)}\n\n"
          f"### Table 6 shape: network\n\n{t6}\n\n"
          f"K per layer: {ks}.\n\n{search_text(res)}\n\nWall time: search {res.seconds['search_s']:.1f} s, "
          f"total {res.seconds['total_s']:.1f} s.\n")
    how = None
    if res.codes_in_search:
        what = ("The trials ran" if not res.noise else "The K candidates and the trials ran")
        md += (f"\n{what} with learned residual codes, decided once before they were "
               f"measured for each candidate (layer, K) tried, {kmeans_inputs_text(codes)} (a candidate keeps nearest rounding where "
               "learned rounding did not lower its output error); Table 4 and the \"nearest rounding\" row use "
               "nearest rounding. The saved plan is "
               f"\"{final['plan']}\".\n")
        how = (f"errors of the learning pass before the trials ({kmeans_inputs_text(codes)}); \"codes changed\" "
               "counts the saved plan's codes that differ from nearest rounding")
    if res.bias_guard is not None:
        bg = res.bias_guard
        md += (f"\nBias correction of the searched plan: tuning top-1 {bg['tune_top1_corrected']:.2f}% vs "
               f"{bg['tune_top1_searched']:.2f}% without it, so it was "
               + ("kept.\n" if bg["kept"] else "not kept (it raised the tuning error; kept only when it does not).\n"))
    if codes is not None:
        md += "\n" + codes_markdown(codes, res.codes_rows, how)
    (out / "report.md").write_text(md)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "k_search"}, default=str))
    else:
        print(f"Layer {res.table4['layer']} (N={res.table4['N']}, K={res.table4['K']}):\n{t4}\n{rec_s}.\n\nNetwork:\n{t6}")
        say_paper(args)
        say(args, f"\nK per layer: {ks}\nplan.json, report.json and report.md written to {out}/")
    return 0
