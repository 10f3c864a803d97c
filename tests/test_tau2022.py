"""TAU Urban Acoustic Scenes 2022 Mobile in the packer: six-part names, the tau2022 layout, and a
DCASE 2024 split list (--train-list / --test-list) choosing the train subset at pack time.

One tiny synthetic TAU 2022 tree (1-s 44.1 kHz clips, two cities, four devices, meta.csv,
evaluation_setup/fold1_*.csv, a split file), built and packed once per module.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from asc_dist import pack as P
from asc_dist.data.manifest import pack_command
from asc_dist.pack.cli import main as pack_main
from asc_dist.pack.layouts import TUT_NAME, detect_layout, parse_name, sample_key

KW = {"sample_rate": 32000, "workers": 1, "progress": False, "verbose": False}
ARGS = ["--sample-rate", "32000", "--workers", "1", "--no-progress"]

# <scene>-<city>-<location>-<segment>-<index>-<device>
TRAIN = ["airport-lisbon-1000-40000-0-a", "airport-lisbon-1000-40000-1-a",
         "airport-vienna-1001-40100-0-b", "bus-lisbon-1002-40200-0-a",
         "bus-vienna-1003-40300-0-s1", "bus-vienna-1003-40300-1-s1",
         "park-lisbon-1004-40400-0-b", "park-vienna-1005-40500-0-s2"]
TEST = ["airport-vienna-1006-40600-0-s1", "bus-lisbon-1007-40700-0-b",
        "park-lisbon-1008-40800-0-a", "park-vienna-1009-40900-0-s2"]
# The subset: no 'park' clip, so the classes must come from the whole dataset, not the subset.
SUBSET = ["airport-lisbon-1000-40000-0-a", "bus-lisbon-1002-40200-0-a", "bus-vienna-1003-40300-0-s1"]
# meta.csv is the authority on the device. The real data agrees with its names; this clip
# disagrees on purpose, so that where the device was read from shows.
RELABELLED = ("bus-vienna-1003-40300-0-s1", "s3")
HEADER = "filename\tscene_label\tidentifier\tsource_label\n"


def _fn(stem: str) -> str:
    return f"audio/{stem}.wav"


def _meta_row(stem: str) -> str:
    scene, city, loc, _seg, _idx, dev = stem.split("-")
    dev = RELABELLED[1] if stem == RELABELLED[0] else dev
    return f"{_fn(stem)}\t{scene}\t{city}-{loc}\t{dev}\n"


def _split_file(path: Path, stems: list[str], rows: list[str] | None = None) -> Path:
    """A DCASE 2024 split file: meta.csv's columns, the listed clips only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "".join(rows if rows is not None else map(_meta_row, stems)))
    return path


def _tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for stem in TRAIN + TEST:
        (root / "audio").mkdir(parents=True, exist_ok=True)
        sf.write(root / _fn(stem), 0.3 * rng.uniform(-1, 1, 44100), 44100, subtype="PCM_24")
    (root / "meta.csv").write_text(HEADER + "".join(map(_meta_row, sorted(TRAIN + TEST))))
    es = root / "evaluation_setup"
    es.mkdir()
    for name, stems in (("fold1_train.csv", TRAIN), ("fold1_evaluate.csv", TEST)):
        (es / name).write_text("filename\tscene_label\n"
                               + "".join(f"{_fn(s)}\t{s.split('-')[0]}\n" for s in stems))
    (es / "fold1_test.csv").write_text("filename\n" + "".join(f"{_fn(s)}\n" for s in TEST))
    return root


@pytest.fixture(scope="module")
def tau(tmp_path_factory) -> SimpleNamespace:
    """The tree, a split file beside it (on disk, as the baseline downloads them), and the tree
    packed with that file as --train-list."""
    base = tmp_path_factory.mktemp("tau2022")
    root = _tree(base / "TAU-urban-acoustic-scenes-2022-mobile-development")
    split = _split_file(base / "split_setup" / "split25.csv", SUBSET)
    out = base / "shards"
    ms = P.pack(root, out, train_list=str(split), **KW)
    return SimpleNamespace(base=base, root=root, split=split, out=out, ms=ms)


def _samples(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / split / "samples.jsonl").read_text().splitlines()]


def _shas(out: Path, split: str) -> list[str]:
    return [s["sha256"] for s in json.loads((out / split / "manifest.json").read_text())["shards"]]


# --------------------------------------------------------------------------- names


def test_six_part_names_parse_and_five_part_names_are_unchanged():
    m = TUT_NAME.match("street_pedestrian-lisbon-1000-40000-7-s6")
    assert m and (m["scene"], m["city"], m["loc"], m["seg"], m["index"], m["device"]) == (
        "street_pedestrian", "lisbon", "1000", "40000", "7", "s6")
    assert parse_name("audio/airport-lisbon-1000-40000-0-a.wav") == {
        "city": "lisbon", "location": "lisbon-1000", "device": "a"}
    assert sample_key("audio/airport-lisbon-1000-40000-0-a.wav") == "airport-lisbon-1000-40000-0-a"
    # TUT 2018's five parts: no index, and the device is not taken for one
    m = TUT_NAME.match("tram-vienna-3-17-s2")
    assert m and m["index"] is None and (m["seg"], m["device"]) == ("17", "s2")
    assert parse_name("audio/airport-barcelona-0-0-a.wav") == {
        "city": "barcelona", "location": "barcelona-0", "device": "a"}
    assert parse_name("x/some-other-name.wav") == {"city": None, "location": None, "device": None}


# --------------------------------------------------------------------------- pack with a list


def test_layout_is_detected_as_tau2022(tau):
    assert detect_layout(tau.root) == "tau2022"
    assert {m["settings"]["layout"] for m in tau.ms.values()} == {"tau2022"}


def test_train_split_is_the_listed_subset_and_test_the_whole_evaluate_list(tau):
    train, test = tau.ms["train"], tau.ms["test"]
    assert sorted(r["key"] for r in _samples(tau.out, "train")) == sorted(SUBSET)
    assert train["num_samples"] == len(SUBSET)
    # the dataset's classes, though the subset has no 'park'
    assert train["classes"] == test["classes"] == ["airport", "bus", "park"]
    assert train["class_counts"] == {"airport": 1, "bus": 2, "park": 0}
    assert sorted(r["key"] for r in _samples(tau.out, "test")) == sorted(TEST)
    assert train["settings"]["split_list"] == {
        "option": "--train-list", "path": str(tau.split.resolve()), "name": "split25.csv",
        "sha256": hashlib.sha256(tau.split.read_bytes()).hexdigest(), "files": len(SUBSET)}
    assert test["settings"]["split_list"] is None
    assert train["audio"]["sample_rate"] == 32000


def test_city_from_identifier_and_device_from_source_label(tau):
    recs = {r["key"]: r for r in _samples(tau.out, "train") + _samples(tau.out, "test")}
    for key, r in recs.items():
        scene, city, loc, _seg, _idx, dev = key.split("-")
        want = RELABELLED[1] if key == RELABELLED[0] else dev
        assert (r["scene"], r["city"], r["location"], r["device"]) == (
            scene, city, f"{city}-{loc}", want), key
    assert {r["device"] for r in recs.values()} >= {"a", "b", "s1", "s2", "s3"}


def test_city_and_device_from_six_part_names_without_meta_csv(tau, tmp_path):
    root = tmp_path / "no_meta"
    shutil.copytree(tau.root, root)
    (root / "meta.csv").unlink()
    out = tmp_path / "out"
    P.pack(root, out, train_list=str(tau.split), only=("train",), **KW)
    recs = {r["key"]: r for r in _samples(out, "train")}
    assert sorted(recs) == sorted(SUBSET)
    assert recs[RELABELLED[0]]["device"] == "s1"  # the name's, with no meta.csv to say otherwise
    assert {(r["city"], r["location"]) for r in recs.values()} == {
        ("lisbon", "lisbon-1000"), ("lisbon", "lisbon-1002"), ("vienna", "vienna-1003")}


def test_report_breakdowns_read_city_and_device(tau):
    from omegaconf import OmegaConf

    from asc_dist.validate import sample_groups

    by_key, vocab = sample_groups(OmegaConf.create({"data": {"shards": str(tau.out)}}), "test")
    assert vocab == {"city": ["lisbon", "vienna"], "device": ["a", "b", "s1", "s2"]}
    assert by_key["park-vienna-1009-40900-0-s2"] == {"city": "vienna", "device": "s2"}


def test_list_inside_the_dataset_via_the_cli_and_from_zips(tau, tmp_path, cli):
    """A list given by its path inside the dataset (folder or zips), and --test-list: the same
    shards as the list on disk."""
    root = tmp_path / "ds"
    shutil.copytree(tau.root, root)
    (root / "split_setup").mkdir()
    shutil.copy(tau.split, root / "split_setup" / "split25.csv")
    test_list = _split_file(tmp_path / "test.csv", TEST)
    out = tmp_path / "out"
    r = cli(pack_main, [root, out, "--train-list", "split_setup/split25.csv",
                        "--test-list", test_list, *ARGS])
    assert r.returncode == 0, r
    assert "selected by split25.csv" in r.stderr
    m = json.loads((out / "train" / "manifest.json").read_text())
    assert m["settings"]["split_list"]["path"] == "split_setup/split25.csv"
    assert _shas(out, "train") == _shas(tau.out, "train")
    mt = json.loads((out / "test" / "manifest.json").read_text())
    assert mt["settings"]["split_list"]["option"] == "--test-list"
    assert _shas(out, "test") == _shas(tau.out, "test")  # test.csv names the whole evaluate list

    z = tmp_path / "TAU-urban-acoustic-scenes-2022-mobile-development.meta.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            zf.write(f, f"{tau.root.name}/{f.relative_to(root).as_posix()}")
    P.pack([z], tmp_path / "zout", train_list="split_setup/split25.csv", only=("train",), **KW)
    assert _shas(tmp_path / "zout", "train") == _shas(tau.out, "train")


def test_repack_command_carries_the_list_and_a_forgotten_list_is_warned(tau, tmp_path, cli):
    out = tmp_path / "shards"
    shutil.copytree(tau.out, out)
    cmd = pack_command([out / "train"])
    assert f"--splits train --train-list {tau.split.resolve()} --overwrite" in cmd
    assert "--train-list" not in pack_command([out / "test"])
    # The hint, run as printed (plus the options it was packed with), rebuilds the same subset.
    argv = shlex.split(cmd)[3:]
    r = cli(pack_main, [*argv, *ARGS])
    assert r.returncode == 0, r
    assert "was packed from" not in r.stderr
    assert _shas(out, "train") == _shas(tau.out, "train")
    # Without the list the split becomes the whole fold: allowed, but said.
    r = cli(pack_main, [tau.root, out, "--splits", "train", "--overwrite", *ARGS])
    assert r.returncode == 0, r
    assert (f"was packed from --train-list {tau.split.resolve()} (sha256 "
            f"{hashlib.sha256(tau.split.read_bytes()).hexdigest()[:12]}); it is now packed from "
            "no split list") in r.stderr
    assert len(_samples(out, "train")) == len(TRAIN)


# --------------------------------------------------------------------------- bad lists


BAD_LISTS = {
    # name: (rows of the list, what the error says after "<list>:<line>: ")
    "missing file": ([_meta_row(SUBSET[0]), _meta_row("airport-lisbon-1000-40000-9-a")],
                     "3: audio/airport-lisbon-1000-40000-9-a.wav is not in the dataset (not in meta.csv)"),
    "test file": ([_meta_row(TEST[0])],
                  f"2: {_fn(TEST[0])} is in the 'test' split, not in 'train'"),
    "label": ([_meta_row(SUBSET[0]), _meta_row(SUBSET[1]).replace("\tbus\t", "\tpark\t")],
              f"3: label 'park' of {_fn(SUBSET[1])} disagrees with meta.csv ('bus')"),
    "duplicate": ([_meta_row(SUBSET[0]), _meta_row(SUBSET[1]), _meta_row(SUBSET[0])],
                  f"4: duplicate filename {_fn(SUBSET[0])} (first listed at "),
    "empty": ([], "1: names no files: the 'train' split would be empty"),
}


@pytest.mark.parametrize("case", BAD_LISTS)
def test_bad_list_names_the_list_and_line_before_anything_is_written(tau, tmp_path, case):
    rows, says = BAD_LISTS[case]
    bad = _split_file(tmp_path / "bad.csv", [], rows)
    out = tmp_path / "out"
    with pytest.raises(P.PackError) as e:
        P.pack(tau.root, out, train_list=str(bad), **KW)
    assert f"{bad}:{says}" in str(e.value)
    assert not out.exists()


def test_list_not_found_or_split_missing(tau, tmp_path):
    with pytest.raises(P.PackError, match="--train-list nope/split5.csv: list not found, neither "
                       "on disk nor in the dataset"):
        P.pack(tau.root, tmp_path / "o", train_list="nope/split5.csv", **KW)
    audio_only = tmp_path / "eval_set"
    shutil.copytree(tau.root / "audio", audio_only / "audio")
    with pytest.raises(P.PackError, match="--train-list .*: this dataset has no 'train' split "
                       r"\(it has eval\)"):
        P.pack(audio_only, tmp_path / "o", train_list=str(tau.split), classes="airport,bus,park",
               **KW)


# --------------------------------------------------------------------------- evaluation sets

# DCASE 2025's evaluation set: anonymised names, each clip's device only in fold1_test.csv's
# device_id column (ids seen in training and others); audio/9.wav lies there but is not listed.
EVAL_2025 = {"audio/0.wav": "a", "audio/1.wav": "s4", "audio/2.wav": "s1", "audio/3.wav": "xyz"}


def _eval_tree(root: Path, listed: dict[str, str | None], unlisted: str = "audio/9.wav") -> Path:
    """An evaluation set as DCASE ships one: audio/ and evaluation_setup/fold1_test.csv only."""
    rng = np.random.default_rng(1)
    (root / "audio").mkdir(parents=True)
    for f in [*listed, unlisted]:
        sf.write(root / f, 0.3 * rng.uniform(-1, 1, 44100), 44100, subtype="PCM_24")
    (root / "evaluation_setup").mkdir()
    with_ids = any(listed.values())
    (root / "evaluation_setup" / "fold1_test.csv").write_text(
        ("filename\tdevice_id\n" if with_ids else "filename\n")
        + "".join(f"{f}\t{d}\n" if with_ids else f"{f}\n" for f, d in listed.items()))
    return root


def test_evaluation_set_from_its_zips_is_its_test_list_with_device_ids(tmp_path, cli):
    """fetch -> pack on the DCASE 2025 evaluation set: an unlabelled 'eval' split of exactly the
    clips fold1_test.csv lists, each sample recording the device_id it is listed with."""
    name = "TAU-urban-acoustic-scenes-2025-mobile-evaluation"
    root = _eval_tree(tmp_path / name, EVAL_2025)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for part, folder in (("audio.1", "audio"), ("meta", "evaluation_setup")):
        with zipfile.ZipFile(downloads / f"{name}.{part}.zip", "w") as zf:
            for f in sorted((root / folder).iterdir()):
                zf.write(f, f"{name}/{folder}/{f.name}")
    out = tmp_path / "shards"
    r = cli(pack_main, [downloads, out, "--classes", "airport,bus,park", *ARGS])
    assert r.returncode == 0, r
    assert [p.name for p in out.iterdir()] == ["eval"]
    m = json.loads((out / "eval" / "manifest.json").read_text())
    assert not m["labelled"] and m["num_samples"] == len(EVAL_2025) and m["class_counts"] == {}
    assert m["classes"] == ["airport", "bus", "park"]
    samples = _samples(out, "eval")
    assert {s["filename"]: s["device"] for s in samples} == EVAL_2025  # audio/9.wav left out
    assert all(s["label"] == -1 and s["scene"] is None for s in samples)


def test_evaluation_set_without_device_ids_takes_them_from_the_names(tmp_path):
    """TAU 2022's evaluation set lists file names only: the device comes from a six-part name."""
    listed = {_fn(s): None for s in TEST}
    root = _eval_tree(tmp_path / "TAU-urban-acoustic-scenes-2022-mobile-evaluation", listed,
                      unlisted=_fn(TRAIN[0]))
    ms = P.pack(root, tmp_path / "out", **KW)
    assert list(ms) == ["eval"] and not ms["eval"]["labelled"]
    assert ms["eval"]["settings"]["layout"] == "tau2022"  # detected from the test list's names
    samples = _samples(tmp_path / "out", "eval")
    assert {s["filename"]: s["device"] for s in samples} == {_fn(s): s.split("-")[-1] for s in TEST}
    # a listed clip without its device_id is named with the list and line
    bad = root / "evaluation_setup" / "fold1_test.csv"
    bad.write_text("filename\tdevice_id\naudio/x.wav\ta\naudio/y.wav\t\n")
    with pytest.raises(P.PackError, match=rf"{bad}:3: missing device_id for audio/y.wav"):
        P.pack(root, tmp_path / "out2", **KW)
