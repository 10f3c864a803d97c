import pytest
import torch
import torch.nn.functional as F

from asc_dist import config
from asc_dist.config import LossConfig
from asc_dist.errors import ConfigError
from asc_dist.losses import FocalLoss, SoftCrossEntropy, build_loss

C = 10


def _logits(b=16, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, C, generator=g)).requires_grad_(True)


def _labels(b=16, seed=1):
    return torch.randint(0, C, (b,), generator=torch.Generator().manual_seed(seed))


def _value_and_grad(loss_fn, logits, target):
    logits = logits.detach().clone().requires_grad_(True)
    loss = loss_fn(logits, target)
    loss.backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize("soft", [False, True])
def test_focal_gamma0_alpha1_equals_cross_entropy(soft):
    logits = _logits()
    y = _labels()
    target = F.softmax(torch.randn(16, C), dim=-1) if soft else y
    fl, fl_grad = _value_and_grad(FocalLoss(C, gamma=0.0, alpha=1.0), logits, target)
    ce, ce_grad = _value_and_grad(F.cross_entropy, logits, target)
    assert torch.allclose(fl, ce, atol=1e-6, rtol=0)
    assert torch.allclose(fl_grad, ce_grad, atol=1e-6, rtol=0)
    assert torch.isfinite(fl_grad).all()
    sce, sce_grad = _value_and_grad(SoftCrossEntropy(), logits, target)
    assert torch.allclose(sce, ce, atol=1e-6, rtol=0)
    assert torch.allclose(sce_grad, ce_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_per_class_alpha_hard_labels(gamma):
    logits = _logits()
    y = _labels()
    alpha = torch.linspace(0.1, 2.0, C)
    loss = FocalLoss(C, gamma=gamma, alpha=alpha.tolist())(logits, y)
    logp_t = F.log_softmax(logits.detach().double(), -1).gather(1, y[:, None])[:, 0]
    p_t = logp_t.exp()
    expected = (-alpha.double()[y] * (1 - p_t) ** gamma * logp_t).mean()
    assert torch.allclose(loss.double(), expected, rtol=1e-5, atol=1e-7)
    # Zeroing one class's alpha removes exactly its samples' contribution.
    alpha0 = alpha.clone()
    alpha0[y[0]] = 0.0
    loss0 = FocalLoss(C, gamma=gamma, alpha=alpha0.tolist())(logits, y)
    keep = (y != y[0]).double()
    expected0 = (-alpha.double()[y] * (1 - p_t) ** gamma * logp_t * keep).mean()
    assert torch.allclose(loss0.double(), expected0, rtol=1e-5, atol=1e-7)


def test_focal_downweights_easy_examples():
    logits = torch.tensor([[5.0, 0.0, 0.0] + [0.0] * (C - 3)])
    easy = FocalLoss(C, gamma=2.0)(logits, torch.tensor([0]))
    ce = F.cross_entropy(logits, torch.tensor([0]))
    p = torch.softmax(logits, -1)[0, 0]
    assert torch.allclose(easy, (1 - p) ** 2 * ce, rtol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_focal_soft_targets_linear_in_targets(gamma):
    """FL(lam*y_a + (1-lam)*y_b) = lam*FL(y_a) + (1-lam)*FL(y_b): mixup mixes losses."""
    logits = _logits()
    ya, yb = _labels(seed=1), _labels(seed=2)
    loss_fn = FocalLoss(C, gamma=gamma, alpha=torch.rand(C).tolist())
    for lam in (0.0, 0.3, 0.77, 1.0):
        mixed = lam * F.one_hot(ya, C).float() + (1 - lam) * F.one_hot(yb, C).float()
        lhs = loss_fn(logits, mixed)
        rhs = lam * loss_fn(logits, ya) + (1 - lam) * loss_fn(logits, yb)
        assert torch.allclose(lhs, rhs, rtol=1e-6, atol=1e-6)
    # Per-sample lambdas too (linearity holds row by row).
    lam = torch.rand(16, 1)
    mixed = lam * F.one_hot(ya, C).float() + (1 - lam) * F.one_hot(yb, C).float()
    per_row = FocalLoss(C, gamma=gamma)
    rows = torch.stack([
        lam[i, 0] * per_row(logits[i:i + 1], ya[i:i + 1])
        + (1 - lam[i, 0]) * per_row(logits[i:i + 1], yb[i:i + 1]) for i in range(16)
    ])
    assert torch.allclose(per_row(logits, mixed), rows.mean(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("margin", [20.0, 60.0, 200.0, 1e4])
def test_focal_finite_gradients_near_p_one(gamma, margin):
    logits = torch.zeros(4, C)
    logits[:, 3] = margin  # p_3 -> 1 (exactly 1.0 in float32 for the larger margins)
    logits.requires_grad_(True)
    y = torch.full((4,), 3)
    soft = F.one_hot(y, C).float() * 0.9 + 0.01  # soft target with mass on the unlikely classes
    for target in (y, soft):
        loss = FocalLoss(C, gamma=gamma)(logits, target)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert FocalLoss(C, gamma=gamma)(logits, y).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss_name", ["focal", "ce"])
def test_bf16_autocast_is_finite_and_float32(loss_name):
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, C)
    x = torch.randn(6, 8) * 30  # confident predictions
    soft = F.softmax(torch.randn(6, C), -1)
    loss_fn = build_loss(LossConfig(name=loss_name), C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        loss = loss_fn(logits, soft)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    # The float32 computation of the bf16 logits matches a float32 reference on the same values.
    ref = loss_fn(logits.detach().float(), soft)
    assert torch.allclose(loss.detach(), ref, rtol=1e-6)


def test_alpha_is_a_buffer_unchanged_by_optimizer_step():
    torch.manual_seed(0)
    alpha = torch.linspace(0.5, 1.5, C).tolist()
    loss_fn = FocalLoss(C, gamma=2.0, alpha=alpha)
    model = torch.nn.Sequential(torch.nn.Linear(4, C), loss_fn)  # loss inside a module tree
    assert "1.alpha" in dict(model.named_buffers())
    assert all(p is not loss_fn.alpha for p in model.parameters())
    before = loss_fn.alpha.clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=0.1)
    out = model[0](torch.randn(8, 4))
    loss_fn(out, _labels(8)).backward()
    opt.step()
    assert torch.equal(loss_fn.alpha, before)
    assert loss_fn.alpha.grad is None
    assert "alpha" in loss_fn.state_dict()


def test_build_loss_and_bad_inputs():
    assert isinstance(build_loss(LossConfig(name="ce"), C), SoftCrossEntropy)
    fl = build_loss(LossConfig(name="focal", gamma=1.5, alpha=[1.0] * C), C)
    assert isinstance(fl, FocalLoss) and fl.gamma == 1.5 and torch.equal(fl.alpha, torch.ones(C))
    with pytest.raises(ConfigError, match="loss.name"):
        config.load(["loss.name=hinge"])
    with pytest.raises(ValueError, match="loss.alpha has 3 entries"):
        FocalLoss(C, alpha=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="out of range"):
        FocalLoss(C)(torch.zeros(2, C), torch.tensor([0, C]))
    with pytest.raises(ValueError, match="soft targets must have"):
        FocalLoss(C)(torch.zeros(2, C), torch.zeros(2, C - 1))
