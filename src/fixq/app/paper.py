"""``--paper``: the paper's choices in one switch (seed paper §3-§6).

fixq's defaults moved away from the paper where measurement said so (mse data ranges,
unsigned data after ReLU, DESIGN §2-§3). ``--paper`` puts every setting the paper fixes
back to the paper's value, so its tables can be reproduced beside the defaults:

======================  =========================  ==============================================
option (argparse dest)  paper value                where in the paper
======================  =========================  ==============================================
method, data_method     maxabs                     eq. 6, ``I = ceil(log2 max|x|)``
data_sign               signed                     eq. 3, ``Q(T,F)`` two's complement data
rounding                half_up                    the C-model's rounding (DESIGN §2)
acc_bits                32                         §4: accumulators quantized to 32 bits
acc_overflow            saturate                   clamp (DESIGN §2)
bias_bits               8                          Table 3: "all biases are in 8-bits"
learned_rounding        off                        eq. 4: every coefficient rounded (``round``)
fc_mode                 4D                         §3: "Fully connected layers are only treated as 4D"
exclude (mixed)         first,last                 §5 / Table 3: layers 1 and 18 stay <8b,8b>
order (mixed)           energy                     §5: the lowest-energy 2D filters go low first
exclude (kmeans)        first                      §6 / Table 6: every layer but layer 1 clustered
table4_others (kmeans)  flp                        Table 4: "all other layers are kept in <flp,flp>"
======================  =========================  ==============================================

Bits and coefficient partitions (4D/3D/2D, 8/4 bits) are what the paper's tables vary, so
they stay the user's options. Precedence: **an option the user gives explicitly wins**
over ``--paper`` wherever it appears on the command line; the report then names it as a
departure from the paper (``paper.departures``), so nothing is silently not the paper.

>>> import argparse
>>> a = argparse.Namespace(method=None, data_method=None, data_sign="auto", rounding="half_up", acc_bits=32,
...                        bias_bits=8, fc_mode="auto", paper=True)
>>> info = apply_paper(a, "quantize", explicit={"data_sign"})
>>> (a.method, a.data_method, a.data_sign, a.fc_mode, info["departures"])
('maxabs', 'maxabs', 'auto', '4D', ['--data-sign auto'])
"""
from __future__ import annotations
from fixq.planning.plan import QuantConfig
from fixq.planning.plan_schema import read_config

__all__ = ["PAPER_CHOICES", "apply_paper", "config_departures", "paper_sentence"]

# dest -> (value, reason); commands without the option skip it
PAPER_CHOICES: dict[str, tuple[object, str]] = {
    "method": ("maxabs", "maxabs coefficient ranges (eq. 6)"),
    "data_method": ("maxabs", "maxabs data ranges (eq. 6)"),
    "data_sign": ("signed", "signed Q(T,F) data (eq. 3)"),
    "rounding": ("half_up", "half-up rounding"),
    "acc_bits": (32, "32-bit accumulators (§4)"),
    "acc_overflow": ("saturate", "saturating accumulators"),
    "bias_bits": (8, "8-bit biases (Table 3)"),
    "fc_mode": ("4D", "fully connected layers 4D (§3)"),
    "learned_rounding": (False, "coefficients rounded to nearest, eq. 4 (no learned rounding)"),
}
_EXCLUDE = {"mixed": ("first,last", "first and last layers kept at base bits (§5, Table 3)"),
            "kmeans": ("first", "first layer not clustered (§6, Table 6)")}
_TABLE4 = ("flp", "Table 4 with every other layer in floating point")
_ORDER = ("energy", "lowest-energy 2D filters low first (§5)")


def _choices(command: str) -> dict:
    out = dict(PAPER_CHOICES)
    if command in _EXCLUDE:
        out["exclude"] = _EXCLUDE[command]
    if command == "kmeans":
        out["table4_others"] = _TABLE4
    if command == "mixed":
        out["order"] = _ORDER
    return out


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _given(dest: str, value) -> str:
    """How a departure reads: ``--flag value``, or ``--flag`` / ``--no-flag`` for an on/off option."""
    if isinstance(value, bool):
        return _flag(dest) if value else "--no-" + dest.replace("_", "-")
    return f"{_flag(dest)} {value}"


def apply_paper(args, command: str, explicit: set[str]) -> dict:
    """Set the paper's value on every option of ``args`` the user did not give explicitly
    (``explicit``: argparse dests seen on the command line). Returns the report's
    ``paper`` entry: ``{"used": [...], "departures": ["--flag value", ...]}``."""
    used, departures = [], []
    for dest, (value, why) in _choices(command).items():
        if not hasattr(args, dest):
            continue
        if dest == "data_method" and "method" in explicit and dest not in explicit:
            continue  # --method M given: the data follow it (make_config), as without --paper
        if dest in explicit:
            if str(getattr(args, dest)).lower() != str(value).lower() and not (
                    dest == "data_method" and getattr(args, dest) is None):
                departures.append(_given(dest, getattr(args, dest)))
            continue
        setattr(args, dest, value)
        used.append(why)
    if "method" in explicit and "data_method" not in explicit and hasattr(args, "data_method") \
            and str(args.method).lower() != "maxabs":
        args.data_method = None
    if getattr(args, "config", None):
        departures += config_departures(args.config)
    return {"used": used, "departures": departures}


def config_departures(path) -> list[str]:
    """Per-layer overrides of a ``--config`` file that set one of the paper's choices to
    another value: they win over ``--paper`` for their layers, and the report says so.

    >>> import json, tempfile, os
    >>> f = os.path.join(tempfile.mkdtemp(), "c.json")
    >>> _ = open(f, "w").write(json.dumps({"layer1.*": {"data_method": "mse", "coeff_bits": 4}}))
    >>> config_departures(f)
    ["--config 'layer1.*': data_method mse"]
    """
    out = []
    for pattern, kv in read_config(path, QuantConfig()).overrides:
        for key, value in kv.items():
            if key in PAPER_CHOICES and str(value).lower() != str(PAPER_CHOICES[key][0]).lower():
                out.append(f"--config {pattern!r}: {key} {value}")
    return out


def paper_sentence(info: dict | None) -> str:
    """One line for reports: which of the paper's choices were used, and what departs."""
    if not info:
        return ""
    s = "The paper's choices were used (--paper): " + ", ".join(info["used"])
    if info["departures"]:
        s += "; except, given explicitly: " + ", ".join(info["departures"])
    return s + "."
