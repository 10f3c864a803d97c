"""``python -m asc_dist.pack DATASET [DATASET ...] OUT_DIR [options]``: the packer's command line.

DATASET is the dataset folder, a folder holding one dataset's zip parts, or the zip files
themselves (asc_dist.pack.zips reads them in place).
"""

from __future__ import annotations

import argparse
import os

from asc_dist import audio
from asc_dist.cli import command
from asc_dist.pack import PackOptions, pack
from asc_dist.pack.layouts import ALL_FOLDS, LAYOUTS


def _fold(value: str) -> int | str:
    if value == ALL_FOLDS:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fold number or '{ALL_FOLDS}', got "
                                         f"{value!r}") from None


@command("asc_dist.pack")
def main(argv: list[str] | None = None) -> int:
    d = PackOptions()
    ap = argparse.ArgumentParser(
        prog="python -m asc_dist.pack",
        description=(
            "Pack an audio dataset (TUT 2018 / TAU 2019-2020 / TAU 2022 layout, or a CSV list) into "
            "WebDataset tar shards with DALI index files and a manifest per split. Zip parts (as "
            "DCASE ships them) are read in place, with nothing extracted, and give the same "
            "shards as their unpacked folder. Existing "
            "output splits are refused unless --overwrite is given; with --overwrite each split is "
            "replaced atomically only after all splits were written (a failed run changes nothing)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("dataset", nargs="+", metavar="DATASET",
                    help="the dataset folder (e.g. TUT-urban-acoustic-scenes-2018-development), a "
                    "folder holding one dataset's zip parts, or the zip files themselves (e.g. "
                    "TUT-urban-acoustic-scenes-2018-development.*.zip)")
    ap.add_argument("out_dir", metavar="OUT_DIR", help="output root; splits go to OUT_DIR/<split>/")
    ap.add_argument("--layout", choices=LAYOUTS, default=d.layout,
                    help="tut2018: fold<k>_train/evaluate.txt; tau2019: fold<k>_*.csv with header; "
                    "tau2022: the same, 1-s clips with six-part names (TAU 2022 Mobile); without "
                    "train/evaluate lists (an evaluation set): one unlabelled 'eval' split of the "
                    "files fold<k>_test lists (its device_id column kept), else of all audio; "
                    "csv: filename,label list")
    ap.add_argument("--fold", type=_fold, default=d.fold,
                    help="the fold whose train/evaluate lists make the train/test splits, or "
                    "'all': every clip meta.csv labels as the train split, fold files ignored "
                    "(the paper's protocol: train on the whole development set)")
    ap.add_argument("--csv", dest="csv_path", help="CSV list for --layout csv (default: the one *.csv in DATASET; with zips also a "
                    "path inside them)")
    ap.add_argument("--train-list", metavar="LIST",
                    help="keep only the train files LIST names (a file on disk, else a path inside "
                    "the dataset; header row naming 'filename', optionally 'scene_label'), e.g. "
                    "DCASE 2024 task 1's split25.csv; every file it names must be in the train split "
                    "(the fold's train list); recorded (path, sha256) in train/manifest.json")
    ap.add_argument("--test-list", metavar="LIST",
                    help="the same for the test split (e.g. DCASE 2024's test.csv; default: the "
                    "fold's whole evaluate list)")
    ap.add_argument("--split", help="split name for csv / unlabelled folders (default train / eval)")
    ap.add_argument("--splits", help="comma list: pack only these splits (e.g. one per array task); "
                    "default all")
    ap.add_argument("--classes", help="class list: comma-separated, a text file, or a manifest.json "
                    "(default: the labels found in meta.csv and the lists)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="decode/convert processes")
    ap.add_argument("--on-error", choices=("fail", "skip"), default=d.on_error,
                    help="fail: stop at the first bad clip; skip: leave it out and list it in the manifest")
    ap.add_argument("--sample-rate", type=int, default=d.sample_rate, help="stored sample rate")
    ap.add_argument("--resampler", choices=audio.RESAMPLERS, default=d.resampler,
                    help="for sources at another rate: soxr-vhq (soxr's very high quality, float64) "
                    "or torchaudio (torchaudio.functional.resample's defaults, float32: the DCASE "
                    "2024/2025 baselines'); recorded in the manifest and carried into checkpoints, "
                    "so predict and export resample raw files alike")
    ap.add_argument("--keep-channels", action="store_true", help="keep the source channels (default: mono mean)")
    ap.add_argument("--subtype", default=d.subtype, help="stored WAV subtype")
    ap.add_argument("--shard-size-mb", type=float, default=d.shard_size_mb, help="max shard size (MiB)")
    ap.add_argument("--shard-max-samples", type=int, default=d.shard_max_samples, help="max samples per shard")
    ap.add_argument("--seed", type=int, default=d.seed, help="pack-time shuffle seed")
    ap.add_argument("--expect-sample-rate", type=int, default=d.expect_sample_rate, help="reject clips at another rate")
    ap.add_argument("--expect-duration", type=float, default=d.expect_duration, help="reject clips of another length (s)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output splits (atomically)")
    ap.add_argument("--no-progress", action="store_true")
    a = vars(ap.parse_args(argv))
    dataset, out = a.pop("dataset"), a.pop("out_dir")
    splits, no_progress = a.pop("splits"), a.pop("no_progress")
    audio.tune_malloc()
    pack(dataset, out, PackOptions(**a, only=tuple(splits.split(",")) if splits else None,
                                   progress=not no_progress))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
