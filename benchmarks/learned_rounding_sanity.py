"""Sanity check of learned rounding on ResNet-20 (small: 128 calibration, 600 evaluation images, 150 steps/layer,
<4b,8b> 2D). Run from the repository root with PYTHONPATH=src and ../shared present (paths below)."""
import time
from fixq.algorithms.pipeline import open_session, run_config
from fixq.app.common import make_config
from fixq.algorithms.learned import learn_rounding, RoundingOptions
t=time.time()
s = open_session("cifar10-resnet20", "/work/shared/data/cifar10-test", "/work/shared/data/cifar10-test",
                 weights="/work/shared/models/cifar10-resnet/resnet20-12fca82f.th", calib_size=128, eval_size=600,
                 show_progress=False)
cfg = make_config("4", "8", "2D", "4D")
r = run_config(s, cfg)
print("float", s.float_top1, "plain", r.result.top1_error, "agree", r.result.agreement_top1, round(time.time()-t))
p2, rows = learn_rounding(s.graph, r.plan, s.calib_x, RoundingOptions(iters=150), show_progress=False)
r2 = run_config(s, cfg, plan=p2)
print("learned+bc", r2.result.top1_error, "agree", r2.result.agreement_top1, round(time.time()-t))
print(sum(x["kept"]=="learned" for x in rows), len(rows), [round(x["learned_error"]/x["nearest_error"],2) for x in rows])
