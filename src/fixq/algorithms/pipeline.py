"""The end-to-end flow shared by the ``fixq`` command and the Python API:
load model + data once, then calibrate -> plan -> simulate -> evaluate per config."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fixq.analysis.complexity import analyze
from fixq.analysis.evaluate import EvalResult, evaluate_quant, float_logits, topk_errors
from fixq.backends.simulate import Simulator
from fixq.data.images import DataError, ImageSet, class_mapping, known_classes, select_subsets
from fixq.data.stream import ImageStream, default_workers, find_bad_images
from fixq.data.zoo import PRESETS, ModelError, Preprocess, build_model
from fixq.graph.capture import capture
from fixq.graph.ir import Graph
from fixq.planning.partitions import propagate_formats
from fixq.planning.plan import Formats, QuantConfig, QuantPlan
from fixq.util import distributed as dist
from .calibrate import Observations, needs_histograms, observe, plan_from
from .learned import learn_rounding

__all__ = ["Session", "open_session", "RunResult", "run_config", "layer_table", "strict_float32", "method_label"]


def strict_float32() -> None:
    """CUDA convolutions and matmuls default to TF32 (10-bit mantissa) on Ampere and later;
    a float reference and the fast simulation must be real float32."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@dataclass
class Session:
    """A captured model with its calibration and evaluation images (streams: decoded batch by
    batch at every pass, never held whole), labels and float reference logits."""

    model_name: str
    graph: Graph
    preprocess: Preprocess
    calib_stream: ImageStream
    eval_stream: ImageStream
    eval_y: torch.Tensor
    float_logits: torch.Tensor
    float_top1: float
    float_top5: float
    images: dict
    device: torch.device
    batch_size: int = 128
    show_progress: bool = True
    timings: dict = field(default_factory=dict)
    weights: str | None = None
    _obs: Observations | None = None

    def observations(self, histograms: bool = False) -> Observations:
        """Calibration statistics, computed once per session (again only if histograms are
        needed later and were not collected): every configuration shares them."""
        if self._obs is None or (histograms and not self._obs.histograms):
            self._obs = observe(self.graph, self.calib_stream, self.device, histograms, self.show_progress)
        return self._obs


def _digest(names) -> str:
    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]


def _without_bad(s: ImageSet, idx, pre, batch_size, workers, show) -> tuple[tuple, list[str]]:
    """``--skip-bad-images``: the readable ones of ``idx`` and the unreadable files."""
    bad = set(find_bad_images(s, idx, pre, batch_size, workers, show))
    if len(bad) == len(idx):
        raise DataError(f"no readable images selected from {s.root}")
    return tuple(i for k, i in enumerate(idx) if k not in bad), [s.files[idx[k]] for k in sorted(bad)]


def open_session(model: str, calib: str, eval_dir: str, weights: str | None = None,
                 calib_size: int | None = 512, eval_size: int | None = None, seed: int = 0,
                 preprocess: Preprocess | None = None, input_shape: tuple[int, ...] | None = None,
                 batch_size: int = 128, workers: int | None = None, device: str = "cpu",
                 show_progress: bool = True, module: torch.nn.Module | None = None,
                 skip_bad_images: bool = False, labels: str | None = None) -> Session:
    """Build/load the model, pick disjoint seeded image subsets, capture the graph and run
    the float reference once (images are decoded batch by batch, by ``workers`` processes;
    default: the CPUs available). The evaluation folder's classes are checked against the
    model's outputs (and mapped by name where the zoo knows the class names); ``labels``
    reads a flat evaluation folder with a labels file instead (:func:`fixq.data.images.scan_labelled`). With
    ``skip_bad_images`` unreadable images are left out and listed in ``images``. Under
    ``torchrun`` each rank streams its share of the batches (:mod:`fixq.util.distributed`).

    >>> s = open_session("cifar10-resnet20", "cifar10-test", "cifar10-test",
    ...                  weights="resnet20.th", calib_size=512)      # doctest: +SKIP
    """
    t0 = time.time()
    device = dist.init_from_env(device)
    workers = default_workers() if workers is None else workers
    if module is None:
        net, entry = build_model(model, weights, input_shape)
    else:
        net, entry = module.eval(), None
    if preprocess is None:
        if entry is None:
            raise ModelError(f"model {model!r} is not in the zoo: give --preprocess (imagenet, cifar10, "
                             "digits, mnist...) and --input-shape")
        preprocess = PRESETS[entry.preprocess]
    eset = ImageSet.scan(eval_dir, labels)
    cset = eset if labels is not None and Path(calib).resolve() == eset.root.resolve() else ImageSet.scan(calib)
    split = select_subsets(cset, eset, calib_size, eval_size, seed)
    kind = entry.classes if entry is not None else None
    if known_classes(kind) is not None:  # folder names checked before any image is decoded
        class_mapping(eset, len(known_classes(kind)), kind)
    c_idx, e_idx, bad_c, bad_e = split.calib, split.eval, [], []
    if skip_bad_images:
        c_idx, bad_c = _without_bad(cset, c_idx, preprocess, batch_size, workers, show_progress)
        e_idx, bad_e = _without_bad(eset, e_idx, preprocess, batch_size, workers, show_progress)
    dev = torch.device(device)
    pin = dev.type == "cuda"
    cstream = ImageStream(cset, c_idx, preprocess, batch_size, workers, pin)
    estream = ImageStream(eset, e_idx, preprocess, batch_size, workers, pin)
    x2 = cstream.first(2)
    if input_shape is not None and tuple(x2.shape[1:]) != tuple(input_shape):
        raise DataError(f"images preprocess to {tuple(x2.shape[1:])} but --input-shape is "
                        f"{tuple(input_shape)}: adjust --resize/--crop/--grayscale")
    if dev.type == "cuda":
        strict_float32()
    net = net.to(dev)
    graph = capture(net, x2.to(dev))
    del x2
    out_shape = graph.shapes.get(graph.output, ())
    ye = estream.labels()
    if len(out_shape) == 1:  # a classifier: folder classes must fit its outputs
        mapping = class_mapping(eset, out_shape[0], kind)
        if mapping is not None:
            ye = mapping[ye]
    t1 = time.time()
    fl = float_logits(graph, estream, batch_size, dev, show_progress)
    t1e, t5e = topk_errors(fl, ye)
    calib_files, eval_files = cstream.files(), estream.files()
    images = {"calib_dir": str(cset.root), "eval_dir": str(eset.root), "seed": seed,
              "same_folder": split.same_folder, "n_calib": len(calib_files), "n_eval": len(eval_files),
              "calib_files": calib_files, "eval_files_sha1": _digest(eval_files), "eval_files": eval_files}
    if labels is not None:
        images["labels_file"] = str(labels)
    if skip_bad_images:
        images["skipped_images"] = {"n": len(bad_c) + len(bad_e), "calib": sorted(bad_c), "eval": sorted(bad_e)}
    return Session(model, graph, preprocess, cstream, estream, ye, fl, t1e, t5e, images, dev, batch_size,
                   show_progress, {"load_s": t1 - t0, "float_eval_s": time.time() - t1}, weights)


@dataclass
class RunResult:
    config: QuantConfig
    plan: QuantPlan
    result: EvalResult
    exact: bool
    seconds: float
    codes_rows: list | None = None   # per-layer rows of learned rounding / bias correction (fixq.algorithms.learned)
    codes_label: str | None = None

    def row(self, session: Session) -> dict:
        d = self.config.default
        cost = analyze(session.graph, self.plan).to_json()["total"]
        extra = {} if self.codes_label is None else {"codes": self.codes_label}
        return {**extra, "format": f"<{_b(d.coeff_bits)},{_b(d.data_bits)}>", "coeff_mode": d.coeff_mode,
                "data_mode": d.data_mode, "method": method_label(d), "rounding": self.config.rounding,
                "acc_bits": d.acc_bits, "float_top1_error": session.float_top1,
                "float_top5_error": session.float_top5, "quant_top1_error": self.result.top1_error,
                "quant_top5_error": self.result.top5_error, "agreement_top1": self.result.agreement_top1,
                "rel_complexity_mmacs": cost["rel_complexity_mmacs"], "storage_bytes": cost["storage_bytes"],
                "seconds": self.seconds}


def method_label(d) -> str:
    """``maxabs`` when coefficients and data share a method, else ``maxabs/mse`` (coeff/data);
    ``+signed`` when unsigned data formats were turned off."""
    m = d.method if d.effective_data_method == d.method else f"{d.method}/{d.effective_data_method}"
    return m + ("+signed" if d.data_sign == "signed" else "")


def _b(bits) -> str:
    return "flp" if bits is None else f"{bits}b"


def run_config(session: Session, config: QuantConfig, exact: bool = False,
               plan: QuantPlan | None = None, codes=None) -> RunResult:
    """Calibrate (unless a plan is given), decide the coefficient codes when ``codes`` (a
    :class:`fixq.algorithms.learned.RoundingOptions`) asks, simulate and evaluate one configuration."""
    t0 = time.time()
    if plan is None:
        obs = session.observations(needs_histograms(session.graph, [config]))
        plan = plan_from(obs, config, session.model_name)
    rows = None
    if codes is not None:
        plan, rows = learn_rounding(session.graph, plan, session.calib_stream.tensor(), codes, session.device,
                                    session.show_progress)
    sim = Simulator(session.graph, plan, exact=exact, device=session.device)
    res = evaluate_quant(sim, session.eval_stream, session.eval_y, session.float_logits,
                         session.batch_size, show_progress=session.show_progress)
    return RunResult(config, plan, res, exact, time.time() - t0, rows, None if codes is None else codes.label())


def layer_table(session: Session, run: RunResult) -> list[dict]:
    """Per-layer rows for report.json: shapes, formats, SQNR, saturation counts."""
    g, plan = session.graph, run.plan
    fmts = propagate_formats(g, plan.tensors)
    cost = {c.name: c for c in analyze(g, plan).layers}
    rows = []
    for n in g.nodes:
        if n.name not in run.result.sqnr_db and n.name not in plan.layers:
            continue
        lp = plan.layers.get(n.name)
        f = plan.tensors.get(n.name)
        row = {"name": n.name, "kind": n.kind,
               "input_shape": list(g.shapes.get(n.inputs[0], ())) if n.inputs else [],
               "output_shape": list(g.shapes.get(n.name, ())),
               "data_format": None if f is None else _fmt_summary(f),
               "sqnr_db": run.result.sqnr_db.get(n.name),
               "saturations": run.result.saturations.get(n.name, {})}
        if lp is not None:
            row.update({"weight_shape": list(n.weight.shape),
                        "coeff_format": None if lp.weight is None else _fmt_summary(lp.weight),
                        "bias_format": None if lp.bias is None else _fmt_summary(lp.bias),
                        "acc_format": None if lp.acc_F is None else
                        {"A": lp.acc_bits, "F_min": min(lp.acc_F), "F_max": max(lp.acc_F),
                         "overflow": lp.acc_overflow},
                        "input_format": None if fmts[n.inputs[0]][0] is None else f"{fmts[n.inputs[0]][0]}b",
                        "macs": cost[n.name].macs, "rel_complexity_mmacs": cost[n.name].rel_complexity_mmacs,
                        "notes": list(lp.notes)})
        rows.append(row)
    return rows


def _fmt_summary(f) -> dict:
    parts = f.F if isinstance(f, Formats) else f.mu
    d = {"T": f.T, "granularity": f.granularity, "partitions": len(parts)}
    if isinstance(f, Formats):
        d.update({"F_min": min(f.F), "F_max": max(f.F)})
        if not f.signed:
            d["signed"] = False
    else:
        d["affine"] = True
    return d

