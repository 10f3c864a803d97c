import logging
import statistics

import pytest
import torch
import torchvision

from asc_dist import config
from asc_dist.config import LossConfig, ModelConfig, OptimConfig
from asc_dist.errors import ConfigError
from asc_dist.losses import build_loss
from asc_dist.mixup import Mixup
from asc_dist.models import (
    MODELS,
    RESNETS,
    DcaseBaseline,
    autocast,
    build_model,
    imagenet_weights_file,
    prepare_model,
)
from asc_dist.optim import build_optimizer, build_scheduler

C = 10


def _cfg(**kw):
    kw.setdefault("pretrained", "none")
    return ModelConfig(**kw)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def _write_imagenet_file(name, torch_home, seed=0):
    """Random torchvision weights saved where torch hub would cache the real ones."""
    torch.manual_seed(seed)
    sd = torchvision.models.get_model(name, weights=None).state_dict()
    path = imagenet_weights_file(name)
    assert path == torch_home / "hub" / "checkpoints" / path.name
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    return sd, path


@pytest.mark.parametrize("t", [320, 100, 431])
def test_resnet50_output_shape_any_length(t):
    model = build_model(_cfg(), C).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, t)).shape == (2, C)


# Every name of the registry builds and runs; resnet101/152 differ from resnet50 only in depth
# (their layout is checked against torchvision below): running them too would only cost time.
# PaSST needs its 128-bin input and is checked at a tiny size in tests/test_passt.py.
@pytest.mark.parametrize("name", [n for n in MODELS if n not in ("resnet101", "resnet152", "passt")])
def test_every_model_small_input(name):
    model = build_model(_cfg(name=name), 7).eval()
    with torch.no_grad():
        for t in (32, 57):
            assert model(torch.randn(3, 1, 32, t)).shape == (3, 7)


@pytest.mark.parametrize("name", list(RESNETS))
def test_resnet_keys_match_torchvision(name):
    """Same keys and shapes as torchvision's builder, except the adapted conv1 and the head."""
    with torch.device("meta"):
        ref = torchvision.models.get_model(name, weights=None).state_dict()
    ours = build_model(_cfg(name=name), C).state_dict()
    assert ours.keys() == ref.keys()
    diff = {k for k in ours if ours[k].shape != ref[k].shape}
    assert diff == {"conv1.weight", "fc.weight", "fc.bias"}
    assert ours["conv1.weight"].shape[1] == 1 and ours["fc.weight"].shape[0] == C


def test_repeat_and_resize_adaptations():
    model = build_model(_cfg(name="resnet18", input_adapt="repeat", resize=[48, 96]), C).eval()
    assert model.conv1.weight.shape[1] == 3
    seen = []
    model.conv1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 321)).shape == (2, C)
    assert seen == [(2, 3, 48, 96)]
    # Repeating a 1-channel input through RGB filters = one channel through their sum.
    summed = build_model(_cfg(name="resnet18"), C).eval()
    summed.load_state_dict({**model.state_dict(),
                            "conv1.weight": model.conv1.weight.sum(1, keepdim=True)})
    summed.resize = model.resize
    x = torch.randn(2, 1, 64, 50)
    with torch.no_grad():
        assert torch.allclose(summed(x), model(x), atol=1e-4)


def test_bad_input_and_config():
    model = build_model(_cfg(name="dcase_baseline"), C)
    with pytest.raises(ValueError, match=r"\[B, 1, n_mels, T\]"):
        model(torch.randn(2, 64, 100))
    # Choices: the config's Literal fields; model names: the registry, before anything is built.
    with pytest.raises(ConfigError, match="model.name='vgg16'"):
        build_model(config.load(["model.name=vgg16"]).model, C)
    with pytest.raises(ConfigError, match="model.input_adapt"):
        config.load(["model.input_adapt=mean"])
    with pytest.raises(ConfigError, match="no ImageNet weights for model.name=dcase_baseline"):
        build_model(config.load(["model.name=dcase_baseline", "model.pretrained=imagenet"]).model, C)
    with pytest.raises(ConfigError, match="no such weights file"):
        build_model(_cfg(name="resnet18", pretrained="/nonexistent/w.pt"), C)


def test_imagenet_resnet50_sum_adaptation(torch_home, caplog):
    sd, path = _write_imagenet_file("resnet50", torch_home)
    assert path.name == "resnet50-0676ba61.pth"  # IMAGENET1K_V1
    with caplog.at_level(logging.INFO, logger="asc_dist.models"):
        model = build_model(_cfg(pretrained="imagenet"), C)
    ours = model.state_dict()
    assert torch.equal(ours["conv1.weight"], sd["conv1.weight"].sum(dim=1, keepdim=True))
    assert ours["fc.weight"].shape == (C, 2048) and ours["fc.bias"].shape == (C,)
    others = [k for k in sd if k not in ("conv1.weight", "fc.weight", "fc.bias")]
    assert len(others) > 300
    for k in others:  # weights, BN statistics and counters all come from the file
        assert torch.equal(ours[k], sd[k]), k
    # The replaced head is reported, as expected (info), with nothing to warn about.
    assert "fc.weight" in caplog.text and "new head" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 64, 320)).shape == (2, C)


def test_imagenet_repeat_keeps_rgb_conv1(torch_home):
    sd, _ = _write_imagenet_file("resnet18", torch_home)
    model = build_model(_cfg(name="resnet18", pretrained="imagenet", input_adapt="repeat"), C)
    assert torch.equal(model.conv1.weight, sd["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, sd["layer4.1.bn2.running_var"])


def test_imagenet_absent_gives_file_and_path(torch_home):
    with pytest.raises(ConfigError) as e:
        build_model(_cfg(pretrained="imagenet"), C)
    msg = str(e.value)
    expected = torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert "resnet50-0676ba61.pth" in msg and str(expected) in msg
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in msg


def test_state_dict_path_wrapped_and_prefixed(tmp_path, caplog):
    """A path may hold a plain, nested ({'model': ...}) or DDP-prefixed state dict."""
    torch.manual_seed(1)
    trained = build_model(_cfg(name="resnet18"), C)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"module." + k: v for k, v in trained.state_dict().items()},
                "step": 3}, path)
    with caplog.at_level(logging.INFO, logger="asc_dist.models"):
        model = build_model(_cfg(name="resnet18", pretrained=str(path)), C)
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert "skipped" not in caplog.text and "missing" not in caplog.text


def test_partial_file_warns_missing_and_unexpected(tmp_path, caplog):
    sd = build_model(_cfg(name="resnet18"), C).state_dict()
    sd.pop("layer1.0.conv1.weight")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pt"
    torch.save(sd, path)
    with caplog.at_level(logging.INFO, logger="asc_dist.models"):
        build_model(_cfg(name="resnet18", pretrained=str(path)), C)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "layer1.0.conv1.weight" in warned and "extra.weight" in warned
    # A file with nothing in common is an error, not a silent random init.
    torch.save({"foo.weight": torch.zeros(1)}, path)
    with pytest.raises(ConfigError, match="wrong architecture"):
        build_model(_cfg(name="resnet18", pretrained=str(path)), C)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=str(path)):
        build_model(_cfg(name="resnet18", pretrained=str(path)), C)


def test_dcase_baseline_trains_one_step():
    torch.manual_seed(0)
    model = build_model(_cfg(name="dcase_baseline"), C)
    assert isinstance(model, DcaseBaseline)
    assert sum(p.numel() for p in model.parameters()) < 200_000
    x, y = torch.randn(8, 1, 64, 320), torch.randint(0, C, (8,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = build_loss(LossConfig(name="ce"), C)
    before = [p.detach().clone() for p in model.parameters()]
    loss = loss_fn(model(x), y)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    model.eval()
    with torch.no_grad():
        assert model(x[:2, :, :, :100]).shape == (2, C)


def test_prepare_model_cpu():
    model = prepare_model(build_model(_cfg(name="dcase_baseline"), C), _cfg(), "cpu")
    # channels_last is a CUDA-only optimisation: CPU parameters stay in the default layout.
    assert model.features[0].weight.is_contiguous()
    assert next(model.parameters()).device.type == "cpu"


def test_cpu_bf16_is_finite_and_close_to_fp32_on_every_freshly_loaded_model(monkeypatch, caplog):
    """bf16 on a CPU: oneDNN's AMX convolutions returned NaN for about every other freshly loaded
    1-channel ResNet on this machine (reused memory); the autocast the package uses must not."""
    from asc_dist.models import CpuBf16Autocast

    monkeypatch.setattr(CpuBf16Autocast, "warned", False)
    torch.manual_seed(0)
    cfg = _cfg(name="resnet18")
    state = build_model(cfg, C).state_dict()
    x = torch.randn(1, 1, 64, 32)
    for _ in range(10):
        model = build_model(cfg, C)
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            ref = model(x)
            with autocast("bf16", torch.device("cpu")):
                out = model(x)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
    assert torch.backends.mkldnn.enabled  # restored after the bf16 region
    slow = [r for r in caplog.records if "without oneDNN" in r.getMessage()]
    assert len(slow) == 1 and "train.precision=fp32" in slow[0].getMessage()  # once per process


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prepare_model_cuda_channels_last_compile_bf16():
    """On CUDA, float32 parameters in channels_last; bf16 autocast (device cuda, bf16 compute)."""
    cfg = _cfg(channels_last=True, compile=True)
    model = prepare_model(build_model(cfg, C), cfg, "cuda")
    model.compile()
    w = model.conv1.weight
    assert w.is_cuda and w.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 64, 320, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (4, C) and torch.isfinite(out).all()
    assert "conv1.weight" in model.state_dict()  # in-place compile keeps the keys


def test_recipe_overfits_tiny_batch():
    """ResNet-50 + focal + mixup + AdaBound + schedule drives the loss down on a fixed batch."""
    torch.manual_seed(0)
    model = build_model(_cfg(name="resnet50"), C)
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8) % C
    loss_fn = build_loss(LossConfig(name="focal", gamma=2.0, alpha=1.0), C)
    mixup = Mixup(C, alpha=0.3)
    optim_cfg = OptimConfig(decay_every=200)
    opt = build_optimizer(optim_cfg, model.parameters())
    sched = build_scheduler(optim_cfg, opt)
    gen = torch.Generator().manual_seed(0)

    def clean_loss():
        with torch.no_grad():
            return loss_fn(model(x), y).item()

    # Mixup makes single steps noisy (Beta(0.3, 0.3) flips between near-pure samples, and
    # train-mode BatchNorm on 8 clips amplifies it: one late spike to 3.6 was seen), so judge
    # the median clean loss over the last 8 steps, which one spike cannot move.
    start, history = clean_loss(), []
    for _ in range(12):
        xm, ym = mixup(x, y, generator=gen)
        loss = loss_fn(model(xm), ym)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history.append(clean_loss())
    assert start > 1.5  # ~ln(10) at random init, focal-weighted
    assert statistics.median(history[-8:]) < 0.5 * start, (start, history)
