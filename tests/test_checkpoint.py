import os
import random

import numpy as np
import pytest
import torch

from asc_dist import checkpoint as ckpt_lib
from asc_dist.checkpoint import (
    Checkpointer,
    CheckpointError,
    check_compatible,
    rng_state,
    set_rng_state,
)

CLASSES = ["airport", "bus", "park"]


def state(step: int, **extra) -> dict:
    return {
        "step": step,
        "model": {"w": torch.full((4, 3), float(step))},
        "config": {"model": {"name": "resnet18"}},
        "classes": list(CLASSES),
        "model_name": "resnet18",
        "wandb_id": None,
        "best_metric": 0.5,
        **extra,
    }


def names(ck: Checkpointer) -> set[str]:
    return {p.name for p in ck.dir.iterdir()}


def test_save_writes_file_pointer_and_loads_weights_only(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    path = ck.save(10, state(10, rng=rng_state()))
    assert path == tmp_path / "checkpoints" / "step_10.pt"
    assert (ck.dir / "latest").read_text().strip() == "step_10.pt"
    assert names(ck) == {"step_10.pt", "latest"}  # no temporaries left behind
    assert ck.latest() == path
    loaded = ck.load(path)
    assert loaded["step"] == 10 and torch.equal(loaded["model"]["w"], torch.full((4, 3), 10.0))


def test_non_writer_writes_nothing(tmp_path):
    ck = Checkpointer(tmp_path, is_writer=False)
    assert ck.save(1, state(1)) is None
    assert not (tmp_path / "checkpoints").exists()
    assert ck.latest() is None


def test_failed_save_keeps_previous_latest(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path)
    good = ck.save(5, state(5))
    with pytest.raises(CheckpointError, match="step_6.pt"):
        ck.save(6, state(6, bad=lambda: None))  # cannot be pickled
    assert names(ck) == {"step_5.pt", "latest"}

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(CheckpointError, match="disk full"):
        ck.save(7, state(7))
    monkeypatch.undo()
    assert names(ck) == {"step_5.pt", "latest"}
    assert ck.latest() == good and ck.load(good)["step"] == 5


def test_keep_last_prunes_but_best_survives(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in range(1, 6):
        ck.save(step, state(step), best=step == 2)
    assert names(ck) == {"step_4.pt", "step_5.pt", "latest", "best.pt"}
    assert ck.load(ck.dir / "best.pt")["step"] == 2
    ck.save(6, state(6), best=True)
    assert ck.load(ck.dir / "best.pt")["step"] == 6
    assert names(ck) == {"step_5.pt", "step_6.pt", "latest", "best.pt"}


def test_truncated_latest_falls_back_with_warning(tmp_path, capsys):
    ck = Checkpointer(tmp_path, keep_last=3)
    for step in (10, 20, 30):
        ck.save(step, state(step))
    newest = ck.dir / "step_30.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    assert ck.latest() == ck.dir / "step_20.pt"
    assert "warning: checkpoint" in (err := capsys.readouterr().err) and "step_30.pt" in err
    with pytest.raises(CheckpointError, match="step_30.pt"):
        ck.load(newest)
    # Garbage and empty files are skipped too; nothing loadable -> None.
    (ck.dir / "step_20.pt").write_bytes(b"not a zip")
    (ck.dir / "step_10.pt").write_bytes(b"")
    assert ck.latest() is None
    assert capsys.readouterr().err.count("warning: checkpoint") == 3


def test_resume_from_older_checkpoint_keeps_new_saves(tmp_path):
    # After falling back from a corrupt step_30, the run saves step_20 again, then step_25:
    # the stale step_30 must neither win `latest` nor cause the fresh saves to be pruned.
    ck = Checkpointer(tmp_path, keep_last=1)
    for step in (10, 20, 30):
        ck.save(step, state(step))
    (ck.dir / "step_30.pt").write_bytes(b"garbage")
    ck.save(20, state(20))
    ck.save(25, state(25))
    assert "step_25.pt" in names(ck)
    assert ck.latest() == ck.dir / "step_25.pt"


def test_missing_file_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt"):
        ckpt_lib.load(tmp_path / "nope.pt")


def test_rng_round_trip_reproduces_streams(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    ck = Checkpointer(tmp_path)
    ck.save(1, state(1, rng=rng_state()))  # through a real weights_only save/load
    expected = (random.random(), np.random.standard_normal(4), np.random.rand(3), torch.rand(5))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    set_rng_state(ck.load(ck.latest())["rng"])
    got = (random.random(), np.random.standard_normal(4), np.random.rand(3), torch.rand(5))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[2], expected[2])
    assert torch.equal(got[3], expected[3])


def test_check_compatible():
    ck = state(40)
    check_compatible(ck, model_name="resnet18", classes=list(CLASSES))
    with pytest.raises(CheckpointError, match=r"model 'resnet18'; this run uses model 'resnet50'"):
        check_compatible(ck, model_name="resnet50", classes=list(CLASSES), path="run/step_40.pt")
    with pytest.raises(CheckpointError, match=r"classes .*'park'\]; this run uses classes"):
        check_compatible(ck, model_name="resnet18", classes=["airport", "park", "bus"])
    # Only step/config/classes are needed: the model name may come from the saved config.
    minimal = {"step": 1, "config": {"model": {"name": "resnet18"}}, "classes": list(CLASSES)}
    check_compatible(minimal, model_name="resnet18", classes=list(CLASSES))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rng_round_trip():
    torch.cuda.manual_seed(5)
    torch.rand(1, device="cuda")  # CUDA in use: its state is part of rng_state()
    saved = rng_state()
    assert "cuda" in saved
    expected = torch.rand(8, device="cuda")
    torch.cuda.manual_seed(123)
    set_rng_state(saved)
    assert torch.equal(torch.rand(8, device="cuda"), expected)


def _tensors(obj, where="state"):
    """(where, tensor) for every tensor in a nested state."""
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{where}[{i}]")


def _trained_state(device: str) -> dict:
    """A checkpoint's parts as the trainer makes them: a model with BatchNorm (its state dict
    carries _metadata), an optimizer after a step (per-parameter state tensors), the RNG states."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 4, device=device)).square().mean().backward()
    opt.step()
    return state(7, model=model.state_dict(), optimizer=opt.state_dict(), rng=rng_state())


def test_to_cpu_moves_every_tensor_and_keeps_the_containers():
    from collections import OrderedDict, namedtuple

    Pair = namedtuple("Pair", "a b")
    cpu = torch.arange(3.0)
    nested = {"model": _trained_state("cpu")["model"],
              "list": [cpu, (torch.ones(2), "x")], "pair": Pair(torch.zeros(1), 5),
              "ordered": OrderedDict(k=torch.ones(1)), "n": 3, "s": "text", "none": None}
    out = ckpt_lib.to_cpu(nested)
    assert [w for w, t in _tensors(out)] == [w for w, t in _tensors(nested)]
    assert all(t.device.type == "cpu" for _, t in _tensors(out))
    assert type(out["model"]) is OrderedDict and out["model"]._metadata == nested["model"]._metadata
    assert type(out["pair"]) is Pair and type(out["list"][1]) is tuple and type(out["ordered"]) is OrderedDict
    assert (out["n"], out["s"], out["none"]) == (3, "text", None)
    assert out["list"][0] is cpu  # CPU tensors are kept, not copied


def test_to_cpu_refuses_a_tensor_without_data_naming_where_it_is(tmp_path):
    bad = {"optimizer": {"state": {0: {"exp_avg": torch.empty(3, device="meta")}}}}
    with pytest.raises(ValueError, match=r"state\['optimizer'\]\['state'\]\[0\]\['exp_avg'\] is a tensor on the meta device"):
        ckpt_lib.to_cpu(bad)
    ck = Checkpointer(tmp_path)
    ck.save(1, state(1))
    with pytest.raises(CheckpointError, match=r"step_2\.pt: .*\['exp_avg'\] is a tensor on the meta"):
        ck.save(2, state(2, **bad))
    assert ck.latest() == ck.dir / "step_1.pt" and not (ck.dir / "step_2.pt").exists()


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs a CUDA GPU")]),
])
def test_a_checkpoint_loads_weights_only_with_every_tensor_on_the_cpu(tmp_path, device):
    """A GPU run's checkpoint opens on a CPU-only host: plain torch.load, no map_location."""
    saved = _trained_state(device)
    assert {t.device.type for _, t in _tensors(saved["model"])} == {device}
    path = Checkpointer(tmp_path).save(7, saved)
    loaded = torch.load(path, weights_only=True)
    found = list(_tensors(loaded))
    assert len(found) == len(list(_tensors(saved))) > 10  # model, Adam state, RNG states
    assert [w for w, t in found if t.device.type != "cpu"] == []
    for (w, a), (_, b) in zip(found, _tensors(saved)):
        assert torch.equal(a, b.cpu()), w
