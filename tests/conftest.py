"""Shared fixtures: tiny synthetic TUT-layout datasets and shards packed from them.

Session-scoped fixtures (build once, treat as read-only):
  synth_dataset  -> Path of a TUT 2018 layout dataset: 10 scenes x 4 clips, 1 s, 16 kHz,
                    stereo 24-bit WAV (fold 1: 20 train / 20 test clips, split by location)
  packed_shards  -> Path of OUT_DIR packed from it at 16 kHz mono PCM_24, shard_max_samples=4:
                    OUT_DIR/train/ (20 samples, 5 shards) and OUT_DIR/test/ (20 samples, 5 shards)

For variants call ``make_dataset`` / ``make_shards`` (importable: ``from conftest import
make_shards``) with your own tmp dir, or use the ``shard_factory`` fixture.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from asc_dist import pack as _pack
from asc_dist import synth as _synth

FIXTURE_SAMPLE_RATE = 16000


def make_dataset(
    out_dir: str | Path,
    clips_per_class: int = 4,
    duration: float = 1.0,
    sample_rate: int = FIXTURE_SAMPLE_RATE,
    seed: int = 0,
    channels: int = 2,
    **kw,
) -> Path:
    """A synthetic TUT-2018-layout dataset in ``out_dir`` (see asc_dist.synth.generate)."""
    return _synth.generate(
        out_dir, clips_per_class=clips_per_class, duration=duration, sample_rate=sample_rate,
        seed=seed, channels=channels, progress=False, **kw,
    )


def make_shards(
    tmp_dir: str | Path,
    clips_per_class: int = 4,
    duration: float = 1.0,
    sample_rate: int = FIXTURE_SAMPLE_RATE,
    shard_max_samples: int | None = 4,
    seed: int = 0,
    workers: int = 1,
    dataset: str | Path | None = None,
    **pack_kw,
) -> Path:
    """Synthesise (unless ``dataset`` is given) and pack; returns OUT_DIR (train/ and test/).

    The dataset goes to ``tmp_dir/dataset``, shards to ``tmp_dir/shards``; shards are stored at
    ``sample_rate`` (the source rate too, so nothing is resampled).
    """
    tmp_dir = Path(tmp_dir)
    if dataset is None:
        dataset = make_dataset(tmp_dir / "dataset", clips_per_class, duration, sample_rate, seed)
    out = tmp_dir / "shards"
    _pack.pack(
        dataset, out, sample_rate=sample_rate, shard_max_samples=shard_max_samples, seed=seed,
        workers=workers, progress=False, verbose=False, **pack_kw,
    )
    return out


@pytest.fixture(scope="session", autouse=True)
def _logging():
    """Library code called directly logs as under a command (cli.command sets this up there)."""
    from asc_dist.cli import setup_logging

    setup_logging()


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synth") / "dataset")


@pytest.fixture(scope="session")
def packed_shards(tmp_path_factory, synth_dataset) -> Path:
    return make_shards(tmp_path_factory.mktemp("packed"), dataset=synth_dataset)


@pytest.fixture
def shard_factory(tmp_path):
    """``shard_factory(**make_shards_kwargs) -> OUT_DIR`` in this test's tmp dir."""
    n = [0]

    def factory(**kw) -> Path:
        n[0] += 1
        return make_shards(tmp_path / f"variant{n[0]}", **kw)

    return factory


def exit_spawned_rank() -> None:
    """End a spawned gloo rank that has written its results and torn its process group down:
    skip the interpreter's finalisation, where torch's gloo threads occasionally abort the
    process ("terminate called without an active exception", PITFALLS.md), which
    torch.multiprocessing.spawn would report as a failed rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Ran:
    """What an in-process command left: exit code, stdout (its result) and stderr (its log)."""

    def __init__(self, rc: int, out: str, err: str) -> None:
        self.returncode, self.stdout, self.stderr = rc, out, err

    def __repr__(self) -> str:
        return f"exit {self.returncode}\nSTDOUT:\n{self.stdout[-4000:]}\nSTDERR:\n{self.stderr[-4000:]}"


@pytest.fixture
def cli(capsys):
    """``cli(main, argv) -> Ran``: run a command's ``main`` in this process, as its console entry
    point would (logging set up by the command itself), with its stdout/stderr captured apart."""

    def run(main, argv: list[str]) -> Ran:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return Ran(rc, out, err)

    return run



# Under pytest-xdist (launch/test.sh: two workers, one file per worker at a time) the files with
# the longest runs go first, so the suite does not end with one worker idle beside a long file.
# Longest first, by the seconds each file took in a full run (2026-12-06); launch/test.sh keeps
# xdist from reordering the files by their number of tests.
_LONG_FILES = ("test_slurm.py", "test_train.py", "test_gpu_check.py", "test_launch.py",
               "test_table1.py", "test_devices.py", "test_distill.py", "test_evaluate.py",
               "test_data.py", "test_offline_bundle.py", "test_passt.py", "test_model.py",
               "test_data_dist.py", "test_bench.py", "test_tracking.py", "test_dist.py",
               "test_export.py", "test_predict.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return _LONG_FILES.index(name) if name in _LONG_FILES else len(_LONG_FILES)

    items.sort(key=rank)  # stable: the order within a file is kept
