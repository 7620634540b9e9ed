"""The searches' acceptance rule (issue #13): a paired upper confidence bound of the top-1
drop against float on the tuning images, so that a plan whose advantage lies inside the
noise of the tuning set is not accepted."""
import math

import torch

from fixq.algorithms.mixed import Trial, tune_threshold
from fixq.algorithms.acceptance import accepts, paired_drop, resolution, resolution_text


def _case(n, b, c, n_float_wrong=100):
    """Labels, float logits and plan logits with b images float-right/plan-wrong and c the reverse."""
    y = torch.zeros(n, dtype=torch.long)
    ref = torch.zeros(n, 2)
    ref[:, 0] = 1.0
    ref[:n_float_wrong] = torch.tensor([0.0, 1.0])  # float wrong on the first images
    q = ref.clone()
    q[n_float_wrong:n_float_wrong + b] = torch.tensor([0.0, 1.0])  # float right, plan wrong
    q[:c] = torch.tensor([1.0, 0.0])  # float wrong, plan right
    return q, ref, y


def test_paired_drop_hand_computed():
    q, ref, y = _case(1000, b=30, c=22)
    d = paired_drop(q, ref, y)
    drop = (30 - 22) / 1000
    sd = math.sqrt(((30 + 22) / 1000 - drop ** 2) / 1000)
    assert d["discordant"] == 52 and d["n"] == 1000
    assert math.isclose(d["drop"], 100 * drop) and math.isclose(d["se"], 100 * sd)
    # identical predictions: no noise, no margin
    same = paired_drop(ref, ref, y)
    assert same["drop"] == same["se"] == 0.0


def test_margin_rejects_what_the_noise_could_explain():
    # apparent drop 0.8 < allowed 1.0, but 52 images differ from the base plan (= float
    # here): margin one standard error, 0.72 points
    q, ref, y = _case(1000, b=30, c=22)
    ok, d = accepts(q, ref, ref, y, allowed=1.0)
    assert not ok and d["drop"] <= 1.0 < d["bound"] and math.isclose(d["margin"], paired_drop(q, ref, y)["se"])
    ok, d = accepts(q, ref, ref, y, allowed=1.0, z=0.0)  # without the margin: the naive rule accepts
    assert ok
    # few images differ: the same rule accepts
    q, ref, y = _case(1000, b=5, c=0)
    assert accepts(q, ref, ref, y, allowed=1.0)[0]
    # the margin is the noise against the base plan, not against float: a trial equal to
    # the base plan has no margin whatever the base plan's own drop
    assert accepts(q, q, ref, y, allowed=0.5)[1]["margin"] == 0.0


def test_noisy_error_curve_is_never_accepted_beyond_the_noise():
    """Plans whose true drop (1.2 points) exceeds the allowed 1.0: on 1,000 tuning images
    the naive rule (measured drop <= allowed) accepts many of them; one standard error of
    margin (z = 1) accepts about 10% (normal tail beyond 1.3 sd), z = 1.645 under 5%."""
    g = torch.Generator().manual_seed(0)
    n, allowed, naive, margin, strict = 1000, 1.0, 0, 0, 0
    reps = 400
    for _ in range(reps):
        # per image: plan differs from float on 4% of images; net true drop 1.2 points
        u = torch.rand(n, generator=g)
        b = int((u < 0.026).sum())           # float right, plan wrong (2.6%)
        c = int(((u >= 0.026) & (u < 0.040)).sum())  # the reverse (1.4%)
        q, ref, y = _case(n, b, c, n_float_wrong=max(c, 100))
        naive += accepts(q, ref, ref, y, allowed, z=0.0)[0]
        margin += accepts(q, ref, ref, y, allowed)[0]
        strict += accepts(q, ref, ref, y, allowed, z=1.645)[0]
    assert naive / reps > 0.25         # the noise does make bad plans look good...
    assert margin / reps <= 0.15       # ...the one-standard-error margin refuses most of them
    assert strict / reps <= 0.05


def test_tuner_keeps_only_trials_the_rule_accepted():
    # every trial's measured error is under the target, but only f <= 0.1 pass the rule
    r = tune_threshold(lambda f: Trial(f, "global", 10.0, 1 - f, 100 * f, 100 * f, f <= 0.1), target=11.0,
                       max_trials=12)
    assert r.best is not None and r.best.f <= 0.1 and r.best.top1_error <= 11.0
    # thresholds above the first refused one are never kept, though their error is under the target
    assert max(t.f for t in r.trials if t.f < 1.0) > 0.1  # (f = 1 is the probe of the range's top)


def test_report_and_acceptance_count_tied_logits_alike():
    # integer logits tie often; the reports' top-1 (topk_errors) and the acceptance rule
    # (paired_drop, argmax) must call the same images right, or a trial's reported drop
    # and the drop it was accepted on differ
    from fixq.analysis.evaluate import topk_errors
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (2000,), generator=g)
    ref = torch.nn.functional.one_hot(y, 10).float() * 5
    q = torch.randint(0, 3, (2000, 10), generator=g).float()  # many ties at the top
    assert int((q == q.max(1, keepdim=True).values).sum(1).gt(1).sum()) > 500
    d = paired_drop(q, ref, y)["drop"]
    assert math.isclose(topk_errors(q, y)[0] - topk_errors(ref, y)[0], d, abs_tol=1e-9)
    assert math.isclose(topk_errors(q, y)[0], 100.0 * float((q.argmax(1) != y).double().mean()), abs_tol=1e-9)


def _swapped(base, y, k):
    """``base`` with ``k`` right and ``k`` wrong images swapped: the same top-1 error, ``2k``
    images discordant with it."""
    q = base.clone()
    right = torch.nonzero(base.argmax(1) == y).flatten()[:k]
    wrong = torch.nonzero(base.argmax(1) != y).flatten()[:k]
    q[right], q[wrong] = q[right].flip(1), q[wrong].flip(1)
    return q


def test_resolution_is_the_acceptance_rules_boundary():
    """resolution()'s max_discordant: a trial with the all-base plan's error (as many images right
    to wrong as wrong to right against it) is accepted exactly when its discordant images are at
    most that many, across sizes, budgets and margins (exact boundaries included: k = 36 and 6 are
    where the bound equals the allowed drop); the sentence names the numbers."""
    cases = ((436, 2, 1.0, 1.0), (1000, 3, 1.0, 1.0), (1000, 0, 0.5, 2.0), (300, 1, 2.0, 1.0),
             (1000, 0, 0.6, 1.0), (1000, 4, 1.0, 1.0), (436, 0, 1.0, 1.645))
    for n, b_base, allowed, z in cases:
        base, ref, y = _case(n, b=b_base, c=0)  # the all-base plan: b_base images worse than float
        r = resolution(n, paired_drop(base, ref, y)["drop"], allowed, z)
        k = r["max_discordant"]
        room = min(int((base.argmax(1) == y).sum()), int((base.argmax(1) != y).sum()))
        assert 0 <= k and k % 2 == 0 and (k + 4) // 2 <= room, (n, k, room)
        for m in range(0, k + 5, 2):
            assert accepts(_swapped(base, y, m // 2), base, ref, y, allowed, z)[0] == (m <= k), (n, m, k)
    assert resolution(1000, 0.0, 0.6)["max_discordant"] == 36  # bound = allowed exactly at 36
    r = resolution(436, 2 * 100 / 436, 1.0)
    assert r["max_discordant"] == 4 and math.isclose(r["image_points"], 100 / 436)
    text = resolution_text(r, "the all-8-bit plan")
    assert "0.23 points" in text and "0.46 points worse than float" in text and "at most 4 of the 436" in text
    assert resolution(436, 0.46, 1.0, z=0.0)["max_discordant"] is None
    assert "however many" in resolution_text(resolution(436, 0.46, 1.0, z=0.0))
    assert resolution(436, 1.2, 1.0)["max_discordant"] == -1 == resolution(436, 1.2, 1.0, z=0.0)["max_discordant"]
    assert "no trial" in resolution_text(resolution(436, 1.2, 1.0))
    assert resolution(10, 0.0, 50.0)["max_discordant"] == 10  # at most n
