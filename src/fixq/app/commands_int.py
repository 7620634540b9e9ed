"""``fixq export-c``, ``fixq run-c`` and ``fixq accumulators``: the integer side."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fixq.analysis.accumulators import accumulator_table
from fixq.analysis.evaluate import DataError, ImageSet, load_images
from fixq.analysis.report import markdown_table, write_json
from fixq.backends.export_c import export_c, run_c_program
from fixq.backends.export_c.pixels import load_pixels
from fixq.backends.export_c.run import build
from fixq.backends.export_c.targets import build_target, runner_for, size_report
from fixq.backends.onnx_out import compare_qdq, export_qdq
from fixq.data.images import scan_flat, select_subsets
from fixq.data.zoo import Preprocess, build_model, require_weights
from fixq.graph.capture import capture
from fixq.numerics.formats import Word, quantize_codes
from fixq.planning.plan_io import load_plan
from fixq.planning.plan_schema import check_plan_graph
from .common import device_for, prepare_out, resolve_preprocess

__all__ = ["cmd_export_c", "wide_arena_reason", "cmd_run_c", "cmd_accumulators", "cmd_export_onnx"]


def _plan_and_graph(args):
    plan = load_plan(args.plan)
    if not args.model:
        args.model = plan.model
    require_weights(args.model, args.weights, args.random_weights)
    pre, shape = resolve_preprocess(args)
    model, entry = build_model(args.model, args.weights, shape)
    if shape is None:
        shape = pre.input_shape(entry.input_hw if entry else None)
    graph = capture(model, torch.zeros(1, *shape))
    check_plan_graph(plan, graph, args.plan)
    return plan, graph, pre


def cmd_export_c(args) -> int:
    plan, graph, pre = _plan_and_graph(args)
    prepare_out(args.out)
    pd = {k: v for k, v in asdict(pre).items() if (k, v) != ("interpolation", "bilinear")}  # as before: default omitted
    res = export_c(graph, plan, args.out, meta={"preprocess": pd, "weights": args.weights},
                   name=args.name, pack=not args.no_pack)
    if not args.no_build:
        build(res.out)
    print(f"wrote {res.out}/ (model.c, model.h: fixq_{res.name}_run, fixq_rt*.c/h, main.c, Makefile): "
          f"{res.n_calls} kernel calls, ROM {res.rom_bytes:,} bytes (weights and tables), RAM {res.ram_bytes:,} "
          f"bytes (caller-owned arena: {res.act_bytes:,} activations ({res.act_type}) + kernel scratch)")
    why = wide_arena_reason(res.act_words, res.act_type)
    if why:
        print(why)
    if res.tables:  # table functions (DESIGN §5b): each lookup table and its ROM
        own = [t for t in res.tables if not t["shared_with"]]
        print(f"lookup tables: {len(res.tables)} nodes, {len(own)} stored ({sum(t['bytes'] for t in res.tables):,} "
              "bytes of ROM with their channel index and saturation flags; listed in export.json)")
        for t in res.tables:
            shared = f", shares {t['shared_with']}" if t["shared_with"] else ""
            form = f" in {t['segments']:,} segments" if "segments" in t else ""
            print(f"  {t['node']} ({t['op']}): {t['tables']} x {t['entries']} {t['ctype']}{form}, {t['bytes']:,} bytes{shared}")
    for line in size_report(res.out):
        print(line)
    return 0


def wide_arena_reason(words, act_type: str) -> str | None:
    """Why the C activations are ``int16_t`` when every data word is 8 bits (DESIGN §2): an
    unsigned ``U(8,F)`` word needs 9 bits in a signed C type, and the arena has one type.
    ``words``: the data words export_c chose the arena type from (``ExportResult.act_words``).
    None when the arena is not int16_t or a wider data word asked for it.

    >>> wide_arena_reason([Word(8), Word(8, signed=False)], "int16_t")[:52]
    'note: activations are int16_t (2 bytes each) because'
    """
    unsigned8 = [w for w in words if not w.signed and int(w) == 8]
    if act_type != "int16_t" or not unsigned8 or any(int(w) + (0 if w.signed else 1) > 9 for w in words):
        return None
    return (f"note: activations are int16_t (2 bytes each) because {len(unsigned8)} of {len(words)} data words "
            "are unsigned 8-bit, U(8,F) (outputs the graph proves >= 0, e.g. after ReLU: --data-sign auto), and "
            "0..255 needs 9 bits in a signed C type; a plan made with --data-sign signed keeps every tensor in "
            "int8_t (half the activation RAM, one bit less resolution on those tensors)")


def _read_json(path) -> dict:
    """A JSON object fixq wrote earlier (images.json, export.json, report.json), or a one-line error."""
    try:
        d = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e})", hint="") from None
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a JSON object as fixq writes it", hint="")
    return d


def _image_index(args):
    s = scan_flat(args.data)
    if args.images:
        listed = _read_json(args.images).get("eval_files")
        if listed is None:
            raise DataError(f"{args.images} has no eval_files list (use the images.json of a quantize run)")
        pos = {f: i for i, f in enumerate(s.files)}
        missing = [f for f in listed if f not in pos]
        if missing:
            raise DataError(f"image {missing[0]} from {args.images} is not in {args.data}")
        idx = [pos[f] for f in listed]
    else:
        idx = list(range(len(s)))
    if args.n is not None:
        idx = idx[:args.n]
    return s, idx


def _images(args, pre: Preprocess):
    s, idx = _image_index(args)
    return load_images(s, idx, pre, show_progress=False)


def cmd_run_c(args) -> int:
    cdir = Path(args.cdir)
    if not (cdir / "export.json").is_file():
        raise DataError(f"{cdir} is not a fixq C export (no export.json): run `fixq export-c --out {cdir}` first")
    info = _read_json(cdir / "export.json")
    pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["preprocess"].items()})
    exe = build_target(cdir, args.target)
    runner = runner_for(args.target)
    if info.get("pixels"):  # the model's own pixel-to-code table (model.h) does the quantization
        s, idx = _image_index(args)
        out, sat = run_c_program(cdir, pixels=load_pixels(s, idx, pre), runner=runner, exe=exe)
    else:
        x, _ = _images(args, pre)
        F_in = torch.tensor(info["input_F"])
        F_in = F_in.reshape(1, -1, 1, 1) if F_in.numel() > 1 else F_in.reshape(())
        word = Word(info["input_T"], info.get("input_signed", True))
        codes, _ = quantize_codes(x.double(), F_in, word, info["rounding"])
        out, sat = run_c_program(cdir, codes.long(), runner=runner, exe=exe)
    F_out = torch.tensor(info["output_F"], dtype=torch.float64)
    logits = out.double() * torch.pow(2.0, -(F_out if F_out.numel() > 1 else F_out.reshape(())))
    np.save(args.out, logits.float().numpy())
    print(f"ran {exe} ({args.target}) on {out.shape[0]} images; outputs in {args.out}; saturations {sat}")
    return 0


def cmd_accumulators(args) -> int:
    plan, graph, pre = _plan_and_graph(args)
    s = ImageSet.scan(args.calib)
    idx = (select_subsets(s, s, args.calib_size, None, args.seed).calib if args.calib_size < len(s)
           else list(range(len(s))))
    x, _ = load_images(s, idx, pre, show_progress=False)
    rows = accumulator_table(graph, plan, x.to(device_for("cpu")))
    table = markdown_table(["layer", "S (sum F)", "calibrated I_acc", "A exact sum", "A bit-identical to A=32",
                            "acc sat. at plan A"],
                           [[r.name, f"{r.S_min}..{r.S_max}", r.acc_I_max, r.A_exact, r.A_identical,
                             r.saturations_at_plan] for r in rows])
    if args.out:
        write_json(args.out, {"model": args.model, "n_calib": len(idx), "rows": [asdict(r) for r in rows]})
    print(table)
    return 0


def cmd_export_onnx(args) -> int:
    plan, graph, pre = _plan_and_graph(args)
    out = Path(args.out)
    prepare_out(out.parent)
    export_qdq(graph, plan, out)
    plan_dir = Path(args.plan).parent
    if args.data is None and (plan_dir / "report.json").is_file():
        args.data = _read_json(plan_dir / "report.json").get("images", {}).get("eval_dir")
        if args.images is None and (plan_dir / "images.json").is_file():
            args.images = str(plan_dir / "images.json")
    msg = f"wrote {out} (QDQ, opset 13; passes onnx.checker)"
    if args.data is None:
        print(msg + "; no --data given: outputs not compared")
        return 0
    x, _ = _images(args, pre)
    cmp = compare_qdq(out, graph, plan, x)
    report = {"onnx": str(out), "plan": str(args.plan), "rounding": plan.rounding, **cmp}
    write_json(out.with_suffix(".report.json"), report)
    print(f"{msg}\nonnxruntime vs fixq simulation on {cmp['images']} images: top-1 agreement "
          f"{cmp['agreement_top1_pct']:.2f}%, max output difference {cmp['max_diff_output_steps']:g} output steps "
          f"({cmp['outputs_differing']} outputs differ)" + "".join(f"\n  - {r}" for r in cmp["reasons"]) +
          f"\nreport: {out.with_suffix('.report.json')}")
    return 0
