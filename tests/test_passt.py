"""PaSST (model.name=passt) and its front end: the features against hear21passt's AugmentMelSTFT
and DALI's graph, our forward against hear21passt's, the positional-embedding offset and
patchout drawn from the step's generator, the AudioSet weights' layout, two gloo ranks training
and resuming exactly, and `distill logits` with PaSST and cp_mobile teachers.

The models here are tiny (embed_dim 16, depth 1, 2 heads) and run in fp32 on the CPU; only the
weights-layout test builds the real architecture (85 M parameters, no training). The features of
the training tests are PaSST's at 16 kHz (the fixture shards' rate): hop 160 keeps 100 frames per
1-s clip and the 128 Kaldi bins end at 7,500 Hz in evaluation (8,000 - 1,000 / 2, as PaSST's rule
for fmax_aug_range 1000 gives: the training band reaches Nyquist).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import warnings
from typing import get_type_hints

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.multiprocessing as mp
from conftest import exit_spawned_rank
from test_frontend_options import dali_logmel, waves

from asc_dist import config, distill, train
from asc_dist import frontend as F
from asc_dist.errors import ConfigError
from asc_dist.models import PaSST, build_model, check_model, use_generator
from asc_dist.models.passt import ARCHS, load_passt

TEACHER = "conf/experiment/passt_teacher.yaml"
TINY = ["model.pretrained=none", "model.passt.embed_dim=16", "model.passt.depth=1",
        "model.passt.num_heads=2"]
# PaSST's front end at the fixture shards' 16 kHz, with the smoke run's sizes
AT_16K = ["features.sample_rate=16000", "features.hop_length=160", "features.f_max=7500"]
RUN = ["conf/smoke.yaml", TEACHER, *AT_16K, *TINY, "data.backend=torch", "train.device=cpu",
       "train.epochs=0", "train.global_batch=4", "train.log_every=1", "optim.lr=1e-3"]


def tiny(*extra, num_classes: int = 10) -> PaSST:
    cfg = config.load([TEACHER, *TINY, *extra], world_size=1)
    return build_model(cfg.model, num_classes)


def hear21passt_twin(model: PaSST):
    """hear21passt's own PaSST with ``model``'s weights (its head_dist, unused, left random)."""
    from hear21passt.models import passt as hp

    net = model.net
    twin = hp.PaSST(img_size=net.patch_embed.img_size, patch_size=16, stride=10, in_chans=1,
                    num_classes=net.num_classes, embed_dim=net.embed_dim, depth=len(net.blocks),
                    num_heads=net.blocks[0].attn.num_heads, distilled=True)
    result = twin.load_state_dict(net.state_dict(), strict=False)
    assert result.missing_keys == ["head_dist.weight", "head_dist.bias"] and not result.unexpected_keys
    hp.first_RUN = False  # its first forward prints shapes
    return twin


# -- the front end --------------------------------------------------------------------------------

def test_front_end_equals_hear21passt_augmentmelstft_in_eval_mode():
    from hear21passt.models.preprocess import AugmentMelSTFT

    f = config.load([TEACHER], world_size=1).features
    x = torch.from_numpy(waves(32000))
    with contextlib.redirect_stdout(io.StringIO()):  # "Warning: FMAX is None setting to 15500"
        ref = AugmentMelSTFT(n_mels=128, sr=32000, win_length=800, hopsize=320, n_fft=1024,
                             freqm=48, timem=20, fmin=0.0, fmax=None, fmin_aug_range=1,
                             fmax_aug_range=1000).eval()  # CP-JKU's teacher arguments
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its stft(return_complex=False), cuda.amp.autocast
        want = ref(x)
    got = F.LogMel(f)(x)
    assert want.shape == (3, 128, 100) and got.shape == (3, 1, 128, 100)  # 31,999 samples
    assert (got[:, 0] - want).abs().max() <= 1e-4  # measured 2.4e-7
    assert F.stft_frames(f) == 100 and F.log_zero(f) == pytest.approx((np.log(1e-5) + 4.5) / 5)


def _dali_features(x: np.ndarray, f) -> torch.Tensor:
    from asc_dist.data.dali import graph_shape, torch_tail

    spec = torch.from_numpy(dali_logmel(x, f))  # what logmel_graph gives: the spectrogram here
    assert spec.shape == (len(x), *graph_shape(f)) == (len(x), 1, 513, 100)  # DALI stops here
    return torch_tail(f).from_spectrogram(spec[:, 0])


def test_dali_graph_equals_torch_for_passts_front_end():
    f = config.load([TEACHER], world_size=1).features
    x = waves(32000)
    ours = F.LogMel(f)(torch.from_numpy(x))
    assert (_dali_features(x, f) - ours).abs().max() <= 1e-3  # measured 7e-5


def test_dali_source_with_the_torch_tail_equals_the_torch_source(packed_shards):
    """The whole DALI batch source (spectrogram in DALI, Kaldi mel + log + affine in torch) against
    the torch source on the same clips."""
    pytest.importorskip("nvidia.dali")
    from asc_dist.data import build_source

    out = {}
    for backend in ("dali", "torch"):
        c = config.load([*RUN, f"data.shards={packed_shards}", f"data.backend={backend}"],
                        world_size=1)
        with build_source(c, "test", train=False, rank=0, world_size=1, device=torch.device("cpu"),
                          batch_size=8, seed=0, cache="none") as src:
            out[backend] = next(iter(src.epoch(0)))
    assert out["dali"].features.shape == (8, 1, 128, 100)
    assert list(out["dali"].keys) == list(out["torch"].keys)
    assert (out["dali"].features - out["torch"].features).abs().max() <= 1e-3
    assert c.features.mel_scale == "kaldi" and c.data.backend == "torch"


def test_masks_at_log_mel_read_as_a_zero_log_mel_through_the_affine():
    from asc_dist.augment import Augment

    cfg = config.load([TEACHER], world_size=1)
    aug = Augment.from_config(cfg)
    assert aug.fill == pytest.approx(0.9)  # (0 + 4.5) / 5, as in their mel module
    x = torch.full((2, 1, 128, 100), -3.0)
    values = aug.before_standardize(x, torch.Generator().manual_seed(0)).unique()
    assert values.tolist() == [-3.0, pytest.approx(0.9)]


# -- the model ------------------------------------------------------------------------------------

def test_eval_forward_equals_hear21passts_and_head_dist_is_gone():
    torch.manual_seed(0)
    model = tiny().eval()
    assert model.net.head_dist is None and not any("head_dist" in k for k in model.state_dict())
    x = torch.randn(2, 1, 128, 100)  # 1 s: 9 of the embedding's 99 time columns
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its PatchEmbed warns for inputs other than 128 x 998
        want = hear21passt_twin(model).eval()(x)[0]
        got = model(x)
    assert got.shape == (2, 10) and torch.allclose(got, want, atol=1e-6)


def test_training_offsets_the_time_embedding_and_draws_from_the_generator():
    """In training the input takes 9 consecutive columns of the embedding's 20 (input_tdim 200;
    99 with the AudioSet weights) at an offset drawn from the step's generator: the output is the
    evaluation output of a model whose embedding starts at that offset, the same seed draws the
    same, and the offsets spread over the range."""
    torch.manual_seed(0)
    # no patchout, no dropout: the offset is the only draw
    model = tiny("model.passt.s_patchout_f=0", "model.passt.input_tdim=200")
    x = torch.randn(2, 1, 128, 100)
    gen = torch.Generator()
    use_generator(model, gen)
    emb = model.net.time_new_pos_embed.detach().clone()
    shifted = {}
    with torch.no_grad():
        model.eval()
        for o in range(12):
            model.net.time_new_pos_embed.copy_(torch.roll(emb, -o, dims=3))
            shifted[o] = model(x)
        model.net.time_new_pos_embed.copy_(emb)
        model.train()
        seen = set()
        for seed in range(16):
            gen.manual_seed(seed)
            out = model(x)
            hits = [o for o, ref in shifted.items() if torch.allclose(out, ref, atol=1e-6)]
            assert len(hits) == 1, hits
            seen.add(hits[0])
            gen.manual_seed(seed)
            assert torch.equal(model(x), out)
    assert len(seen) >= 8  # of the 12 possible offsets, 0..20-9


def test_patchout_keeps_a_random_ordered_subset_drawn_from_the_generator():
    model = tiny("model.passt.s_patchout_f=6", "model.passt.s_patchout_t=3")
    gen = torch.Generator()
    use_generator(model, gen)
    x = torch.zeros(1, 1, 128, 100)
    subsets = set()
    for seed in range(5):
        gen.manual_seed(seed)
        keep = model._keep(12, 6, x)
        assert keep.shape == (6,) and torch.equal(keep, keep.sort().values)
        assert len(set(keep.tolist())) == 6 and 0 <= keep.min() and keep.max() < 12
        gen.manual_seed(seed)
        assert torch.equal(model._keep(12, 6, x), keep)
        subsets.add(tuple(keep.tolist()))
    assert len(subsets) > 1
    with pytest.raises(ValueError, match="drops 12 of only 12"):
        model._keep(12, 12, x)


def test_a_training_step_reads_nothing_back_and_every_parameter_gets_a_gradient(monkeypatch):
    """No .item()/.tolist()/bool() in the forward (on a GPU each would wait for the device); with
    head_dist gone every parameter gets a gradient (DDP runs without find_unused_parameters).
    Gradient checkpointing gives the same gradients."""
    torch.manual_seed(0)
    model = tiny("model.passt.s_patchout_f=6", "model.passt.s_patchout_t=2")
    gen = torch.Generator()
    use_generator(model, gen)
    x, y = torch.randn(4, 1, 128, 100), torch.randint(0, 10, (4,))
    grads = {}
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad(set_to_none=True)
        gen.manual_seed(3)

        def sync(*a, **k):
            raise AssertionError("host synchronisation in PaSST's forward/backward")

        with monkeypatch.context() as m:
            for name in ("item", "tolist", "numpy", "__bool__", "__float__"):
                m.setattr(torch.Tensor, name, sync)
            torch.nn.functional.cross_entropy(model(x), y).backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert all(g is not None and g.abs().sum() > 0 for g in grads[ckpt].values())
    for n, g in grads[False].items():
        assert torch.allclose(g, grads[True][n], atol=1e-6), n


# -- weights --------------------------------------------------------------------------------------

def test_full_architecture_loads_a_state_dict_in_hear21passts_layout(caplog):
    """The real passt_s_swa_p16_128_ap476 (85.4 M parameters with head_dist) takes a state dict
    laid out as hear21passt's 527-class AudioSet model, with made-up values: this checks the
    layout hear21passt builds, not the real file (that cannot be downloaded here). head.1 and
    head_dist are replaced by the 10-way head; everything else is loaded."""
    import logging

    cfg = config.load([TEACHER, "model.pretrained=none"], world_size=1)
    model = build_model(cfg.model, 10)
    own = model.net.state_dict()
    assert sum(v.numel() for v in own.values()) + 768 * 10 + 10 == 85_358_612  # the facts' count
    file = {k: torch.full_like(v, float(i % 97) / 97) for i, (k, v) in enumerate(own.items())}
    file["head.1.weight"], file["head.1.bias"] = torch.ones(527, 768), torch.ones(527)
    file["head_dist.weight"], file["head_dist.bias"] = torch.ones(527, 768), torch.ones(527)
    assert file["time_new_pos_embed"].shape == (1, 768, 1, 99)  # input_tdim 998
    with caplog.at_level(logging.INFO, logger="asc_dist.models"):
        report = load_passt(model, file, source="audioset.pt")
    assert set(report.missing) == {"head.1.weight", "head.1.bias"}
    assert len(report.loaded) == len(own) - 2 and not report.unexpected
    state = model.net.state_dict()
    for k in report.loaded:
        assert torch.equal(state[k], file[k]), k
    assert state["head.1.weight"].shape == (10, 768)
    assert "new head, expected" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_weights_file_that_does_not_fit_names_the_keys(tmp_path):
    model = tiny()
    sd = {f"net.{k}": v for k, v in model.net.state_dict().items()}  # one of our own checkpoints
    path = tmp_path / "w.pt"
    torch.save({"model": sd}, path)
    other = build_model(config.load([TEACHER, *TINY, f"model.pretrained={path}"]).model, 10)
    for k, v in model.net.state_dict().items():  # the same class count: its head too
        assert torch.equal(other.net.state_dict()[k], v), k
    bad = {k.removeprefix("net."): v for k, v in sd.items() if "blocks.0.mlp.fc1" not in k}
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match=r"missing 2 \(blocks\.0\.mlp\.fc1\.weight.*unexpected 1 "
                                          r"\(extra\.weight\)"):
        load_passt(model, bad, source="bad.pt")
    short = build_model(config.load([TEACHER, *TINY, "model.passt.input_tdim=500"]).model, 10)
    with pytest.raises(ConfigError, match=r"time_new_pos_embed \(file \[1, 16, 1, 99\], model "
                                          r"\[1, 16, 1, 50\]\).*input_tdim"):
        load_passt(short, model.net.state_dict(), source="w.pt")


def test_config_checks():
    with pytest.raises(ConfigError, match=r"model\.passt\.input_tdim=500: model\.pretrained="
                                          r"passt-audioset has a time embedding of 99 columns"):
        check_model(config.load([TEACHER, "model.passt.input_tdim=500"]).model)
    with pytest.raises(ConfigError, match="leave them null"):
        check_model(config.load([TEACHER, "model.passt.depth=2"]).model)
    with pytest.raises(ConfigError, match=r"model\.passt\.input_fdim=128 but features\.n_mels=64"):
        config.load(["model.name=passt", "model.pretrained=none"])
    with pytest.raises(ConfigError, match="holds passt weights, not model.name=resnet50"):
        check_model(config.load(["model.pretrained=passt-audioset"]).model)
    with pytest.raises(ConfigError, match=r"s_patchout_t=9: the input has only 9 patch time"):
        config.load([TEACHER, "model.passt.s_patchout_t=9"])  # 1 s: 9 columns
    with pytest.raises(ConfigError, match="mel_scale=kaldi.*mel_norm=none"):
        config.load([TEACHER, "features.mel_norm=slaney"])
    with pytest.raises(ConfigError, match="train.grad_checkpointing=true: model.name=cp_mobile"):
        from asc_dist.models import check_grad_checkpointing

        check_grad_checkpointing(config.load(["model.name=cp_mobile", "train.grad_checkpointing=true"]))
    assert set(ARCHS) == set(get_type_hints(config.PasstConfig)["arch"].__args__)
    from asc_dist.restore import FROZEN_KEYS

    assert "model.passt." in FROZEN_KEYS


# -- several ranks --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, runs: list[tuple[int, list[str]]], out: str) -> None:
    """One gloo rank running ``train.main`` once per (port, argv), in this process."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", WANDB_SILENT="true")
    torch.set_num_threads(1)
    codes = []
    for port, argv in runs:
        os.environ["MASTER_PORT"] = str(port)
        codes.append(train.main(argv))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(codes, f)
    exit_spawned_rank()


@pytest.fixture(scope="module")
def two_rank_runs(packed_shards, tmp_path_factory):
    """Two gloo ranks (spawned: one start for both runs): 4 steps straight through, and the same
    resumed from the first run's step-2 checkpoint. Every augmentation of the teacher recipe is
    on, through the waveform cache: impulse responses (made ones, on the fixture's device-a
    clips), the roll by samples, the random mel band, masks, MixStyle and structured patchout."""
    from asc_dist.data import build_source

    tmp = tmp_path_factory.mktemp("passt_ddp")
    irs = tmp / "irs"
    irs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        sf.write(irs / f"ir{i}.wav", rng.standard_normal(80) * np.exp(-np.arange(80) / 10), 16000)
    base = [*RUN, f"data.shards={packed_shards}", "train.max_iters=4", "train.ckpt_every=2",
            "train.eval_every=4", "model.passt.s_patchout_t=2", f"augment.dir.path={irs}"]
    cfg = config.load(base, world_size=1)
    # the test split's feature cache, here: ~10x cheaper than in fresh ranks (training decodes
    # its waveforms in the ranks)
    build_source(cfg, "test", train=False, rank=0, world_size=1, device=torch.device("cpu"),
                 batch_size=4, seed=0, cache="device").close()
    straight, resumed = tmp / "straight", tmp / "resumed"
    runs = [(_free_port(), [*base, f"run_dir={straight}"]),
            (_free_port(), [*base, f"run_dir={resumed}",
                            f"resume={straight / 'checkpoints' / 'step_2.pt'}"])]
    mp.spawn(_rank, args=(runs, str(tmp)), nprocs=2, join=True)
    codes = [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]
    return straight, resumed, codes


@pytest.mark.slow
def test_two_ranks_train_in_sync_and_resume_exactly(two_rank_runs):
    straight, resumed, codes = two_rank_runs
    # exit 0 on both ranks: DDP reduced every gradient (no unused parameter) and the trainer's
    # end-of-run check found the replicas bit-identical (it raises otherwise)
    assert codes == [[0, 0], [0, 0]]
    a = torch.load(straight / "checkpoints" / "step_4.pt", map_location="cpu", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "step_4.pt", map_location="cpu", weights_only=True)
    assert a["model_name"] == "passt" and a["config"]["model"]["passt"]["s_patchout_f"] == 6
    c = a["config"]
    assert (c["data"]["cache"], c["augment"]["dir"]["p"], c["augment"]["mel_band"]["fmax_range"],
            c["optim"]["schedule"]) == ("waveform", 0.6, 1000, "exp_warmup_linear_down")
    start = torch.load(straight / "checkpoints" / "step_2.pt", map_location="cpu", weights_only=True)
    assert any(not torch.equal(start["model"][k], a["model"][k]) for k in a["model"])  # trained
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_distill_logits_from_a_passt_and_a_cp_mobile_teacher(two_rank_runs, packed_shards,
                                                             tmp_path, cli, monkeypatch):
    """`distill logits` with a PaSST teacher and a cp_mobile one: each runs on its own front end
    from its checkpoint (PaSST's Kaldi 128 bins, cp_mobile's smoke log-mel: the other's would
    not even fit its input) and the file holds the mean of the two teachers' logits."""
    passt_run = two_rank_runs[0]
    cp_run = tmp_path / "cp_mobile"
    assert train.main(["conf/smoke.yaml", f"data.shards={packed_shards}", f"run_dir={cp_run}",
                       "data.backend=torch", "train.device=cpu", "model.name=cp_mobile",
                       "train.max_iters=1"]) == 0
    each = {}
    one_teacher = distill._one_teacher

    def recorded(ckpt, *a, **k):
        keys, logits = one_teacher(ckpt, *a, **k)
        each[ckpt.parent.parent.name] = (keys, logits)
        return keys, logits

    monkeypatch.setattr(distill, "_one_teacher", recorded)
    out = tmp_path / "both.pt"
    ran = cli(distill.main, ["logits", passt_run, cp_run, "--split", packed_shards / "train",
                             "--out", out, "--device", "cpu"])
    assert ran.returncode == 0, ran
    assert json.loads(ran.stdout)["teachers"] == 2
    table = distill.load(out)
    (pk, passt_logits), (ck, cp_logits) = each["straight"], each["cp_mobile"]
    assert table.keys == pk == ck and len(table.keys) == 20
    assert not torch.allclose(passt_logits, cp_logits)
    assert torch.allclose(table.logits, (passt_logits + cp_logits) / 2, atol=1e-6)


# -- a GPU ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_passt_ddp_bf16_steps_never_wait_for_the_gpu(grad_checkpointing, monkeypatch):
    """The full PaSST under DDP (NCCL, one rank) in bf16 with the teacher recipe's augmentations,
    through the trainer's own train_step: after two warm-up steps, three steps run with
    torch.cuda.set_sync_debug_mode('error'), so any host synchronisation raises."""
    import torch.distributed as tdist

    from asc_dist.augment import Augment
    from asc_dist.data import Batch
    from asc_dist.losses import build_loss
    from asc_dist.mixup import Mixup
    from asc_dist.models import autocast, prepare_model, set_grad_checkpointing
    from asc_dist.optim import build_optimizer, build_scheduler

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    tdist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
    try:
        cfg = config.load([TEACHER, "model.pretrained=none", "train.precision=bf16",
                           "train.epochs=0", "train.max_iters=10"], world_size=1)
        model = build_model(cfg.model, 10)
        if grad_checkpointing:
            set_grad_checkpointing(model)
        model = prepare_model(model, cfg.model, dev)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0],
                                                        gradient_as_bucket_view=True)
        optimizer = build_optimizer(cfg.optim, ddp.parameters())
        p = train.Parts(
            train_src=None, test_src=None, classes=[str(i) for i in range(10)], stats=None,
            standardize=torch.nn.Identity(), model=ddp, loss_fn=build_loss(cfg.loss, 10).to(dev),
            mixup=Mixup.from_config(cfg.augment.mixup, 10), augment=Augment.from_config(cfg),
            teacher=None, optimizer=optimizer,
            scheduler=build_scheduler(cfg.optim, optimizer, cfg.train.max_iters,
                                      steps_per_epoch=4),
            autocast=autocast(cfg.train.precision, dev), complexity=None)
        mix_gen, aug_gen = torch.Generator(device=dev), torch.Generator(device=dev)
        use_generator(model, aug_gen)
        batch = Batch(features=torch.randn(16, 1, 128, 100, device=dev),
                      labels=torch.randint(0, 10, (16,), device=dev), keys=[""] * 16,
                      valid=torch.ones(16, dtype=torch.bool, device=dev))
        losses = []
        try:
            for step in range(5):
                if step == 2:  # DDP's first iterations (bucket rebuild) may wait; then nothing
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                mix_gen.manual_seed(step)
                aug_gen.manual_seed(1000 + step)
                losses.append(train.train_step(p, batch, mix_gen, aug_gen, cfg))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert all(torch.isfinite(loss) for loss in losses)
        assert all(torch.isfinite(q).all() for q in model.parameters())
    finally:
        tdist.destroy_process_group()
