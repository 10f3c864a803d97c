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

Deterministic: the same arguments give byte-identical files.
"""


from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import sys
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
    render_clip,
    seeded,
)

log = logging.getLogger(__name__)

DEVICE = "a"
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
    path, params, city, segment, seed, n, sr, channels, subtype = task
    freqs, eqs = city_eqs(seed, n, sr)
    shape = location_shape_db(params, eqs[city], freqs)
    x = render_clip(params, shape, eqs[city], seeded(seed, 3, segment), n, sr, channels)
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
) -> Path:
    """Write a synthetic TUT-2018-layout dataset to ``out_dir`` and return its path.

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
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
    with atomic.staged_dir(out, overwrite=True) as tmp:
        _write_dataset(tmp, clips_per_class, duration, sample_rate, seed, channels, subtype,
                       segments_per_location, test_fraction, workers, progress, bank)
    return out


def _write_dataset(tmp: Path, clips_per_class: int, duration: float, sample_rate: int, seed: int,
                   channels: int, subtype: str, segments_per_location: int, test_fraction: float,
                   workers: int, progress: bool, bank: int | None = None) -> None:
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
        name = f"audio/{clip['scene']}-{clip['city']}-{clip['loc_id']}-{clip['segment']}-{DEVICE}.wav"
        done = rendered.setdefault(clip["class_idx"], [])
        if bank and len(done) >= bank:  # the same bytes under another name: a hard link
            copies.append((done[len(copies) % len(done)], str(tmp / name)))
        else:
            done.append(str(tmp / name))
            tasks.append((str(tmp / name), loc_params[lk], clip["city"], clip["segment"], seed, n,
                          sample_rate, channels, subtype))
        rows.append((name, clip["scene"], f"{clip['city']}-{clip['loc_id']}", clip["test"]))
    pool = mp.get_context("spawn").Pool(workers, initializer=tune_malloc) if workers > 1 else None
    try:
        done = pool.imap_unordered(_make_clip, tasks, chunksize=4) if pool else map(_make_clip, tasks)
        for _ in tqdm(done, total=len(tasks), desc="synth", unit="clip", disable=not progress,
                      file=sys.stderr):
            pass
        for src, dst in copies:
            os.link(src, dst)
        rows.sort()
        _write_text(tmp / "meta.csv", [META_HEADER] + [f"{f}\t{s}\t{i}\t{DEVICE}" for f, s, i, _ in rows])
        es = tmp / "evaluation_setup"
        _write_text(es / "fold1_train.txt", [f"{f}\t{s}" for f, s, _, test in rows if not test])
        _write_text(es / "fold1_test.txt", [f for f, _, _, test in rows if test])
        _write_text(es / "fold1_evaluate.txt", [f"{f}\t{s}" for f, s, _, test in rows if test])
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
    ap.add_argument("--duration", type=float, default=10.0, help="clip length in seconds")
    ap.add_argument("--sample-rate", type=int, default=48000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--subtype", default="PCM_24", help="soundfile WAV subtype")
    ap.add_argument("--segments-per-location", type=int, default=4,
                    help="clips recorded at one location (locations are split ~70/30 train/test)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing OUT_DIR (the new dataset is renamed into place when complete)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    tune_malloc()
    out = generate(
        a.out_dir, clips_per_class=a.clips_per_class, duration=a.duration,
        sample_rate=a.sample_rate, seed=a.seed, channels=a.channels, subtype=a.subtype,
        segments_per_location=a.segments_per_location, workers=a.workers,
        overwrite=a.overwrite, progress=not a.no_progress,
    )
    log.info(f"wrote {a.clips_per_class * len(SCENES)} clips to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
