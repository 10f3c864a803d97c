"""Complexity accounting (asc_dist.complexity) and the DCASE 2024 baseline network (cp_mobile).

The reference numbers are the published table of CPJKU/dcase2024_task1_baseline (README.md,
"Baseline Complexity"): 61,148 parameters and 29,419,156 MACs on [1, 1, 256, 65].
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from asc_dist import complexity, config
from asc_dist.complexity import count
from asc_dist.models import MODELS, CPMobile, build_model, make_divisible

# README.md table of the reference: module -> (params, MACs); each Conv2dNormActivation is one row
# (conv + BN), the head's conv and BN are rows of their own.
REFERENCE_ROWS = {
    "in_c.0": (88, 304_144),
    "in_c.1": (2_368, 2_506_816),
    **{f"stages.s1.b{b}.block.{i}": row for b in (1, 2)
       for i, row in enumerate([(2_176, 2_228_352), (704, 626_816), (2_112, 2_228_288)])},
    "stages.s1.b3.block.0": (2_176, 2_228_352),
    "stages.s1.b3.block.1": (704, 331_904),
    "stages.s1.b3.block.2": (2_112, 1_179_712),
    "stages.s2.b4.block.0": (2_176, 1_179_776),
    "stages.s2.b4.block.1": (704, 166_016),
    "stages.s2.b4.block.2": (3_696, 1_032_304),
    "stages.s2.b5.block.0": (6_960, 1_935_600),
    "stages.s2.b5.block.1": (1_320, 311_280),
    "stages.s2.b5.block.2": (6_832, 1_935_472),
    "stages.s3.b6.block.0": (6_960, 1_935_600),
    "stages.s3.b6.block.1": (1_320, 311_280),
    "stages.s3.b6.block.2": (12_688, 3_594_448),
    "feed_forward.0": (1_040, 299_520),
    "feed_forward.1": (20, 20),
}


def _row(name: str) -> str:
    """The reference's row for one of our leaf layers: the Conv2dNormActivation it belongs to."""
    return name if name.startswith("feed_forward") else name.rsplit(".", 1)[0]


def test_cp_mobile_matches_the_published_table():
    c = count(CPMobile(), [1, 1, 256, 65])
    assert (c.params, c.macs) == (61_148, 29_419_156)
    assert c.param_bytes == {"fp32": 244_592, "fp16": 122_296, "int8": 61_148}
    # per layer: the rows add up to the totals, and to the reference's table row by row
    assert sum(layer.params for layer in c.layers) == c.params
    assert sum(layer.macs for layer in c.layers) == c.macs
    rows: dict[str, list[int]] = {}
    for layer in c.layers:
        if layer.params or layer.macs:
            acc = rows.setdefault(_row(layer.name), [0, 0])
            acc[0] += layer.params
            acc[1] += layer.macs
    assert {k: tuple(v) for k, v in rows.items()} == REFERENCE_ROWS
    assert sum(p for p, _ in REFERENCE_ROWS.values()) == 61_148  # the table's own sum
    assert sum(m for _, m in REFERENCE_ROWS.values()) == 29_419_156
    assert make_divisible(32 * 1.8) == 56 and make_divisible(32 * 1.8**2) == 104
    assert make_divisible(32 * 2.1) == 64 and make_divisible(56 * 2.1) == 120


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)  # 4*9 weights + 4 biases = 40
        self.bn = nn.BatchNorm2d(4)  # 8
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 5 * 6, 3)  # 360 + 3 = 363
        self.scale = nn.Parameter(torch.ones(2))  # held outside any leaf module

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc(y) + self.fc(y)  # shared weights: counted once, computed twice


def test_counter_on_a_hand_computed_model():
    model = _Tiny().train()
    c = count(model, [2, 1, 5, 6])
    by_name = {layer.name: layer for layer in c.layers}
    # conv: params x batch x output positions; BN: params x batch; linear: params x batch
    assert (by_name["conv"].params, by_name["conv"].macs) == (40, 40 * 2 * 5 * 6)
    assert (by_name["bn"].params, by_name["bn"].macs) == (8, 16)
    assert by_name["relu"].macs == 0 and by_name["conv"].output == [2, 4, 5, 6]
    fc = [layer for layer in c.layers if layer.name == "fc"]
    assert [(f.params, f.macs) for f in fc] == [(363, 726), (0, 726)]
    assert by_name["(other parameters)"].params == 2
    assert c.params == 40 + 8 + 363 + 2 == sum(p.numel() for p in model.parameters())
    assert c.macs == 2400 + 16 + 2 * 726
    assert sum(layer.params for layer in c.layers) == c.params
    assert model.training  # the mode is restored


def test_cp_mobile_trains_on_other_sizes():
    torch.manual_seed(0)
    model = build_model(config.load(["model.name=cp_mobile", "model.pretrained=none"]).model, 10)
    assert "cp_mobile" in MODELS and isinstance(model, CPMobile)
    x = torch.randn(2, 1, 64, 32)
    logits = model(x)
    assert logits.shape == (2, 10)
    nn.functional.cross_entropy(logits, torch.tensor([1, 7])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 7, 5)).shape == (1, 10)  # tiny inputs still work
    with pytest.raises(ValueError, match=r"\[B, 1, n_mels, T\]"):
        model(torch.randn(2, 3, 64, 32))


def test_cli_json_matches_the_function(capsys):
    args = ["conf/smoke.yaml", "model.name=cp_mobile"]
    assert complexity.main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = config.load(args)
    shape = [1, 1, cfg.features.n_mels, cfg.features.frames]
    c = count(build_model(cfg.model, cfg.num_classes, load_weights=False), shape)
    assert out["input"] == shape == [1, 1, 64, 32]
    assert (out["params"], out["macs"], out["param_bytes"]) == (c.params, c.macs, c.param_bytes)
    assert out["params"] == 61_148 and out["model"] == "cp_mobile"

    assert complexity.main([*args, "--layers"]) == 0
    text = capsys.readouterr().out
    assert "parameters  61,148" in text and f"MACs/clip   {c.macs:,}" in text
    assert "stages.s3.b6.block.2.0" in text
    assert text.rstrip().splitlines()[-1].split()[-2:] == ["61,148", f"{c.macs:,}"]


def test_cli_unknown_model_is_one_line(capsys):
    assert complexity.main(["model.name=vgg16", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "model.name='vgg16': unknown model" in err[0]
