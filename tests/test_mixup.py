import pytest
import torch
import torch.nn.functional as F

from asc_dist.config import MixupConfig
from asc_dist.mixup import Mixup, mix, sample_beta

C = 10


def _batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 4, 6, generator=g), torch.randint(0, C, (b,), generator=g)


def test_lambda_one_is_identity():
    x, y = _batch()
    y1 = F.one_hot(y, C).float()
    perm = torch.randperm(8)
    xm, ym = mix(x, y1, 1.0, perm)
    assert torch.equal(xm, x) and torch.equal(ym, y1)
    xm, ym = mix(x, y1, torch.ones(8), perm)  # per-sample form
    assert torch.equal(xm, x) and torch.equal(ym, y1)
    # lambda = 0 gives exactly the partners.
    xm, ym = mix(x, y1, 0.0, perm)
    assert torch.equal(xm, x[perm]) and torch.equal(ym, y1[perm])


def test_disabled_returns_input_and_one_hot():
    x, y = _batch()
    xm, ym = Mixup(C, enabled=False)(x, y)
    assert xm is x and torch.equal(ym, F.one_hot(y, C).float())


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixes_with_permutation_partner(per_sample):
    x, y = _batch(b=16)
    m = Mixup(C, alpha=0.3, per_sample=per_sample)
    xm, ym = m(x, y, generator=torch.Generator().manual_seed(3))
    lam, perm = m.last_lam, m.last_perm
    assert sorted(perm.tolist()) == list(range(16))
    assert lam.shape == ((16,) if per_sample else ())
    assert ((lam >= 0) & (lam <= 1)).all()
    lam_col = lam.float().reshape(-1, 1, 1, 1) if per_sample else lam.float()
    assert torch.allclose(xm, lam_col * x + (1 - lam_col) * x[perm], atol=1e-6)
    y1 = F.one_hot(y, C).float()
    lam_y = lam.float().reshape(-1, 1) if per_sample else lam.float()
    assert torch.allclose(ym, lam_y * y1 + (1 - lam_y) * y1[perm], atol=1e-6)
    # Targets are distributions: non-negative, each row sums to 1, mass only on the two labels.
    assert (ym >= 0).all()
    assert torch.allclose(ym.sum(1), torch.ones(16), atol=1e-6)
    for i in range(16):
        assert set(ym[i].nonzero().flatten().tolist()) <= {y[i].item(), y[perm[i]].item()}
    if per_sample:
        assert lam.unique().numel() > 1


@pytest.mark.parametrize("alpha", [0.3, 2.0])
def test_beta_statistics(alpha):
    lam = sample_beta(alpha, 50_000, torch.Generator().manual_seed(0))
    var = alpha * alpha / ((2 * alpha) ** 2 * (2 * alpha + 1))  # Beta(a, a): mean 1/2
    assert torch.isfinite(lam).all() and ((lam >= 0) & (lam <= 1)).all()
    assert abs(lam.mean().item() - 0.5) < 0.01
    assert abs(lam.var().item() - var) < 0.05 * var
    # Beta(0.3, 0.3) is U-shaped: most mass near 0 and 1; Beta(2, 2) is hump-shaped.
    edge = ((lam < 0.1) | (lam > 0.9)).double().mean().item()
    assert edge > 0.5 if alpha < 1 else edge < 0.1


def test_seeded_generator_reproducible_and_global_rng_untouched():
    x, y = _batch(b=32)
    m = Mixup.from_config(MixupConfig(alpha=0.3, per_sample=True), C)
    torch.manual_seed(123)
    global_before = torch.get_rng_state()
    a = m(x, y, generator=torch.Generator().manual_seed(7))
    b = m(x, y, generator=torch.Generator().manual_seed(7))
    c = m(x, y, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(torch.get_rng_state(), global_before)
    # One generator carried across steps gives a fresh draw per step.
    g = torch.Generator().manual_seed(7)
    first, second = m(x, y, generator=g), m(x, y, generator=g)
    assert torch.equal(first[0], a[0]) and not torch.equal(second[0], first[0])


def test_bad_inputs():
    x, y = _batch()
    with pytest.raises(ValueError, match="mixup.alpha"):
        Mixup(C, alpha=0.0)
    with pytest.raises(ValueError, match="labels"):
        Mixup(C)(x, y[:4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_with_cpu_generator():
    x, y = _batch()
    x, y = x.cuda(), y.cuda()
    xm, ym = Mixup(C)(x, y, generator=torch.Generator().manual_seed(0))
    assert xm.device == x.device and ym.device == x.device
    assert torch.allclose(ym.sum(1), torch.ones(8, device="cuda"))
