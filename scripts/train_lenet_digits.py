"""Train the bundled LeNet on scikit-learn's digits (train split) with a fixed seed.

    python scripts/train_lenet_digits.py          # writes src/fixq/data/lenet-digits.pt

Takes a few seconds on a CPU. The demo evaluates on the 600 held-out images.
"""
import tempfile
from pathlib import Path

import torch

from fixq.analysis.evaluate import topk_errors
from fixq.data.digits import export_digits
from fixq.data.images import ImageSet, load_images
from fixq.data.zoo import PRESETS, LeNet, bundled_weights_path


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        sets = {s: ImageSet.scan(export_digits(Path(tmp) / s, s)) for s in ("train", "test")}
        data = {s: load_images(v, range(len(v)), PRESETS["digits"], show_progress=False) for s, v in sets.items()}
    (x, y), (xt, yt) = data["train"], data["test"]
    model = LeNet(8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for epoch in range(40):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        t1, _ = topk_errors(model(xt), yt)
    print(f"test top-1 error {t1:.2f}% on {len(xt)} held-out digits")
    out = bundled_weights_path("lenet-digits")
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
