import json

import numpy as np
import pytest
import torch

from asc_dist.metrics import ClassificationMeter, device_groups, format_report
from asc_dist.plots import plot_confusion, plot_per_class

CLASSES = ["airport", "bus", "metro", "park", "tram"]  # "tram" never appears as a label
CITIES = ["barcelona", "helsinki", "london"]
DEVICES = ["a", "b"]


def random_eval(n=203, seed=0):
    g = np.random.default_rng(seed)
    logits = g.normal(size=(n, len(CLASSES))) * 2
    labels = g.integers(0, len(CLASSES) - 1, size=n)
    # Make the model right more often than chance so accuracies are not all ~0.2.
    logits[np.arange(n), labels] += g.uniform(0, 3, size=n)
    valid = g.random(n) > 0.15
    city = [CITIES[i] for i in g.integers(0, len(CITIES), size=n)]
    device = [DEVICES[i] for i in g.integers(0, len(DEVICES), size=n)]
    return logits, labels, valid, {"city": city, "device": device}


def numpy_reference(logits, labels, valid):
    logits, labels = logits[valid], labels[valid]
    preds = logits.argmax(1)
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    per_class = {}
    for i, c in enumerate(CLASSES):
        m = labels == i
        per_class[c] = float((preds[m] == i).mean()) if m.any() else None
    present = [a for a in per_class.values() if a is not None]
    return {
        "accuracy": float((preds == labels).mean()),
        "classwise_accuracy": float(np.mean(present)),
        "per_class": per_class,
        "log_loss": float(-logp[np.arange(len(labels)), labels].mean()),
        "count": len(labels),
    }


def feed(meter, logits, labels, valid, groups, lo, hi, batch=16):
    for s in range(lo, hi, batch):
        e = min(s + batch, hi)
        meter.update(
            torch.tensor(logits[s:e], dtype=torch.float32),
            torch.tensor(labels[s:e]),
            torch.tensor(valid[s:e]),
            {k: v[s:e] for k, v in groups.items()},
        )


def test_matches_numpy_with_mask_and_empty_class():
    logits, labels, valid, groups = random_eval()
    meter = ClassificationMeter(CLASSES, groups={"city": CITIES, "device": DEVICES})
    feed(meter, logits, labels, valid, groups, 0, len(labels))
    report = meter.compute()
    ref = numpy_reference(logits.astype(np.float32).astype(np.float64), labels, valid)
    assert report["count"] == ref["count"] == int(valid.sum())
    assert report["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert report["classwise_accuracy"] == pytest.approx(ref["classwise_accuracy"], abs=1e-12)
    assert report["per_class"]["tram"] is None and report["class_counts"]["tram"] == 0
    for c in CLASSES[:-1]:
        assert report["per_class"][c] == pytest.approx(ref["per_class"][c], abs=1e-12)
    assert report["log_loss"] == pytest.approx(ref["log_loss"], rel=1e-9)
    conf = np.array(report["confusion"])
    assert conf.shape == (5, 5) and conf.sum() == ref["count"]
    assert conf[4].sum() == 0  # no true "tram" rows
    json.dumps(report)  # JSON-serialisable as is


def test_breakdowns_match_direct_computation():
    logits, labels, valid, groups = random_eval(seed=1)
    meter = ClassificationMeter(CLASSES, groups={"city": CITIES, "device": DEVICES})
    feed(meter, logits, labels, valid, groups, 0, len(labels))
    report = meter.compute()
    for name, vocab in (("city", CITIES), ("device", DEVICES)):
        values = np.array(groups[name])
        total = 0
        for v in vocab:
            sel = valid & (values == v)
            ref = numpy_reference(logits.astype(np.float32), labels, sel)
            got = report["breakdowns"][name][v]
            assert got["count"] == ref["count"]
            assert got["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
            assert got["classwise_accuracy"] == pytest.approx(ref["classwise_accuracy"], abs=1e-12)
            assert got["log_loss"] == pytest.approx(ref["log_loss"], rel=1e-6)
            total += got["count"]
        assert total == report["count"]


def test_device_groups_pool_the_devices_as_one_split_would():
    """real / seen / unseen (DCASE 2025's groups) and known / unknown equal the metrics of the
    pooled clips, computed directly."""
    devices = ["a", "b", "s1", "s2", "s4", "s7"]
    g = np.random.default_rng(5)
    logits, labels, valid, groups = random_eval(n=300, seed=4)
    groups["device"] = [devices[i] for i in g.integers(0, len(devices), size=300)]
    meter = ClassificationMeter(CLASSES, groups={"device": devices})
    feed(meter, logits, labels, valid, {"device": groups["device"]}, 0, 300)
    report = meter.compute()
    pooled = device_groups(report, known=["a", "s1", "s2"])
    assert set(pooled) == {"real", "seen", "unseen", "known", "unknown"}
    values = np.array(groups["device"])
    for name, members in (("real", ["a", "b"]), ("seen", ["s1", "s2"]), ("unseen", ["s4", "s7"]),
                          ("known", ["a", "s1", "s2"]), ("unknown", ["b", "s4", "s7"])):
        ref = numpy_reference(logits.astype(np.float32), labels, valid & np.isin(values, members))
        got = pooled[name]
        assert got["devices"] == members and got["count"] == ref["count"]
        assert got["classwise_accuracy"] == pytest.approx(ref["classwise_accuracy"], abs=1e-12)
        assert got["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
        assert got["log_loss"] == pytest.approx(ref["log_loss"], rel=1e-6)
    # no DCASE ids and no known devices: nothing to pool
    assert device_groups({"breakdowns": {"device": {"x": report["breakdowns"]["device"]["a"]}}}) == {}
    text = format_report({**report, "device_groups": pooled}, CLASSES)
    assert "| unseen | s4, s7 |" in text


def test_reduce_over_two_ranks_equals_one_meter():
    logits, labels, valid, groups = random_eval(n=150, seed=2)
    vocab = {"city": CITIES, "device": DEVICES}
    whole = ClassificationMeter(CLASSES, groups=vocab)
    feed(whole, logits, labels, valid, groups, 0, 150)
    rank0, rank1 = (
        ClassificationMeter(CLASSES, groups=vocab),
        ClassificationMeter(CLASSES, groups=vocab),
    )
    feed(rank0, logits, labels, valid, groups, 0, 70)
    feed(rank1, logits, labels, valid, groups, 70, 150)
    calls = []

    def reduce_on(other):  # what all_reduce(sum) does, in place, seen from one rank
        def reduce(t):
            calls.append(t.shape)
            t += other.state_tensor()
            return t

        return reduce

    r0, r1 = rank0.compute(reduce_on(rank1)), rank1.compute(reduce_on(rank0))
    expected = whole.compute()
    assert len(calls) == 2  # one collective per compute
    for r in (r0, r1):
        for key in (
            "count",
            "accuracy",
            "classwise_accuracy",
            "confusion",
            "per_class",
        ):
            assert r[key] == expected[key], key
        assert r["log_loss"] == pytest.approx(expected["log_loss"], rel=1e-12)
        for name, table in expected["breakdowns"].items():  # summed in another order: log loss
            for v, want in table.items():                    # to rounding, the rest exactly
                got = r["breakdowns"][name][v]
                assert got["log_loss"] == pytest.approx(want["log_loss"], rel=1e-12)
                assert {**got, "log_loss": 0} == {**want, "log_loss": 0}
    assert r0 == r1  # identical on every rank
    assert rank0.compute()["count"] < expected["count"]  # compute() did not alter local state


def test_bad_inputs_are_named():
    meter = ClassificationMeter(CLASSES, groups={"city": CITIES})
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="'paris'"):
        meter.update(logits, torch.tensor([0, 1]), group_values={"city": ["london", "paris"]})
    with pytest.raises(ValueError, match="group_values\\['city'\\]"):
        meter.update(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels outside"):
        ClassificationMeter(CLASSES).update(logits, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"\[B, 5\]"):
        ClassificationMeter(CLASSES).update(torch.zeros(2, 4), torch.tensor([0, 1]))


def test_report_text_and_plots(tmp_path):
    logits, labels, valid, groups = random_eval(n=60, seed=3)
    meter = ClassificationMeter(CLASSES, groups={"city": CITIES, "device": DEVICES})
    feed(meter, logits, labels, valid, groups, 0, 60)
    report = meter.compute()
    text = format_report(report, CLASSES)
    assert f"{report['classwise_accuracy']:.4f}" in text and "log-loss" in text
    assert "| tram" in text and "n/a" in text and "| london |" in text
    for fn, name in ((plot_confusion, "confusion.png"), (plot_per_class, "per_class.png")):
        out = fn(report, CLASSES, tmp_path / "plots" / name)
        assert out == tmp_path / "plots" / name
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "confusion.png",
        "per_class.png",
    ]
