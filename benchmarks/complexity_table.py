"""AlexNet complexity in the paper's Table 1 and Table 2 (complexity column) form.

    python benchmarks/complexity_table.py      # writes benchmarks/results/complexity_alexnet.md

torchvision's AlexNet (no groups) has 714.2 M MACs; the paper's MatConvNet AlexNet 724 M.
"""
import time
from pathlib import Path

import torch

from fixq.analysis.complexity import analyze, mac_cost
from fixq.graph.capture import capture
from fixq.analysis.report import markdown_table
from fixq.data.zoo import build_model


def main() -> None:
    model, _ = build_model("alexnet")
    g = capture(model, torch.zeros(1, 3, 224, 224), check=False)
    cost = analyze(g)
    conv2 = next(c for c in cost.layers if c.name == "features.3")
    mm = conv2.macs / 1e6
    t1 = markdown_table(["<coeff,data>", "relative complexity [M MACs]", "paper Table 1"], [
        ["<8b,8b>", mm * mac_cost(8, 8), "224 = HPWMN"], ["<4b,8b>", mm * mac_cost(4, 8), "112"],
        ["<4b,4b>", mm * mac_cost(4, 4), "56"], ["<flp,flp>", mm * mac_cost(None, None), ">= 2016"]])
    total = cost.macs / 1e6
    t2 = markdown_table(["<coeff,data>", "fixq (torchvision AlexNet) [M MACs]", "paper Table 2 (MatConvNet AlexNet)"], [
        ["<flp,flp>", total * mac_cost(None, None), "6516"], ["<8b,flp>", total * mac_cost(8, None), "2172"],
        ["<8b,8b>", total * mac_cost(8, 8), "724"], ["<4b,8b>", total * mac_cost(4, 8), "-"]])
    per_layer = markdown_table(["layer", "N", "M", "HxW", "P", "MACs"],
                               [[c.name, c.N, c.M, f"{c.H}x{c.W}", c.P, c.macs] for c in cost.layers])
    text = (f"Command: `python benchmarks/complexity_table.py`; {time.strftime('%Y-%m-%d')} (pure arithmetic, "
            f"no data)\n\nTable 1 form: AlexNet conv2 (`features.3`, N={conv2.N}, M={conv2.M}, H=W={conv2.H}, "
            f"P={conv2.P} = 27x27), {conv2.macs:,} MACs\n\n{t1}\n\nTable 2 form (whole network, "
            f"{cost.macs:,} MACs)\n\n{t2}\n\nPer layer\n\n{per_layer}\n")
    out = Path(__file__).parent / "results" / "complexity_alexnet.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
