"""Checks of the training tools' logic that need no GPU and no training:
the subject-sorted renderer, batch drawing and recipes, the window's
learning-rate schedule and stopping rule, the ship decision, the size
limits and the model card's table, and batched evaluation.

    python3 tools/train/selftest.py          # about a minute on one core

Needs torch, diffusers, transformers and safetensors (tools/train/README.md).
Exits non-zero on the first failure.
"""

import json
import os
import random
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tools", "eval"))

import ship  # noqa: E402
import train  # noqa: E402
import world  # noqa: E402

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


@check
def sorted_render_equals_masked_render():
    b = world.draw_batch(random.Random(3), 6)
    subjects = [world.SUBJECTS.index(c["subject"]) for c in b["items"]]
    assert subjects == sorted(subjects), subjects
    assert b["subject_counts"] == [subjects.count(k) for k in range(len(world.SUBJECTS))]
    slow = world.render(b["params"], 4, 32, "cpu")
    for chunk in (32, 4):
        fast = world.render_batch(b, 4, 32, "cpu", chunk=chunk)
        assert fast.shape == (6, 4, 3, 32, 32), fast.shape
        assert torch.equal(fast, slow), (chunk, float((fast - slow).abs().max()))


@check
def render_rejects_wrong_subject_counts():
    b = world.draw_batch(random.Random(4), 3)
    try:
        world.render(b["params"], 2, 16, "cpu", subject_counts=[1, 1])
    except ValueError as e:
        assert "subject_counts" in str(e) and "8 counts" in str(e), e
    else:
        raise AssertionError("accepted 2 counts for 8 subjects")


@check
def default_recipe_draws_as_before():
    # The default recipe must not change what the shipped model's recipe draws.
    a, b = random.Random(7), random.Random(7)
    for _ in range(50):
        assert world.sample_choices(a) == world.sample_choices(b, recipe=world.Recipe())


@check
def recipe_weights_shift_the_draw():
    r = world.Recipe(action_weights=world.parse_weights("left=50"), camera_weights={"static": 0.0})
    rng = random.Random(0)
    items = [world.sample_choices(rng, recipe=r) for _ in range(400)]
    left = sum(c["action"] == "left" for c in items) / len(items)
    assert left > 0.7, left
    assert all(c["camera"] != "static" or c["scene"] == "plain" for c in items)
    for bad in ({"sideways": 1.0}, {"left": -1.0}):
        try:
            world.Recipe(action_weights=bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"accepted action weights {bad}")
    try:
        world.parse_weights("left")
    except ValueError as e:
        assert "NAME=NUMBER" in str(e)
    else:
        raise AssertionError("accepted a weight without a value")


@check
def canonical_share_uses_canonical_captions():
    r = world.Recipe(canonical_share=1.0)
    b = world.draw_batch(random.Random(1), 8, r)
    assert b["captions"] == [world.caption(c) for c in b["items"]]


@check
def window_schedule():
    base, warm = 1e-3, 0.05
    lrs = [train.window_lr(base, i / 100, warm) for i in range(101)]
    assert lrs[0] < 0.05 * base, lrs[0]
    assert abs(max(lrs) - base) < 1e-9 and abs(train.window_lr(base, warm, warm) - base) < 1e-12
    assert abs(lrs[-1] - 0.1 * base) < 1e-12, lrs[-1]
    after = lrs[5:]
    assert all(x >= y for x, y in zip(after, after[1:])), "not decreasing after the warm-up"


@check
def lr_rule():
    class A:
        clips, lr_ref_clips, lr = 96, 24, 3e-4
    for rule, want in (("sqrt", 6e-4), ("linear", 1.2e-3), ("none", 3e-4)):
        A.lr_rule = rule
        assert abs(train.lr_scale(A) - want) < 1e-12, (rule, train.lr_scale(A))


@check
def stopping_rule():
    # Clip budget.
    assert train.should_stop(1.0, 96, 0.1, 100.0, 96, 5.0)
    assert not train.should_stop(1.0, 88, 0.1, 100.0, 96, 5.0)
    # Time budget: the next step (twice) and the checkpoint margin must fit.
    assert not train.should_stop(80.0, 0, 2.0, 100.0, None, 5.0)
    assert train.should_stop(92.0, 0, 2.0, 100.0, None, 5.0)
    assert train.should_stop(96.0, 0, None, 100.0, None, 5.0)


def rates(c, d, k):
    return {"colour": {"correct": c, "total": 48}, "direction": {"correct": d, "total": 16},
            "camera": {"correct": k, "total": 24}}


@check
def ship_decision():
    ships, why = ship.decide(rates(20, 3, 4), rates(17, 1, 3))
    assert ships, why
    assert not ship.decide(rates(17, 1, 3), rates(17, 1, 3))[0], "a tie ships"
    ships, why = ship.decide(rates(30, 1, 0), rates(17, 1, 3))
    assert not ships and "camera 3->0" in why, why
    try:
        ship.decide(rates(20, 3, 4), {**rates(1, 1, 1), "camera": {"correct": 1, "total": 2}})
    except ship.ShipError as e:
        assert "differ in size" in str(e)
    else:
        raise AssertionError("compared evaluations of different sizes")


@check
def size_limits():
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "unet"))
        with open(os.path.join(d, "unet", "w.safetensors"), "wb") as f:
            f.truncate(2_000_000)
        assert ship.check_sizes(d, 16, 25) == 2_000_000
        try:
            ship.check_sizes(d, 1.5, 25)
        except ship.ShipError as e:
            assert "unet/w.safetensors (2.0 MB)" in str(e), e
        else:
            raise AssertionError("accepted a 2 MB file under a 1.5 MB limit")


@check
def card_table():
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "README.md"), "w") as f:
            f.write("# card\n\ntext\n")
        json.dump({"name": "x"}, open(os.path.join(d, "motif.json"), "w"))
        w1 = dict(start="2026-12-06 17:00:00 UTC", device="NVIDIA H100", minutes=5.5, steps=1200, clips_seen=115200,
                  heldout_loss_start=0.05, heldout_loss_end=0.04, candidate_rates=rates(20, 3, 4),
                  shipped_rates=rates(17, 1, 3), shipped=True)
        ship.log_card(d, [w1])
        ship.log_card(d, [w1, dict(w1, shipped=False)])
        ship.write_motif_json(d, [w1])
        text = open(os.path.join(d, "README.md")).read()
        assert text.startswith("# card\n\ntext\n") and text.count(ship.TABLE_START) == 1, text
        rows = [ln for ln in text.splitlines() if ln.startswith("| 2026-12-06")]
        assert len(rows) == 2 and "115,200" in rows[0] and "20/48 (was 17/48)" in rows[0], rows
        assert rows[0].endswith("| yes |") and rows[1].endswith("| no |"), rows
        assert json.load(open(os.path.join(d, "motif.json")))["windows"][0]["steps"] == 1200


@check
def batched_generation_equals_single():
    import eval as ev
    model = os.path.join(ROOT, "assets", "models", "default")
    pipe = ev.load_pipeline(model)
    defaults = dict(ev.model_defaults(model, 32, 4), steps=2)
    items = ev.held_out(2)
    both = ev.generate(pipe, items, defaults, 2, 5.0)
    one = ev.generate(pipe, items[1:], defaults, 2, 5.0)
    assert both.shape == (2, 4, 3, 32, 32), both.shape
    assert (both[1] - one[0]).abs().max() < 1e-4, float((both[1] - one[0]).abs().max())
    truth = ev.render_truths(items, 4, 32)
    assert torch.equal(truth[1], ev.render_truth(items[1], 4, 32))


def main():
    torch.set_num_threads(1)
    failed = 0
    for fn in CHECKS:
        try:
            fn()
            print(f"ok   {fn.__name__}", flush=True)
        except Exception as e:  # report every check, then fail
            failed += 1
            print(f"FAIL {fn.__name__}: {type(e).__name__}: {e}", flush=True)
    print(f"{len(CHECKS) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
