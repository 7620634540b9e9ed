"""``fixq report DIR``: one self-contained HTML page (tables + embedded PNGs) for a
quantize or sweep run folder."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from fixq.analysis.report import COMPLEXITY_NOTE, FIGURE_CAPTIONS, fmt_num
from fixq.errors import FixqError

__all__ = ["render_html", "ReportError"]


class ReportError(FixqError):
    """The folder is not a fixq run folder."""


def _table(headers: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{html.escape(x)}</th>" for x in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt_num(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(f: dict | None) -> str:
    """``8b 3D F4..7``, ``U8b 4D F5..5`` for unsigned data (the same words as report.md's layer table)."""
    return "-" if not f else (f"{'' if f.get('signed', True) else 'U'}{f['T']}b {f['granularity']} "
                              f"F{f.get('F_min', '')}..{f.get('F_max', '')}")


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{color:#666;font-size:12px}"""


def render_html(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render ``run_dir/report.json`` (and any PNG beside it) to ``report.html``."""
    d = Path(run_dir)
    rp = d / "report.json"
    if not rp.is_file():
        raise ReportError(f"{d} has no report.json: run `fixq quantize` or `fixq sweep` with --out {d} first")
    try:
        rep = json.loads(rp.read_text())
    except ValueError as e:
        raise ReportError(f"{rp} is not valid JSON ({e})") from None
    parts = [f"<h1>fixq report: {html.escape(str(rep.get('model')))}</h1>"]
    im = rep.get("images", {})
    parts.append(f"<p>Calibration: {im.get('n_calib')} images from <code>{html.escape(str(im.get('calib_dir')))}</code>; "
                 f"evaluation: {im.get('n_eval')} images from <code>{html.escape(str(im.get('eval_dir')))}</code> "
                 f"(seed {im.get('seed')}).</p>")
    if rep.get("preprocess"):
        parts.append(f"<p>Preprocessing: <code>{html.escape(str(rep['preprocess']))}</code></p>")
    if (im.get("skipped_images") or {}).get("n"):
        parts.append(f"<p>Skipped {im['skipped_images']['n']} unreadable images (--skip-bad-images).</p>")
    fl = rep.get("float", {})
    rows = rep.get("rows") or ([rep["row"]] if "row" in rep else [])
    head = ["<coeff,data>", "mode", "method", "top-1 err %", "top-5 err %", "agreement %", "M MACs <8b,8b>"]
    table = [["<flp,flp>", "-", "float", fl.get("top1_error"), fl.get("top5_error"), 100.0,
              rep.get("complexity_float", {}).get("rel_complexity_mmacs")]]
    table += [[r["format"], f"{r['coeff_mode']}/{r['data_mode']}", r["method"], r["quant_top1_error"],
               r["quant_top5_error"], r["agreement_top1"], r["rel_complexity_mmacs"]] for r in rows]
    if any("plan" in r for r in rows):
        head = ["#", "plan"] + head
        table = [["-", "-"] + table[0]] + [[i + 1, r.get("plan", "-")] + t for i, (r, t) in
                                         enumerate(zip(rows, table[1:]))]
    parts += ["<h2>Accuracy and complexity</h2>", _table(head, table),
              f"<p>{html.escape(rep.get('complexity_note', COMPLEXITY_NOTE))}</p>"]
    if rep.get("layers"):
        lt = [[x["name"], x["kind"], _fmt(x.get("coeff_format")), _fmt(x.get("data_format")),
               "-" if not x.get("acc_format") else
               f"A{x['acc_format']['A']} F{x['acc_format']['F_min']}..{x['acc_format']['F_max']}", x.get("sqnr_db"),
               (x.get("saturations") or {}).get("data", 0), (x.get("saturations") or {}).get("acc", 0),
               x.get("rel_complexity_mmacs")] for x in rep["layers"]]
        parts += ["<h2>Layers</h2>", _table(["layer", "op", "coefficients", "output data", "accumulator", "SQNR dB",
                                             "data sat.", "acc sat.", "M MACs <8b,8b>"], lt)]
    cx = rep.get("complexity")
    if cx:
        ct = [[x["name"], x["macs"], x["coeff_bits"], x["data_bits"], x["rel_complexity_mmacs"], x["storage_bits"] // 8]
              for x in cx["layers"]]
        t = cx["total"]
        ct.append(["total", t["macs"], "", "", t["rel_complexity_mmacs"], t["storage_bytes"]])
        parts += ["<h2>Complexity and storage</h2>",
                  _table(["layer", "MACs", "coeff", "data", "M MACs <8b,8b>", "storage B"], ct),
                  f"<p>Savings vs &lt;8b,8b&gt;: {t['savings_vs_8b8b_pct']:.1f}%, vs float: "
                  f"{t['savings_vs_float_pct']:.1f}%.</p>"]
    pngs = sorted(d.glob("*.png"))
    if pngs:
        parts.append("<h2>Plots</h2>")
        parts += [_img(p, FIGURE_CAPTIONS.get(p.stem, p.stem.replace("_", " "))) for p in pngs]
    if rep.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in rep["notes"]) + "</ul>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>fixq report</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    target = Path(out) if out else d / "report.html"
    target.write_text(page)
    return target
