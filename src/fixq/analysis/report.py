"""Reports: paper-style tables (terminal/markdown), report.json/report.md, complexity tables."""
from __future__ import annotations

import json
import math
from pathlib import Path
from .complexity import mac_cost

__all__ = ["COMPLEXITY_NOTE", "FIGURE_CAPTIONS", "markdown_table", "results_table", "layers_markdown",
           "complexity_markdown", "write_json", "clean_json", "fmt_num"]


def fmt_num(v, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.{nd}f}"
    return str(v)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    cells = [[fmt_num(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


RESULT_HEADERS = ["<coeff,data>", "mode (coeff/data)", "method", "top-1 err %", "top-5 err %",
                  "agreement %", "complexity [M MACs <8b,8b>]"]


COMPLEXITY_NOTE = ("Complexity: M MACs weighted by coefficient x data bits, in <8b,8b> units "
                   "(one 8-bit x 8-bit MAC = 1; paper Table 1): lower is cheaper.")


FIGURE_CAPTIONS = {
    "sqnr": "Figure: signal-to-quantization-noise ratio (dB) of every requantized layer output vs the float "
            "network, on the first evaluation images; higher is better, a drop marks the layer that loses accuracy.",
    "fig3_ranges": "Figure (paper Fig. 3): coefficient magnitudes of the layer with the largest outlier, and the "
                   "largest value one 4D (per layer), 3D (per kernel) and 2D (per filter) format represents.",
    "pareto": "Figure: top-1 error vs relative complexity (M MACs in <8b,8b> units) of every sweep row; #n is row "
              "n of the table, the red line the Pareto front, the dashed line the float error.",
}


def results_table(rows: list[dict], float_row: dict | None = None, plans: bool = False) -> str:
    """The paper's Table 2/5 shape: float first, then every quantized configuration
    (``plans``: a first column naming each row's plan file, ``#`` for the Pareto plot)."""
    out = []
    if float_row is not None:
        out.append((["-", "-"] if plans else []) + ["<flp,flp>", "-", "-", float_row["top1"], float_row["top5"],
                                                    100.0, float_row.get("rel_complexity_mmacs")])
    for i, r in enumerate(rows):
        out.append(([i + 1, r.get("plan", "-")] if plans else []) +
                   [r["format"], f"{r['coeff_mode']}/{r['data_mode']}", r["method"], r["quant_top1_error"],
                    r["quant_top5_error"], r["agreement_top1"], r["rel_complexity_mmacs"]])
    return markdown_table((["#", "plan"] if plans else []) + RESULT_HEADERS, out)


def layers_markdown(layers: list[dict]) -> str:
    rows = []
    for x in layers:
        cf = x.get("coeff_format")
        df = x.get("data_format")
        af = x.get("acc_format")
        sat = x.get("saturations") or {}
        rows.append([x["name"], x["kind"],
                     "-" if not cf else f"{cf['T']}b {cf['granularity']} F{cf.get('F_min', '')}..{cf.get('F_max', '')}",
                     "-" if not df else f"{'' if df.get('signed', True) else 'U'}{df['T']}b {df['granularity']} "
                                        f"F{df.get('F_min', '')}..{df.get('F_max', '')}",
                     "-" if not af else f"A{af['A']} F{af['F_min']}..{af['F_max']}",
                     x.get("sqnr_db"), sat.get("data", 0), sat.get("acc", 0)])
    return markdown_table(["layer", "op", "coefficients", "output data", "accumulator", "SQNR dB",
                           "data sat.", "acc sat."], rows)


def complexity_markdown(cost_json: dict, quantized: bool = True, note: bool = True) -> str:
    """Per-layer MACs, complexity and storage; ``quantized=False`` (the float network, no
    plan) says what each uniform format would cost instead of meaningless savings; ``note``
    adds the line that says what the complexity column means."""
    rows = [[x["name"], x["kind"], f"{x['N']}x{x['M']}x{x['H']}x{x['W']}", x["P"], x["macs"],
             x["coeff_bits"], x["data_bits"], x["rel_complexity_mmacs"], x["storage_bits"] // 8]
            for x in cost_json["layers"]]
    t = cost_json["total"]
    rows.append(["total", "", "", "", t["macs"], "", "", t["rel_complexity_mmacs"], t["storage_bytes"]])
    table = markdown_table(["layer", "op", "NxMxHxW", "P", "MACs", "coeff", "data",
                            "rel. complexity [M MACs <8b,8b>]", "storage [B]"], rows)
    if not quantized:  # the float network: what it costs, and what each uniform format would
        mm = t["macs"] / 1e6
        each = "; ".join(f"<{_b(c)},{_b(d)}> {mm * mac_cost(c, d):.2f}" for c, d in
                         ((8, 8), (4, 8), (4, 4), (8, None), (16, 16)))
        return (table + f"\n\n{COMPLEXITY_NOTE}\n\nThe float network (<flp,flp>) costs {t['rel_complexity_mmacs']:.2f} "
                f"M MACs in <8b,8b> units ({mm:.2f} M MACs). The same network in one uniform format would cost "
                f"(M MACs <8b,8b>): {each}. Give --plan to cost a plan's own formats.")
    return (table + (f"\n\n{COMPLEXITY_NOTE}" if note else "") +
            f"\n\nSavings vs <8b,8b>: {t['savings_vs_8b8b_pct']:.1f}%; vs <flp,flp>: {t['savings_vs_float_pct']:.1f}%")


def _b(bits) -> str:
    return "flp" if bits is None else f"{bits}b"


def clean_json(o):
    """Make an object strict-JSON safe: infinite floats become the string "inf"."""
    if isinstance(o, float) and (math.isinf(o) or math.isnan(o)):
        return "inf" if o > 0 else ("-inf" if o < 0 else None)
    if isinstance(o, dict):
        return {str(k): clean_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean_json(v) for v in o]
    if hasattr(o, "tolist"):
        return o.tolist()
    return o


def write_json(path: str | Path, obj) -> None:
    Path(path).write_text(json.dumps(clean_json(obj), indent=1))
