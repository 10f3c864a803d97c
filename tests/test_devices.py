"""DCASE 2025's device-specific models: synthetic device scenes, the training split filtered by
device, train.init_from, the last partial batch, device sets (finetune, assemble, routed
evaluate/predict, complexity), fp16 evaluation, the torchaudio resampler and the recipes.

One tiny synthetic TAU 2022 tree recorded by devices a, b, s1 (s4 in the test split only), packed
once; one general model trained on it and one device set fine-tuned from it, shared by the tests.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.multiprocessing as mp
from conftest import exit_spawned_rank, make_shards

from asc_dist import config, devices, evaluate, predict, synth, train
from asc_dist.data import build_source, dali_available
from asc_dist.data.manifest import DataError, load_split
from asc_dist.data.sharding import global_plan, loss_weight, remainder, train_steps
from asc_dist.pack.layouts import detect_layout
from asc_dist.scenes import device_response_db, record

ROOT = Path(__file__).resolve().parent.parent
DEVICES, UNSEEN = ["a", "b", "s1"], ["s4"]
SMOKE = ["conf/smoke.yaml", "data.backend=torch", "train.device=cpu", "data.cache=device"]


@pytest.fixture(scope="module")
def dev(tmp_path_factory) -> SimpleNamespace:
    """The device tree (6 clips per class: 30 train clips of a, b, s1; 30 test clips of a, b, s1,
    s4), its shards, a general model (8 steps), and a device set (4 steps per device)."""
    base = tmp_path_factory.mktemp("devices")
    data = synth.generate(base / "tau", clips_per_class=6, duration=1.0, sample_rate=16000,
                          channels=1, devices=DEVICES, unseen_devices=UNSEEN, progress=False)
    shards = make_shards(base, dataset=data, shard_max_samples=8)
    general = base / "general"
    assert train.main([*SMOKE, f"data.shards={shards}", f"run_dir={general}",
                       "train.max_iters=8", "train.eval_every=8", "train.ckpt_every=8"]) == 0
    devset = base / "devset"
    assert devices.main(["finetune", str(general), "--out", str(devset), "train.max_iters=4",
                         "train.eval_every=4", "train.ckpt_every=4"]) == 0
    return SimpleNamespace(base=base, data=data, shards=shards, general=general, devset=devset)


def samples(split_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (split_dir / "samples.jsonl").read_text().splitlines()]


def read_predictions(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    return {r[0]: (r[2], np.asarray(r[3:], dtype=np.float64)) for r in rows[1:]}


# --------------------------------------------------------------------------- synthetic devices


def test_synth_records_tau2022_scenes_with_one_fixed_filter_per_device(dev):
    assert detect_layout(dev.data) == "tau2022"
    meta = [line.split("\t") for line in (dev.data / "meta.csv").read_text().splitlines()[1:]]
    assert {m[3] for m in meta} == set(DEVICES + UNSEEN)
    assert all(m[0].endswith(f"-{m[3]}.wav") and m[0].count("-") == 5 for m in meta)
    train_files = (dev.data / "evaluation_setup" / "fold1_train.csv").read_text().splitlines()
    assert train_files[0] == "filename\tscene_label"
    assert not any(f.split("\t")[0].endswith("-s4.wav") for f in train_files[1:])  # unseen
    # "a" records flat; every other device by a response of its own, the same for every clip
    x = np.random.default_rng(0).standard_normal((1, 16000))
    assert np.array_equal(record(x, "a", 16000), x)
    b, s1 = device_response_db("b", 16000, 16000), device_response_db("s1", 16000, 16000)
    assert b.std() > 1 and s1.std() > 1 and not np.allclose(b, s1)
    assert np.array_equal(record(x, "b", 16000), record(x, "b", 16000))
    with pytest.raises(Exception, match="device '7'"):
        synth.generate(dev.base / "bad", clips_per_class=2, devices=["a", "7"], progress=False)
    by_key = {s["key"]: s["device"] for s in samples(dev.shards / "test")}
    assert set(by_key.values()) == set(DEVICES + UNSEEN)


# --------------------------------------------------------------------------- the data filter


@pytest.mark.parametrize("cache", ["device", "none"])
def test_data_devices_filters_the_training_split_and_counts_its_steps(dev, cache):
    cfg = config.load([*SMOKE, f"data.shards={dev.shards}", f"data.cache={cache}", "data.devices=[b]",
                       "train.drop_last=false"])
    index = load_split(dev.shards, "train")
    b_keys = {s.key for s in index.samples if s.device == "b"}
    assert len(b_keys) == 10
    src = build_source(cfg, "train", train=True, rank=0, world_size=1, device="cpu", batch_size=4)
    try:
        assert src.steps_per_epoch == 3  # ceil(10 / 4)
        for epoch in (0, 1):
            batches = list(src.epoch(epoch))
            keys = [k for b in batches for k in b.keys]
            assert sorted(keys) == sorted(b_keys)  # each clip of device b once, no other
            assert [len(b.keys) for b in batches] == [4, 4, 2]
            assert [b.weight for b in batches] == [1.0, 1.0, 1.0]  # one rank: 2 of 2 clips
    finally:
        src.close()
    # 10 clips, 2 per rank on 4 ranks: a last step of 2 clips, 1 + 1 + 0 + 0; a rank without one
    # reads one padding row at weight 0, and the weights sum to the world size (DDP's average is
    # then the mean over the 2 clips)
    four = config.load([*SMOKE, f"data.shards={dev.shards}", f"data.cache={cache}",
                        "data.devices=[a]", "train.drop_last=false", "train.global_batch=8"],
                       world_size=4)
    last = []
    for rank in range(4):
        with build_source(four, "train", train=True, rank=rank, world_size=4, device="cpu",
                          batch_size=2) as s:
            last.append(list(s.epoch(0))[-1])
    assert sorted(int(b.valid.sum()) for b in last) == [0, 0, 1, 1]
    assert sorted(b.weight for b in last) == [0.0, 0.0, 2.0, 2.0]
    assert all(len(b.keys) == 1 for b in last)
    kept = config.load([*SMOKE, f"data.shards={dev.shards}", "data.devices=[b,s1]"])
    with build_source(kept, "train", train=True, rank=0, world_size=1, device="cpu", batch_size=4) as s:
        assert s.steps_per_epoch == 5  # floor(20 / 4)
    bad = config.load([*SMOKE, f"data.shards={dev.shards}", "data.devices=[c]"])
    with pytest.raises(DataError, match=r"no clip of device c; its devices \(clips\): a \(10\), "
                                        r"b \(10\), s1 \(10\)"):
        build_source(bad, "train", train=True, rank=0, world_size=1, device="cpu", batch_size=4)


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_streaming_refuses_a_device_filter_or_a_partial_batch(dev):
    for extra in ("data.devices=[b]", "train.drop_last=false"):
        cfg = config.load(["conf/smoke.yaml", f"data.shards={dev.shards}", "data.backend=dali",
                           "data.cache=none", "train.device=cpu", extra])
        with pytest.raises(DataError, match="cannot stream from DALI: use the feature cache"):
            build_source(cfg, "train", train=True, rank=0, world_size=1, device="cpu", batch_size=4)


def test_the_partial_last_batch_is_split_evenly_and_weighted():
    # 13 clips, 4 per rank, 2 ranks: one full step, then 5 clips: 3 and 2
    assert (train_steps(13, 4, 2), train_steps(13, 4, 2, drop_last=False), remainder(13, 4, 2)) == (1, 2, 5)
    plans = [global_plan(13, seed=1, epoch=0, rank=r, world_size=2, batch_size=4, drop_last=False)
             for r in (0, 1)]
    assert [int((p[-1] >= 0).sum()) for p in plans] == [3, 2]
    assert sorted(np.concatenate([p[p >= 0] for p in plans]).tolist()) == list(range(13))
    assert np.array_equal(plans[0][:1], global_plan(13, seed=1, epoch=0, rank=0, world_size=2,
                                                    batch_size=4))  # the full steps unchanged
    # the weights make DDP's average over ranks the mean over the 5 clips
    assert loss_weight(3, 5, 2) == pytest.approx(1.2) and loss_weight(2, 5, 2) == pytest.approx(0.8)
    assert loss_weight(0, 1, 2) == 0  # 9 clips: 1 left, a rank without a clip weighs nothing
    ids = np.array([2, 5, 7, 11])  # a subset: only its clips
    p = global_plan(13, seed=1, epoch=0, rank=0, world_size=1, batch_size=3, ids=ids, drop_last=False)
    assert sorted(p[p >= 0].tolist()) == ids.tolist() and p.shape == (2, 3)


def _partial_worker(rank: int, world: int, port: int, shards: str, out: str, n_devices: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from asc_dist import dist

    env = dist.init("cpu", timeout_s=120)
    try:
        cfg = config.load([*SMOKE, f"data.shards={shards}", "train.drop_last=false",
                           f"data.devices=[{n_devices}]", "train.global_batch=8"], world_size=world)
        src = build_source(cfg, "train", train=True, rank=rank, world_size=world, device="cpu",
                           batch_size=8 // world)
        last = list(src.epoch(0))[-1]
        src.close()
        torch.manual_seed(0)
        model = dist.wrap_model(torch.nn.Linear(64, 10), env)  # no batch norm: rows independent
        logits = model(last.features.mean(dim=(1, 3)))
        loss = torch.nn.functional.cross_entropy(logits, last.labels) * last.weight
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in dist.unwrap(model).parameters()])
        torch.save({"grad": grad, "keys": [k for k, ok in zip(last.keys, last.valid.tolist()) if ok],
                    "weight": last.weight}, Path(out) / f"{world}-{rank}.pt")
    finally:
        dist.teardown()
    if world > 1:
        exit_spawned_rank()


@pytest.mark.slow
def test_two_gloo_ranks_and_one_process_give_equal_gradients_on_the_partial_step(tmp_path):
    """15 clips of device a in global batches of 8: a last step of 7 clips, 4 on rank 0 and 3 on
    rank 1 (weights 8/7 and 6/7: unweighted, DDP's average of the two means would weigh rank 1's
    clips more); one process sees the same 7 clips at once. (A rank without a clip:
    test_data_devices_filters_the_training_split_and_counts_its_steps.)"""
    data = synth.generate(tmp_path / "tau", clips_per_class=6, duration=1.0, sample_rate=16000,
                          channels=1, devices=["a", "b"], progress=False)
    shards = make_shards(tmp_path, dataset=data, shard_max_samples=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_partial_worker, args=(2, port, str(shards), str(tmp_path), "a"), nprocs=2)
    _partial_worker(0, 1, port + 1, str(shards), str(tmp_path), "a")
    one = torch.load(tmp_path / "1-0.pt")
    two = [torch.load(tmp_path / f"2-{r}.pt") for r in (0, 1)]
    assert [len(t["keys"]) for t in two] == [4, 3] and len(one["keys"]) == 7
    assert [t["weight"] for t in two] == pytest.approx([8 / 7, 6 / 7])
    assert sorted(two[0]["keys"] + two[1]["keys"]) == sorted(one["keys"])  # the same clips
    assert torch.allclose(two[0]["grad"], two[1]["grad"])  # DDP: every rank the same gradient
    assert torch.allclose(two[0]["grad"], one["grad"], atol=1e-6), (two[0]["grad"] - one["grad"]).abs().max()


# --------------------------------------------------------------------------- init_from


def test_init_from_loads_every_weight_strictly_and_refuses_another_front_end(dev, tmp_path, cli):
    ckpt = dev.general / "checkpoints" / "step_8.pt"
    base = [*SMOKE, f"data.shards={dev.shards}", f"train.init_from={dev.general}",
            "train.max_iters=1", "train.eval_every=1", "optim.name=sgd", "optim.lr=1e-12"]
    r = cli(train.main, [*base, f"run_dir={tmp_path / 'a'}", "features.n_mels=32"])
    assert r.returncode == 2 and "features.n_mels (checkpoint 64, this run 32)" in r.stderr, r
    # the head included: with a learning rate of ~0 one step keeps the general model's weights
    stats = dev.shards / "train" / next(p.name for p in (dev.shards / "train").glob("stats-*.json"))
    stats.rename(stats.with_suffix(".bak"))  # a filtered run must not write the split's statistics
    try:
        r = cli(train.main, [*base, f"run_dir={tmp_path / 'b'}", "data.devices=[b]"])
        assert r.returncode == 0, r
        assert not stats.exists()
    finally:
        stats.with_suffix(".bak").rename(stats)
    old, new = (torch.load(p, weights_only=True) for p in (ckpt, tmp_path / "b/checkpoints/step_1.pt"))
    for k, v in old["model"].items():
        if v.dtype.is_floating_point and "running" not in k:  # batch norm statistics adapt
            assert torch.allclose(v, new["model"][k], atol=1e-6), k
    assert torch.equal(old["feature_stats"]["mean"], new["feature_stats"]["mean"])
    assert new["train_devices"] == ["b"] and new["init_from"]["sha256"] == devices.file_sha256(ckpt)
    # another class list is refused, as is a checkpoint of another architecture's weights
    other = tmp_path / "other.pt"
    torch.save({**old, "classes": list(reversed(old["classes"]))}, other)
    r = cli(train.main, [*SMOKE, f"data.shards={dev.shards}", f"run_dir={tmp_path / 'c'}",
                         f"train.init_from={other}"])
    assert r.returncode == 2 and "classes" in r.stderr and "not this run's" in r.stderr, r
    torch.save({**old, "model": {k: v for k, v in old["model"].items() if "classifier" not in k}}, other)
    r = cli(train.main, [*SMOKE, f"data.shards={dev.shards}", f"run_dir={tmp_path / 'd'}",
                         f"train.init_from={other}"])
    assert r.returncode == 2 and "its weights do not fit this model" in r.stderr, r


# --------------------------------------------------------------------------- device sets


def test_finetune_trains_each_device_from_the_general_model_and_assembles_the_set(dev):
    record = json.loads((dev.devset / "devices.json").read_text())
    assert record["devices"] == DEVICES and list(record["members"]) == DEVICES
    assert record["general"]["sha256"] == devices.file_sha256(dev.general / "checkpoints" / "step_8.pt")
    for d in DEVICES:
        state = torch.load(dev.devset / record["members"][d]["checkpoint"], weights_only=True)
        cfg = state["config"]
        assert cfg["data"]["devices"] == [d] and state["train_devices"] == [d]
        assert (cfg["wandb"]["group"], cfg["wandb"]["job_type"]) == ("devset", "device")
        assert state["init_from"]["sha256"] == record["general"]["sha256"]
    # a rerun skips the finished devices and assembles the same set again
    before = (dev.devset / "devices.json").stat().st_mtime_ns
    assert devices.main(["finetune", str(dev.general), "--out", str(dev.devset),
                         "train.max_iters=4", "train.eval_every=4", "train.ckpt_every=4"]) == 0
    after = json.loads((dev.devset / "devices.json").read_text())
    assert after["members"] == record["members"] and (dev.devset / "devices.json").stat().st_mtime_ns >= before


def test_assemble_refuses_an_unfinished_set_and_loading_refuses_a_changed_member(dev, tmp_path, cli):
    part = tmp_path / "part"
    r = cli(devices.main, ["finetune", str(dev.general), "--out", str(part), "--only", "b",
                           "train.max_iters=2", "train.eval_every=2"])
    assert r.returncode == 0, r
    assert not (part / "devices.json").exists()  # --only: the array task does not assemble
    r = cli(devices.main, ["assemble", str(part)])
    assert r.returncode == 2 and "2 of 3 members cannot join" in r.stderr
    assert "a: not trained yet" in r.stderr and "s1: not trained yet" in r.stderr, r
    r = cli(devices.main, ["finetune", str(dev.general), "--out", str(part), "--devices", "a,b"])
    assert r.returncode == 2 and "was planned for devices ['a', 'b', 's1']" in r.stderr, r
    copy = tmp_path / "copy"
    shutil.copytree(dev.devset, copy)
    member = copy / json.loads((copy / "devices.json").read_text())["members"]["s1"]["checkpoint"]
    member.write_bytes(member.read_bytes() + b"x")
    with pytest.raises(devices.DeviceSetError, match="member s1: .* changed since the set was assembled"):
        devices.load_set(copy)
    member.unlink()
    with pytest.raises(devices.DeviceSetError, match="member s1: .* is missing"):
        devices.load_set(copy)


def _alone(dev, checkpoint: Path) -> tuple[dict, dict[str, tuple[str, np.ndarray]]]:
    """One checkpoint scored on the test split in this process (no report files): its report and
    {key: (predicted class, probabilities)}."""
    from asc_dist.data import build_source as source_of
    from asc_dist.restore import restore
    from asc_dist.validate import evaluate as score, sample_groups

    r = restore(checkpoint)
    cfg = config.from_dict({**config.to_dict(r.cfg), "data": {**config.to_dict(r.cfg)["data"],
                                                             "shards": str(dev.shards)}})
    with source_of(cfg, "test", train=False, rank=0, world_size=1, device="cpu", batch_size=8) as src:
        report, preds = score(r.model, src, r.standardize, sample_groups(cfg, "test"),
                              r.autocast(torch.device("cpu")), keep=True)
    names = r.classes
    return report, {k: (names[int(p.argmax())], p) for k, p in zip(preds.keys, preds.probs)}


def test_routed_evaluation_equals_each_device_scored_alone_by_its_model(dev, tmp_path, cli):
    out, stderr = _evaluated(dev, tmp_path, cli)
    assert "7 clip(s) of devices without a model of their own (s4: 7)" in stderr
    routed = read_predictions(out / "predictions.tsv")
    device_of = {s["key"]: s["device"] for s in samples(dev.shards / "test")}
    record = json.loads((dev.devset / "devices.json").read_text())
    for name, ckpt in [("general", record["general"]["checkpoint"]),
                       *[(d, m["checkpoint"]) for d, m in record["members"].items()]]:
        report, alone = _alone(dev, dev.devset / ckpt)
        mine = [k for k in alone if device_of[k] == name or (name == "general" and device_of[k] == "s4")]
        assert mine
        for k in mine:
            assert routed[k][0] == alone[k][0]
            np.testing.assert_allclose(routed[k][1], alone[k][1], atol=2e-6)
        if name == "general":
            general = report
    report = json.loads((out / "report.json").read_text())
    assert report["members"] == DEVICES
    assert report["general"]["classwise_accuracy"] == pytest.approx(general["classwise_accuracy"])
    assert report["gain"]["all"] == pytest.approx(report["classwise_accuracy"] - general["classwise_accuracy"])
    assert report["gain"]["s4"] == pytest.approx(0.0)
    groups = report["device_groups"]
    assert groups["known"]["devices"] == DEVICES and groups["unknown"]["devices"] == ["s4"]
    assert groups["real"]["devices"] == ["a", "b"] and groups["unseen"]["count"] == 7
    assert "log_loss" in report["breakdowns"]["device"]["b"]
    text = (out / "report.md").read_text()
    assert "| s4 | general |" in text and "| b | own |" in text and "| unknown | s4 |" in text


def test_predict_routes_files_by_a_device_list_or_their_names(dev, tmp_path, cli):
    audio = dev.data / "audio"
    files = sorted(audio.glob("*-s1.wav"))[:2] + sorted(audio.glob("*-s4.wav"))[:1]
    # by name: ...-s1.wav goes to s1's model
    r = cli(predict.main, [str(dev.devset), *map(str, files), "--out", str(tmp_path / "n.tsv"),
                           "--scores", "--workers", "0", "--quiet"])
    assert r.returncode == 0, r
    assert "1 clip(s) of devices without a model of their own (s4: 1)" in r.stderr
    by_name = read_tsv_probs(tmp_path / "n.tsv")
    s1 = devices.load_set(dev.devset).members["s1"]
    probs, _ = predict.predict_files(s1, [predict.Item(f, str(f)) for f in files[:2]], workers=0,
                                     progress=False)
    for i, f in enumerate(files[:2]):
        np.testing.assert_allclose(by_name[str(f)], probs[i].numpy(), atol=2e-6)
    # a --devices list (fold1_test.csv's layout) wins over the name: all three as device b
    table = tmp_path / "fold1_test.csv"
    table.write_text("filename\tdevice_id\n" + "".join(f"{f.name}\tb\n" for f in files))
    r = cli(predict.main, [str(dev.devset), *map(str, files), "--devices", str(table), "--out",
                           str(tmp_path / "l.tsv"), "--scores", "--workers", "0", "--quiet"])
    assert r.returncode == 0 and "without a model" not in r.stderr, r
    b = devices.load_set(dev.devset).members["b"]
    probs, _ = predict.predict_files(b, [predict.Item(f, str(f)) for f in files], workers=0,
                                     progress=False)
    listed = read_tsv_probs(tmp_path / "l.tsv")
    for i, f in enumerate(files):
        np.testing.assert_allclose(listed[str(f)], probs[i].numpy(), atol=2e-6)
    table.write_text("filename\tdevice\nx.wav\tb\n")
    r = cli(predict.main, [str(dev.devset), str(files[0]), "--devices", str(table), "--quiet"])
    assert r.returncode == 2 and "must name 'filename' and 'device_id'" in r.stderr


def read_tsv_probs(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    return {r[0]: np.asarray(r[2:], dtype=np.float64) for r in rows[1:]}


def test_predict_split_names_clips_by_file_and_routes_by_their_devices(dev, tmp_path, cli):
    r = cli(predict.main, [str(dev.devset), "--split", str(dev.shards / "test"), "--out",
                           str(tmp_path / "p.tsv"), "--scores", "--quiet"])
    assert r.returncode == 0, r
    got = read_tsv_probs(tmp_path / "p.tsv")
    assert sorted(got) == sorted(s["filename"] for s in samples(dev.shards / "test"))
    routed = read_predictions(_evaluated(dev, tmp_path, cli)[0] / "predictions.tsv")
    name = {s["key"]: s["filename"] for s in samples(dev.shards / "test")}
    for key, (_, p) in routed.items():
        np.testing.assert_allclose(got[name[key]], p, atol=2e-6)


def test_predict_split_of_an_evaluation_set_routes_by_its_listed_device_ids(dev, tmp_path, cli):
    """An evaluation set as DCASE 2025 ships it (anonymous names, fold1_test.csv with device_id,
    no labels), packed and predicted: the listed ids route the clips, not the names."""
    from asc_dist import pack

    root = tmp_path / "eval"
    (root / "audio").mkdir(parents=True)
    (root / "evaluation_setup").mkdir()
    test = sorted(p for p in (dev.data / "audio").iterdir() if p.name.endswith(("-s1.wav", "-s4.wav")))[:4]
    listed = {}
    for i, f in enumerate(test):
        shutil.copyfile(f, root / "audio" / f"{i}.wav")
        listed[f"audio/{i}.wav"] = "b" if i % 2 else "s7"  # b has a model, s7 none
    (root / "evaluation_setup" / "fold1_test.csv").write_text(
        "filename\tdevice_id\n" + "".join(f"{k}\t{v}\n" for k, v in listed.items()))
    out = tmp_path / "shards"
    pack.pack(root, out, sample_rate=16000, classes=str(dev.shards / "train" / "manifest.json"),
              workers=1, progress=False, verbose=False)
    r = cli(predict.main, [str(dev.devset), "--split", str(out / "eval"), "--out",
                           str(tmp_path / "p.tsv"), "--scores", "--quiet"])
    assert r.returncode == 0, r
    assert "2 clip(s) of devices without a model of their own (s7: 2)" in r.stderr
    got = read_tsv_probs(tmp_path / "p.tsv")
    assert sorted(got) == sorted(listed)
    dset = devices.load_set(dev.devset)
    items = [predict.Item(root / k, k) for k in sorted(listed)]
    for name, model in (("b", dset.members["b"]), ("s7", dset.general)):
        chosen = [it for it in items if listed[it.name] == name]
        probs, _ = predict.predict_files(model, chosen, workers=0, progress=False)
        for i, it in enumerate(chosen):
            np.testing.assert_allclose(got[it.name], probs[i].numpy(), atol=2e-6)


def _evaluated(dev, tmp_path: Path, cli, *extra: str) -> tuple[Path, str]:
    """``evaluate DEVSET`` on the test split (with ``extra`` options): its output dir and log,
    once per module for each set of options."""
    done = dev.__dict__.setdefault("evaluated", {})
    if extra not in done:
        out = tmp_path / ("eval" + "".join(extra).replace("-", ""))
        r = cli(evaluate.main, [str(dev.devset), "--split", str(dev.shards / "test"), "--out",
                                str(out), "--quiet", *extra])
        assert r.returncode == 0, r
        done[extra] = (out, r.stderr)
    return done[extra]


def test_fp16_evaluation_gives_the_fp32_labels_on_the_test_clips(dev, tmp_path, cli):
    half_dir, _ = _evaluated(dev, tmp_path, cli, "--precision", "fp16")
    half = read_predictions(half_dir / "predictions.tsv")
    full = read_predictions(_evaluated(dev, tmp_path, cli)[0] / "predictions.tsv")  # fp32: the run's
    assert len(half) == 30 and {k: v[0] for k, v in half.items()} == {k: v[0] for k, v in full.items()}
    diff = max(np.abs(half[k][1] - full[k][1]).max() for k in half)
    assert 0 < diff < 1e-2  # float16 for real, and close
    assert json.loads((half_dir / "report.json").read_text())["precision"] == "fp16"


def test_complexity_counts_every_member_and_the_maxima(dev, cli):
    r = cli(__import__("asc_dist.complexity", fromlist=["main"]).main,
            [str(dev.devset), "--json", "--limits", "dcase2025"])
    assert r.returncode == 0, r
    out = json.loads(r.stdout)
    assert list(out["models"]) == ["general", *DEVICES]
    assert out["max_params"] == out["models"]["b"]["params"] == 116_118  # the 2018 baseline CNN
    assert not out["within_limits"] and "dcase2025 exceeded" in r.stderr


# --------------------------------------------------------------------------- the recipes


RECIPE25 = ["conf/data/tau2022.yaml", "conf/experiment/dcase2024_baseline.yaml",
            "conf/experiment/dcase2025_general.yaml"]


@pytest.mark.parametrize("clips", [34_905])
def test_the_dcase2025_recipes_derive_the_published_run_lengths(clips):
    """train_base.py / train_device_specific.py: batch 256, the last partial batch kept, 150 and 50
    epochs, warm-up 2000 and 200 steps below the run, fp16 test; every member of a set is the
    61,148-parameter, 29,419,156-MAC CP-Mobile."""
    from asc_dist import complexity
    from asc_dist.models import build_model

    general = config.load(RECIPE25)
    t = general.train
    assert (t.epochs, t.global_batch, t.drop_last, t.eval_precision) == (150, 256, False, "fp16")
    assert (general.complexity.limits, general.augment.mixstyle.p, general.optim.lr) == ("dcase2025", 0.4, 0.005)
    device = config.load([*RECIPE25, "conf/experiment/dcase2025_device.yaml"])
    assert (device.train.epochs, device.optim.lr, device.optim.warmup_iters) == (50, 0.0005, 200)
    assert device.augment.mixstyle.p == 0 and device.augment.freq_mask.width == 48
    assert device.augment.roll_seconds == 0.1 and device.train.drop_last is False
    steps = -(-clips // 256)  # ceil: the DataLoader keeps the last batch
    assert train_steps(clips, 256, 1, drop_last=False) == steps
    assert train_steps(clips, 256, 1) == clips // 256
    assert 150 * steps > general.optim.warmup_iters  # the cosine decays
    per_device = -(-clips // 6 // 256)  # a sixth of the clips per device, roughly
    assert 50 * per_device > device.optim.warmup_iters
    counts = complexity.for_models(
        {d: build_model(general.model, 10, load_weights=False) for d in ("general", *DEVICES)},
        [1, 1, 256, 65], clip_seconds=1.0, limits="dcase2025")
    assert {(m["params"], m["macs"]) for m in counts["models"].values()} == {(61_148, 29_419_156)}
    assert counts["within_limits"] and counts["max_param_bytes"] == 122_296


def test_the_general_recipe_refuses_a_warmup_as_long_as_a_tiny_split(dev, cli, tmp_path):
    """30 clips, batch 256 kept whole: one step per epoch, 150 iterations, below the 2000 warm-up."""
    r = cli(train.main, [*RECIPE25, f"data.shards={dev.shards}", f"run_dir={tmp_path}",
                         "features.sample_rate=16000", "features.f_max=8000", "features.frames=33",
                         "data.backend=torch",
                         "train.device=cpu"])
    assert r.returncode == 2 and "optim.warmup_iters=2000 is not below the run's 150" in r.stderr, r


# --------------------------------------------------------------------------- the resampler


def test_torchaudio_resampler_is_packed_recorded_carried_and_used_by_predict(tmp_path, cli):
    import torchaudio.functional

    from asc_dist import pack
    from asc_dist.frontend import LogMel

    data = synth.generate(tmp_path / "d", clips_per_class=2, duration=1.0, sample_rate=22050,
                          channels=1, progress=False)
    out = tmp_path / "shards"
    pack.pack(data, out, sample_rate=16000, resampler="torchaudio", workers=1, progress=False,
              verbose=False)
    m = json.loads((out / "train" / "manifest.json").read_text())
    assert m["settings"]["resampler"] == "torchaudio"
    rec = samples(out / "train")[0]
    src, sr = sf.read(data / rec["filename"], dtype="float32")
    want = torchaudio.functional.resample(torch.from_numpy(src), sr, 16000).numpy()
    import tarfile

    with tarfile.open(next((out / "train").glob("*.tar"))) as t:
        got, _ = sf.read(t.extractfile(f"{rec['key']}.wav"), dtype="float32")
    np.testing.assert_allclose(got, want, atol=2e-7)  # 24-bit quantisation of the same signal
    run = tmp_path / "run"
    assert train.main([*SMOKE, f"data.shards={out}", f"run_dir={run}", "train.max_iters=1",
                       "train.eval_every=1"]) == 0
    restored = predict.load_model_or_set(run)
    assert restored.resampler == "torchaudio"
    f = data / rec["filename"]
    probs, _ = predict.predict_files(restored, [predict.Item(f, f.name)], workers=0, progress=False)
    x = restored.standardize(LogMel(restored.cfg.features)(torch.from_numpy(want)))
    with torch.no_grad():
        direct = restored.model(x).softmax(dim=1)[0]
    np.testing.assert_allclose(probs[0].numpy(), direct.numpy(), atol=1e-6)
    with pytest.raises(Exception, match="resampler 'sinc'"):
        pack.pack(data, tmp_path / "x", resampler="sinc", progress=False, verbose=False)


# --------------------------------------------------------------------------- SLURM


def test_devices_sh_dry_run_submits_one_array_task_per_device_and_an_assembly_after_them():
    p = subprocess.run(["bash", "slurm/devices.sh", "runs/general", "--out", "devsets/x",
                        "--devices", "a,b,s1", "--after", "12", "--dry-run",
                        "conf/experiment/dcase2025_device.yaml", "wandb.mode=online"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    array, assemble = p.stdout.strip().splitlines()
    assert array.startswith("sbatch --job-name=x-devices --array=0-2 ")
    assert "ASC_MODULE=asc_dist.devices" in array and "--dependency=afterok:12" in array
    assert array.endswith("slurm/train.sbatch finetune runs/general --out devsets/x --devices "
                          "a\\,b\\,s1 --array-task conf/experiment/dcase2025_device.yaml wandb.mode=online")
    assert "--dependency=afterok:\\<x-devices\\>" in assemble and "asc_dist.devices\\ assemble" in assemble
    for args, why in ((["--out", "d"], "GENERAL"), (["g"], "--out DEVSET"),
                      (["g", "--out", "d", "--devices", "a;b"], "not a comma list")):
        bad = subprocess.run(["bash", "slurm/devices.sh", *args, "--dry-run"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=False)
        assert bad.returncode == 2 and why in bad.stderr, bad.stderr


def test_array_task_picks_its_device_and_a_wrong_one_is_refused(dev, monkeypatch, cli):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    r = cli(devices.main, ["finetune", str(dev.general), "--out", str(dev.devset), "--devices",
                           "a,b,s1", "--array-task"])
    assert r.returncode == 2 and "SLURM_ARRAY_TASK_ID='7'" in r.stderr, r
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # b: finished, so skipped
    r = cli(devices.main, ["finetune", str(dev.general), "--out", str(dev.devset), "--devices",
                           "a,b,s1", "--array-task", "train.max_iters=4"])
    assert r.returncode == 0 and "device b: " in r.stderr and "is finished; skipped" in r.stderr, r


def test_config_errors_name_the_key_before_any_training(dev, tmp_path, cli):
    r = cli(devices.main, ["finetune", str(dev.general), "--out", str(tmp_path / "x"), "optim.lrr=1"])
    assert r.returncode == 2 and "optim.lrr" in r.stderr and not (tmp_path / "x").exists()
    r = cli(devices.main, ["finetune", str(dev.general), "--out", str(tmp_path / "x"), "notakey"])
    assert r.returncode == 2 and "'notakey': expected a YAML file or key=value" in r.stderr, r


# --------------------------------------------------------------------------- the DCASE 2025 package


LABEL = "Doe_ACME_task1"


@pytest.fixture(scope="module")
def package(dev) -> SimpleNamespace:
    """The set exported as module 1 (fp32) and module 2 (fp16), installed as pip installs it,
    imported with asc_dist made unimportable."""
    from asc_dist import export

    out = dev.base / "package"
    for index, precision in ((1, "fp32"), (2, "fp16")):
        assert export.main([str(dev.devset), "--dcase2025", str(out), "--label", LABEL, "--index",
                            str(index), "--precision", precision]) == 0
    target = dev.base / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-compile", "--target", str(target), str(out)],
                   check=True, capture_output=True, timeout=300)
    saved = {k: v for k, v in sys.modules.items() if k == "asc_dist" or k.startswith("asc_dist.")}
    sys.modules["asc_dist"] = None  # any import of asc_dist from the package fails
    sys.path.insert(0, str(target))
    try:
        mods = [importlib.import_module(f"{LABEL}.{LABEL}_{i}") for i in (1, 2)]
        runner = importlib.import_module(f"{LABEL}.run")
    finally:
        sys.path.remove(str(target))
        del sys.modules["asc_dist"]
        sys.modules.update(saved)
    return SimpleNamespace(out=out, site=target, fp32=mods[0], fp16=mods[1], runner=runner)


def _wav(path: Path, sr: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(1.2 * sr)) / sr
    x = 0.2 * np.sin(2 * np.pi * (300 + 200 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(path, np.stack([x, 0.7 * x], axis=1), sr, subtype="PCM_24")
    return path


def test_the_package_predicts_what_asc_dist_predicts_routed_by_device(dev, package, tmp_path, cli):
    """WAVs at 32, 44.1 and 48 kHz (resampled to the model's 16 kHz), devices with a model and
    without: the package's probabilities equal asc_dist.predict's on the same set."""
    files = [_wav(tmp_path / f"x-paris-1-{i}-0-{d}.wav", sr, i)
             for i, (sr, d) in enumerate([(32000, "a"), (44100, "s1"), (48000, "s4"), (44100, "b")])]
    ids = [f.stem.rsplit("-", 1)[1] for f in files]
    logits, classes = package.fp32.predict([str(f) for f in files], ids, use_cuda=False)
    assert classes == devices.load_set(dev.devset).classes  # the training order
    r = cli(predict.main, [str(dev.devset), *map(str, files), "--out", str(tmp_path / "p.tsv"),
                           "--scores", "--workers", "0", "--quiet"])
    assert r.returncode == 0, r
    want = read_tsv_probs(tmp_path / "p.tsv")
    for f, row in zip(files, logits):
        np.testing.assert_allclose(torch.softmax(row, -1).numpy(), want[str(f)], atol=1e-3)
    model = package.fp32.load_model()
    assert package.fp32.get_model_for_device(model, "s4") is model.general  # no model: general
    assert package.fp32.get_model_for_device(model, "s1") is model.device_models["s1"]
    assert package.fp32.get_model_for_device(model, "unknown") is model.general
    # the same file as device b and as an unknown id: b's own model vs the general model
    (as_b,), _ = package.fp32.predict([str(files[0])], ["b"], use_cuda=False)
    (as_x,), _ = package.fp32.predict([str(files[0])], ["zz"], use_cuda=False)
    x = package.fp32.load_inputs([str(files[0])], ["b"], model)[0]
    assert x.shape == (1, 1, 64, 32) and x.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(as_b, model.device_models["b"](x)[0], atol=1e-5)
        assert torch.allclose(as_x, model.general(x)[0], atol=1e-5)
    assert not torch.allclose(as_b, as_x)


def test_the_package_ships_its_files_complexity_and_a_runner_writing_output_csv(dev, package, tmp_path):
    pkg = package.out / LABEL
    assert sorted(p.name for p in pkg.glob(f"{LABEL}_*.py")) == [f"{LABEL}_1.py", f"{LABEL}_2.py"]
    assert (package.out / "requirements.txt").read_text().split() == ["torch", "numpy", "soundfile", "soxr"]
    assert 'python_requires=">=3.11"' in (package.out / "setup.py").read_text()
    runtime = (pkg / "_runtime.py").read_text()
    assert "asc_dist" not in runtime.split('"""', 2)[2]  # the code, past the docstring
    c = json.loads((pkg / "resources" / f"{LABEL}_1" / "complexity.json").read_text())
    assert c["devices"]["s1"]["model"] == "s1" and c["devices"]["s7"]["model"] == "general"
    assert c["max_MACs"] == c["devices"]["a"]["MACs"] == 10_520_854 and c["max_Params"] == 4 * 116_118
    assert json.loads((pkg / "resources" / f"{LABEL}_2" / "complexity.json").read_text())["max_Params"] == 2 * 116_118
    test = dev.data / "evaluation_setup" / "fold1_evaluate.csv"
    listed = tmp_path / "fold1_test.csv"  # the evaluation sets' layout: filename + device_id
    rows = [r.split("\t")[0] for r in test.read_text().splitlines()[1:]]
    listed.write_text("filename\tdevice_id\n" + "".join(f"{r}\t{r[:-4].rsplit('-', 1)[1]}\n" for r in rows))
    out = tmp_path / "predictions"
    assert package.runner.main(["--submission", f"{LABEL}_1", "--list", str(listed), "--root",
                                str(dev.data), "--out", str(out)]) == 0
    with open(out / "output.csv", newline="") as f:
        table = list(csv.reader(f, delimiter="\t"))
    classes = devices.load_set(dev.devset).classes
    assert table[0] == ["filename", "scene_label", *classes]
    assert [r[0] for r in table[1:]] == rows and all(r[1] in classes for r in table[1:])
    assert all(abs(sum(map(float, r[2:])) - 1) < 1e-4 for r in table[1:])
    assert (out / "complexity.json").is_file()


def test_fp16_package_gives_the_fp32_labels_on_the_test_clips(dev, package):
    test = dev.data / "evaluation_setup" / "fold1_evaluate.csv"
    names = [r.split("\t")[0] for r in test.read_text().splitlines()[1:]]
    files = [str(dev.data / n) for n in names]
    ids = [n[:-4].rsplit("-", 1)[1] for n in names]
    full, _ = package.fp32.predict(files, ids, use_cuda=False)
    half, _ = package.fp16.predict(files, ids, use_cuda=False)
    model = package.fp16.load_model()
    assert next(model.general.parameters()).dtype == torch.float16
    assert package.fp16.load_inputs(files[:1], ids[:1], model)[0].dtype == torch.float16
    assert len(files) == 30
    assert [int(a.argmax()) for a in full] == [int(b.argmax()) for b in half]
    assert max(float((a - b.float()).abs().max()) for a, b in zip(full, half)) > 0  # fp16 for real


def test_package_export_refuses_what_it_cannot_write(dev, package, tmp_path, cli):
    from asc_dist import export

    base = [str(dev.devset), "--dcase2025"]
    r = cli(export.main, [*base, str(package.out), "--label", LABEL])
    assert r.returncode == 2 and f"already holds {LABEL}_1" in r.stderr, r
    r = cli(export.main, [*base, str(tmp_path / "p"), "--label", "acme"])
    assert r.returncode == 2 and "Lastname_INSTITUTION_task1" in r.stderr, r
    r = cli(export.main, [*base, str(tmp_path / "p"), "--label", LABEL, "--index", "5"])
    assert r.returncode == 2 and "--index 5" in r.stderr, r
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    r = cli(export.main, [*base, str(tmp_path / "other"), "--label", LABEL])
    assert r.returncode == 2 and "is not the package" in r.stderr, r
    assert (tmp_path / "other" / "x.txt").read_text() == "mine"


@pytest.mark.parametrize("rates", [(44100, 32000), (48000, 16000), (16000, 44100)])
def test_the_packages_own_resampler_equals_torchaudios(rates):
    import torchaudio.functional

    from asc_dist.submission_runtime import resample_sinc

    x = torch.from_numpy(np.random.default_rng(1).standard_normal(rates[0] // 3).astype(np.float32))
    want = torchaudio.functional.resample(x, *rates)
    got = resample_sinc(x, *rates)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 1e-5
