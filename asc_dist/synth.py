"""Synthetic acoustic scenes in the exact TUT Urban Acoustic Scenes 2018 development layout.

``python -m asc_dist.synth OUT_DIR`` writes::

    OUT_DIR/audio/<scene>-<city>-<location>-<segment>-a.wav   (48 kHz, 24-bit, stereo by default)
    OUT_DIR/meta.csv                                           (tab-separated, with header)
    OUT_DIR/evaluation_setup/fold1_train.txt                   (file TAB label)
    OUT_DIR/evaluation_setup/fold1_test.txt                    (file)
    OUT_DIR/evaluation_setup/fold1_evaluate.txt                (file TAB label)

The scene classes and their rendering are asc_dist.scenes. Test locations never occur in
training, so a model must learn the class signature rather than memorise locations: chance is
10 %, a small CNN gets well above 80 % on held-out locations.

``--devices a,b,s1 [--unseen-devices s4]`` records the scenes with simulated devices instead
(asc_dist.scenes.record: a fixed filter per device, "a" flat) in the TAU Urban Acoustic Scenes
2022 Mobile layout (1-s clips by default): ``audio/<scene>-<city>-<location>-<segment>-0-<device>.wav``,
meta.csv's ``source_label`` the device, ``evaluation_setup/fold1_{train,evaluate,test}.csv`` with a
header row. Training clips take the ``--devices`` in turn; test clips those and the unseen ones,
which never occur in training (DCASE 2025's devices s4-s6).

Deterministic: the same arguments give byte-identical files.
"""


from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from asc_dist import atomic
from asc_dist.audio import tune_malloc
from asc_dist.cli import command
from asc_dist.errors import UserError
from asc_dist.scenes import (
    CITIES,
    SCENES,
    SPECS,
    city_eqs,
    jitter_location,
    location_shape_db,
    record,
    render_clip,
    seeded,
)

log = logging.getLogger(__name__)

DEVICE = "a"
DEVICE_NAME = re.compile(r"(?=.*[a-z])[a-z0-9]+")  # as asc_dist.pack.layouts.TUT_NAME reads it
META_HEADER = "filename\tscene_label\tidentifier\tsource_label"


def _plan(clips_per_class: int, seed: int, segments_per_location: int, test_fraction: float):
    """Assign every clip a city, location id, segment id and fold-1 split.

    Location ids count up per city across scenes (so ``city-loc`` identifies one place) and
    segment ids count up globally, like the real file names.
    """
    rng = seeded(seed, 0)
    city_next_loc = {c: 0 for c in CITIES}
    segment = 0
    clips = []
    for ci, scene in enumerate(SCENES):
        n_loc = max(2, math.ceil(clips_per_class / segments_per_location))
        n_loc = min(n_loc, max(2, clips_per_class))
        n_test = min(n_loc - 1, max(1, round(n_loc * test_fraction)))
        test_locs = set(rng.permutation(n_loc)[:n_test].tolist())
        city_order = rng.permutation(len(CITIES))
        # Spread clips over locations as evenly as possible.
        per_loc = [clips_per_class // n_loc + (i < clips_per_class % n_loc) for i in range(n_loc)]
        for li in range(n_loc):
            city = CITIES[city_order[li % len(CITIES)]]
            loc_id = city_next_loc[city]
            city_next_loc[city] += 1
            for _ in range(per_loc[li]):
                clips.append({
                    "scene": scene, "class_idx": ci, "city": city, "loc_id": loc_id,
                    "loc_index": li, "segment": segment, "test": li in test_locs,
                })
                segment += 1
    return clips


def split_sizes(clips_per_class: int, seed: int = 0, segments_per_location: int = 4,
                test_fraction: float = 0.3) -> tuple[int, int]:
    """(train, test) clip counts of :func:`generate` with these arguments, without making any."""
    clips = _plan(clips_per_class, seed, segments_per_location, test_fraction)
    test = sum(c["test"] for c in clips)
    return len(clips) - test, test


def _make_clip(task: tuple) -> None:
    """Worker: render one clip and write it. Depends only on its task, so any worker count
    gives the same bytes."""
    path, params, city, segment, seed, n, sr, channels, subtype, device = task
    freqs, eqs = city_eqs(seed, n, sr)
    shape = location_shape_db(params, eqs[city], freqs)
    x = record(render_clip(params, shape, eqs[city], seeded(seed, 3, segment), n, sr, channels),
               device, sr)
    sf.write(path, x.T.astype(np.float32), sr, subtype=subtype, format="WAV")


def generate(
    out_dir: str | Path,
    clips_per_class: int = 40,
    duration: float = 10.0,
    sample_rate: int = 48000,
    seed: int = 0,
    channels: int = 2,
    subtype: str = "PCM_24",
    segments_per_location: int = 4,
    test_fraction: float = 0.3,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    bank: int | None = None,
    devices: Sequence[str] = (),
    unseen_devices: Sequence[str] = (),
) -> Path:
    """Write a synthetic TUT-2018-layout dataset to ``out_dir`` and return its path; with
    ``devices``, recorded by those simulated devices in the TAU 2022 layout (module doc).

    The dataset is built in a temp dir beside ``out_dir`` and renamed into place when complete,
    so ``out_dir`` never holds a half-written dataset. An existing non-empty ``out_dir`` is an
    error unless ``overwrite`` (then it is replaced). ``bank``: render only that many clips per
    class and make the others hard links to them (the same split and names, seconds instead of
    minutes for thousands of clips: for throughput checks, not for learning).
    """
    if clips_per_class < 2:
        raise UserError(f"clips_per_class={clips_per_class}: need >= 2 (one train and one test location)")
    if duration <= 0 or sample_rate <= 0 or channels <= 0 or segments_per_location <= 0:
        raise UserError("duration, sample_rate, channels and segments_per_location must be > 0")
    if sample_rate < 16000:
        raise UserError(f"sample_rate={sample_rate}: the scene signatures need >= 16000 Hz")
    if not 0 < test_fraction < 1:
        raise UserError(f"test_fraction={test_fraction}: must be in (0, 1)")
    devices, unseen_devices = list(devices), list(unseen_devices)
    if unseen_devices and not devices:
        raise UserError("unseen devices need --devices (the devices of the training clips)")
    for d in devices + unseen_devices:
        if not DEVICE_NAME.fullmatch(d):
            raise UserError(f"device {d!r}: a TAU device id is lower-case letters and digits, not "
                            f"only digits (a, b, s1, ...)")
    if len(set(devices + unseen_devices)) != len(devices + unseen_devices):
        raise UserError(f"devices {devices} and unseen devices {unseen_devices} must be distinct")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
    with atomic.staged_dir(out, overwrite=True) as tmp:
        _write_dataset(tmp, clips_per_class, duration, sample_rate, seed, channels, subtype,
                       segments_per_location, test_fraction, workers, progress, bank,
                       devices, unseen_devices)
    return out


def _write_dataset(tmp: Path, clips_per_class: int, duration: float, sample_rate: int, seed: int,
                   channels: int, subtype: str, segments_per_location: int, test_fraction: float,
                   workers: int, progress: bool, bank: int | None = None,
                   devices: list[str] | None = None, unseen: list[str] | None = None) -> None:
    (tmp / "audio").mkdir(parents=True)
    (tmp / "evaluation_setup").mkdir()
    n = round(duration * sample_rate)
    clips = _plan(clips_per_class, seed, segments_per_location, test_fraction)
    loc_params: dict[tuple[int, int], dict] = {}
    tasks, rows, copies = [], [], []
    rendered: dict[int, list[str]] = {}  # class -> its rendered files, for the bank's copies
    for clip in clips:
        lk = (clip["class_idx"], clip["loc_index"])
        if lk not in loc_params:
            loc_params[lk] = jitter_location(SPECS[clip["scene"]], seeded(seed, 2, *lk))
        stem = f"{clip['scene']}-{clip['city']}-{clip['loc_id']}-{clip['segment']}"
        if devices:  # TAU 2022: <segment>-<index>-<device>, the devices in turn
            choice = devices + (unseen or []) if clip["test"] else devices
            device = choice[clip["segment"] % len(choice)]
            name = f"audio/{stem}-0-{device}.wav"
        else:
            device, name = DEVICE, f"audio/{stem}-{DEVICE}.wav"
        done = rendered.setdefault(clip["class_idx"], [])
        if bank and len(done) >= bank:  # the same bytes under another name: a hard link
            copies.append((done[len(copies) % len(done)], str(tmp / name)))
        else:
            done.append(str(tmp / name))
            tasks.append((str(tmp / name), loc_params[lk], clip["city"], clip["segment"], seed, n,
                          sample_rate, channels, subtype, device))
        rows.append((name, clip["scene"], f"{clip['city']}-{clip['loc_id']}", clip["test"], device))
    pool = mp.get_context("spawn").Pool(workers, initializer=tune_malloc) if workers > 1 else None
    try:
        done = pool.imap_unordered(_make_clip, tasks, chunksize=4) if pool else map(_make_clip, tasks)
        for _ in tqdm(done, total=len(tasks), desc="synth", unit="clip", disable=not progress,
                      file=sys.stderr):
            pass
        for src, dst in copies:
            os.link(src, dst)
        rows.sort()
        _write_text(tmp / "meta.csv", [META_HEADER] + [f"{f}\t{s}\t{i}\t{d}" for f, s, i, _, d in rows])
        es = tmp / "evaluation_setup"
        # TAU 2019 and later: .csv fold files with a header row; TUT 2018: .txt without one
        ext, head = (".csv", [["filename\tscene_label"], ["filename"]]) if devices else (".txt", [[], []])
        _write_text(es / f"fold1_train{ext}", head[0] + [f"{f}\t{s}" for f, s, _, t, _ in rows if not t])
        _write_text(es / f"fold1_test{ext}", head[1] + [f for f, _, _, t, _ in rows if t])
        _write_text(es / f"fold1_evaluate{ext}", head[0] + [f"{f}\t{s}" for f, s, _, t, _ in rows if t])
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _write_text(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


@command("asc_dist.synth")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m asc_dist.synth",
        description="Write synthetic acoustic scenes in the TUT Urban Acoustic Scenes 2018 "
        "development layout (audio/, meta.csv, evaluation_setup/fold1_*.txt).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("out_dir", help="output dataset folder (created)")
    ap.add_argument("--clips-per-class", type=int, default=40)
    ap.add_argument("--duration", type=float, default=None,
                    help="clip length in seconds (default 10; 1 with --devices, as TAU 2022)")
    ap.add_argument("--sample-rate", type=int, default=48000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--subtype", default="PCM_24", help="soundfile WAV subtype")
    ap.add_argument("--segments-per-location", type=int, default=4,
                    help="clips recorded at one location (locations are split ~70/30 train/test)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing OUT_DIR (the new dataset is renamed into place when complete)")
    ap.add_argument("--devices", default="",
                    help="comma list of simulated recording devices (e.g. a,b,c,s1,s2,s3): the TAU "
                         "2022 Mobile layout, each clip filtered by its device's response")
    ap.add_argument("--unseen-devices", default="",
                    help="devices that record test clips only (e.g. s4,s5,s6); needs --devices")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    devices = [d.strip() for d in a.devices.split(",") if d.strip()]
    unseen = [d.strip() for d in a.unseen_devices.split(",") if d.strip()]
    duration = a.duration if a.duration is not None else (1.0 if devices else 10.0)
    tune_malloc()
    out = generate(
        a.out_dir, clips_per_class=a.clips_per_class, duration=duration,
        sample_rate=a.sample_rate, seed=a.seed, channels=a.channels, subtype=a.subtype,
        segments_per_location=a.segments_per_location, workers=a.workers,
        overwrite=a.overwrite, progress=not a.no_progress, devices=devices, unseen_devices=unseen,
    )
    recorded = f" recorded by devices {', '.join(devices + unseen)}" if devices else ""
    log.info(f"wrote {a.clips_per_class * len(SCENES)} clips{recorded} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
