"""Distillation: teacher logits computed once per split (file, reuse, rebuild, refusals), the
loss against its definition, mixup of the teacher's targets, and training with it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_shards

from asc_dist import config, distill, train
from asc_dist.data.manifest import load_split
from asc_dist.mixup import Mixup

SMOKE = "conf/smoke.yaml"


def train_args(shards, run_dir, *extra):
    return [SMOKE, f"data.shards={shards}", f"run_dir={run_dir}", "data.backend=torch",
            "train.device=cpu", *extra]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Shards and two small teachers trained on them (different seeds)."""
    tmp = tmp_path_factory.mktemp("distill")
    shards = make_shards(tmp)
    runs = []
    for seed in (0, 1):
        run_dir = tmp / f"teacher{seed}"
        assert train.main(train_args(shards, run_dir, f"train.seed={seed}")) == 0
        runs.append(run_dir)
    return shards, runs


def test_kd_loss_is_t2_times_kl_teacher_student():
    torch.manual_seed(0)
    s, t, T = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10), 2.5
    p = distill.teacher_probs(t, T)
    got = distill.kd_loss(s, p, T)
    ref = F.kl_div(F.log_softmax(s / T, dim=1), p, reduction="batchmean") * T**2
    assert torch.allclose(got, ref, atol=1e-6)
    # CPJKU's form: KLDivLoss(reduction="none")(log q, p).mean() * T^2 averages over classes too
    cpjku = F.kl_div(F.log_softmax(s / T, dim=1), p, reduction="none").mean() * T**2
    assert torch.allclose(distill.kd_loss(s, p, T, "mean"), cpjku, atol=1e-6)
    # zero exactly where the student's tempered distribution is the teacher's
    assert distill.kd_loss(t.clone(), p, T).abs().item() < 1e-6
    got.backward()  # d/ds = T * (softmax(s/T) - p) / B
    assert torch.allclose(s.grad, T * (F.softmax(s / T, dim=1) - p) / 6, atol=1e-6)


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixup_mixes_teacher_probabilities_like_the_labels(per_sample):
    mixup = Mixup(4, alpha=0.3, per_sample=per_sample)
    y = torch.tensor([0, 1, 2, 3, 1])
    _, y_mixed = mixup(torch.randn(5, 1, 3, 3), y, generator=torch.Generator().manual_seed(3))
    # one-hot targets through mix_targets give exactly the mixed labels
    assert torch.equal(mixup.mix_targets(F.one_hot(y, 4).float()), y_mixed)
    off = Mixup(4, enabled=False)
    off(torch.randn(5, 1, 3, 3), y)
    probs = torch.rand(5, 4)
    assert off.mix_targets(probs) is probs


def test_logits_command_writes_the_ensemble_mean_once(teachers, tmp_path, cli):
    shards, (t0, t1) = teachers
    split = shards / "train"
    index = load_split(shards, "train")
    singles = []
    for i, t in enumerate((t0, t1)):
        r = cli(distill.main, ["logits", t, "--split", split, "--out", tmp_path / f"{i}.pt"])
        assert r.returncode == 0, r
        singles.append(distill.load(tmp_path / f"{i}.pt"))
    r = cli(distill.main, ["logits", t0, t1, "--split", split])
    assert r.returncode == 0, r
    out = json.loads(r.stdout)
    path = split.parent / "train" / out["out"].rsplit("/", 1)[1]
    assert path.parent == split and path.name.startswith("teacher-logits-")
    assert out["clips"] == index.num_samples and out["teachers"] == 2
    both = torch.load(path, weights_only=True)
    assert both["keys"] == [s.key for s in index.samples]  # the split's stored order, every clip
    assert both["logits"].shape == (index.num_samples, 10) and both["logits"].dtype == torch.float32
    assert torch.allclose(both["logits"], (singles[0].logits + singles[1].logits) / 2)
    assert not torch.allclose(singles[0].logits, singles[1].logits)
    # recorded by digest: the same teachers named in another order are the same file
    assert [t["digest"] for t in both["teachers"]] == sorted(
        distill.file_sha256(distill_ckpt(t)) for t in (t0, t1))
    r = cli(distill.main, ["logits", t1, t0, "--split", split])
    assert json.loads(r.stdout)["out"] == out["out"] and "teacher logits:" not in r.stderr

    # a second call finds the file current and leaves it alone
    stamp = path.stat().st_mtime_ns
    r = cli(distill.main, ["logits", t0, t1, "--split", split])
    assert r.returncode == 0 and path.stat().st_mtime_ns == stamp
    assert "teacher logits:" not in r.stderr

    # damaged (truncated; then other logits under the old checksum) -> rebuilt with a message
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    r = cli(distill.main, ["logits", t0, t1, "--split", split])
    assert r.returncode == 0 and "are unreadable" in r.stderr and "rebuilding" in r.stderr, r
    state = torch.load(path, weights_only=True)
    state["logits"][0, 0] += 1
    torch.save(state, path)
    r = cli(distill.main, ["logits", t0, t1, "--split", split])
    assert r.returncode == 0 and "damaged (checksum or shape); rebuilding" in r.stderr, r
    assert torch.equal(torch.load(path, weights_only=True)["logits"], both["logits"])
    # other teachers -> another file name; the same file given for them -> stale, rebuilt
    assert distill.load(path, digests=["0" * 64]) is None


def distill_ckpt(run_dir):
    from asc_dist.restore import resolve_checkpoint

    return resolve_checkpoint(run_dir)


def test_teacher_of_other_classes_and_uncovered_splits_are_refused(teachers, tmp_path, cli):
    shards, (t0, _) = teachers
    state = torch.load(distill_ckpt(t0), weights_only=True)
    state["classes"] = list(reversed(state["classes"]))
    other = tmp_path / "other-classes.pt"
    torch.save(state, other)
    r = cli(distill.main, ["logits", other, "--split", shards / "train", "--out", tmp_path / "x.pt"])
    assert r.returncode == 2 and "trained on classes" in r.stderr and "tram" in r.stderr, r
    assert not (tmp_path / "x.pt").exists()

    # logits of the test split do not cover the training split: refused, naming a missing key
    r = cli(distill.main, ["logits", t0, "--split", shards / "test", "--out", tmp_path / "test.pt"])
    assert r.returncode == 0, r
    index = load_split(shards, "train")
    with pytest.raises(distill.DistillError, match=r"cover 0 of the \d+ clips.*missing e\.g\."):
        distill.TeacherTargets(distill.load(tmp_path / "test.pt"), index, torch.device("cpu"))
    r = cli(train.main, train_args(shards, tmp_path / "run", f"distill.logits={tmp_path / 'test.pt'}",
                                   "distill.weight=0.5"))
    assert r.returncode == 2 and "cover 0 of the" in r.stderr, r


def test_weight_zero_is_bit_identical_and_distillation_trains(teachers, tmp_path, caplog):
    shards, (t0, t1) = teachers
    plain, zero, kd = (tmp_path / n for n in ("plain", "zero", "kd"))
    assert train.main(train_args(shards, plain)) == 0
    assert train.main(train_args(shards, zero, f"distill.teachers=[{t0},{t1}]", "distill.weight=0")) == 0
    final = "checkpoints/step_6.pt"
    a, b = (torch.load(d / final, weights_only=True) for d in (plain, zero))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the logits file was built beside the training split, once, for both teachers
    built = list((shards / "train").glob("teacher-logits-*.pt"))
    assert built and torch.load(built[0], weights_only=True)["logits"].shape[1] == 10

    with caplog.at_level(logging.INFO):
        assert train.main(train_args(shards, kd, f"distill.teachers=[{t0},{t1}]", "distill.weight=0.9",
                                     "distill.temperature=3")) == 0
    c = torch.load(kd / final, weights_only=True)
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    # the KD term has its own curve (unweighted); runs without a teacher have none
    from asc_dist.tracking import read_metrics

    kd_rows = [r for r in read_metrics(kd / "metrics.jsonl") if "train/kd_loss" in r]
    assert len(kd_rows) == 3 and all(r["train/kd_loss"] > 0 for r in kd_rows)  # log_every 2 of 6
    assert not any("train/kd_loss" in r for r in read_metrics(plain / "metrics.jsonl"))
    assert (kd / "eval" / "report.json").is_file()


def test_distill_config_errors_name_the_key(tmp_path, cli):
    from asc_dist import config

    with pytest.raises(Exception, match="distill.weight=0.5 needs teachers"):
        config.load(["distill.weight=0.5"])
    with pytest.raises(Exception, match=r"distill.weight=1.5: must be in \[0, 1\]"):
        config.load(["distill.weight=1.5", "distill.teachers=[x]"])
    r = cli(train.main, [SMOKE, "data.shards=/nonexistent", "distill.teachers=[/no/such/run]"])
    assert r.returncode == 2


def test_bench_distill_reports_both_arms_with_table1_statistics(tmp_path, cli):
    """The DCASE 2025 path: a tiny PaSST teacher through the waveform cache with made impulse
    responses on device a's clips, its logits, cp_mobile students without/with KD."""
    from asc_dist import bench

    out = tmp_path / "kd"
    r = cli(bench.main, ["distill", out, "--seeds", "0,1", "--clips-per-class", "4",
                         "--teacher-model", "passt", "--passt-dims", "16,1,2", "--irs", "2",
                         "--teacher-iters", "4", "--student-iters", "4", "--batch", "8",
                         "data.backend=torch", "train.eval_precision=fp32"])
    assert r.returncode == 0, r
    res = json.loads((out / "results.json").read_text())
    teacher = (out / "runs" / "teacher" / "config.yaml").read_text()
    assert "cache: waveform" in teacher and "fmax_range: 1000" in teacher
    made = sorted(p.name for p in (out / "data" / "irs").iterdir())
    assert made == ["made_00.wav", "made_01.wav"]
    assert "augment.dir: 2 impulse responses" in r.stderr and "p 0.6 on devices ['a']" in r.stderr
    assert res["teacher_batch"] == 8 and res["recipes"]["student"][-1].endswith("general.yaml")
    for arm in ("student", "student_kd"):
        a = res["arms"][arm]
        assert a["n"] == 2 and len(a["accuracy"]) == 2 and a["ci95"][0] <= a["mean"] <= a["ci95"][1]
    d = res["difference"]
    assert d["n_seeds"] == 2 and d["ci95"][0] <= d["mean_diff"] <= d["ci95"][1]
    # the KD students really were distilled (from the teacher's logits file beside the split)
    kd_cfg = (out / "runs" / "student_kd-seed0" / "config.yaml").read_text()
    assert "weight: 0.98" in kd_cfg and str(out / "runs" / "teacher") in kd_cfg
    assert list((out / "data" / "shards" / "train").glob("teacher-logits-*.pt"))
    assert "paired difference (with - without)" in (out / "summary.md").read_text()


def test_bench_cost_per_step_compares_valid_configs_of_both_caches(tmp_path, monkeypatch):
    """--cost-steps: each recipe once per cache, the feature cache's arm a config that loads
    (the waveform-only augmentations off), the first log window left out of the mean."""
    from asc_dist.bench import distill as bench_distill
    from asc_dist.tracking import read_metrics

    ran = []

    def fake_train(args):
        cfg = config.load(args)  # refused combinations would raise here
        ran.append((cfg.data.cache, cfg.augment.dir.p, cfg.train.max_iters))
        slow = 2.0 if cfg.data.cache == "waveform" else 1.0
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": 5 * i, "train/step_time": slow * (9 if i == 1 else 1)}) + "\n"
                    for i in (1, 2, 3)))
        return 0.0

    monkeypatch.setattr(bench_distill, "_train", fake_train)
    teacher = ["conf/data/tau2022.yaml", bench_distill.TEACHER, "augment.dir.path=irs"]
    cost = bench_distill.cost_per_step(tmp_path, {"teacher": teacher}, 7)
    assert ran == [("waveform", 0.6, 7), ("device", 0.0, 7)]
    assert cost == {"teacher": {"waveform": 2.0, "device": 1.0, "ratio": 2.0}}
    assert len(read_metrics(tmp_path / "cost-teacher-device" / "metrics.jsonl")) == 3


@pytest.mark.slow
def test_two_ranks_share_the_work_and_write_the_same_logits(teachers, tmp_path, cli):
    """Under torchrun each rank scores its share and the shares are all-gathered: the file
    equals a single process's (keys exactly, logits to float rounding)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    shards, (t0, _) = teachers
    root = Path(__file__).resolve().parent.parent
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    assert cli(distill.main, ["logits", t0, "--split", shards / "train", "--out", one]).returncode == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "asc_dist.distill", "logits", str(t0), "--split", str(shards / "train"),
                        "--out", str(two), "--batch-size", "4", "--device", "cpu"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count('"clips": 20') == 1  # rank 0 reports, once
    a, b = distill.load(one), distill.load(two)
    assert a.keys == b.keys
    assert torch.allclose(a.logits, b.logits, atol=1e-5)


def test_read_only_split_storage_keeps_the_logits_in_the_run_dir(teachers, tmp_path, caplog):
    """The split's file cannot be written (here: a directory squats its name): the logits go to
    the run dir, and the next start finds them there instead of recomputing."""
    from asc_dist import dist
    from asc_dist.data.manifest import manifest_digest

    shards, (t0, _) = teachers
    index = load_split(shards, "test")
    target = distill.default_path(index.dir, [distill.file_sha256(distill_ckpt(t0))],
                                  manifest_digest(index.dir))
    target.mkdir()
    try:
        env = dist.init("cpu")
        with caplog.at_level(logging.INFO):
            path, first = distill.load_or_build([t0], index, env, fallback_dir=tmp_path, progress=False)
        assert path == tmp_path / target.name and path.is_file()
        assert "cannot write the teacher logits" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.INFO):
            again, second = distill.load_or_build([t0], index, env, fallback_dir=tmp_path, progress=False)
        assert again == path and "teacher logits:" not in caplog.text  # found, not recomputed
        assert torch.equal(first.logits, second.logits)
    finally:
        target.rmdir()
