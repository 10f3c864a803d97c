"""asc_dist.pack from a dataset's zip parts (asc_dist.pack.zips): the same shards as packing the
unpacked folder, nothing extracted, damaged zips and members named, mixed datasets refused."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_dataset

from asc_dist import pack as P
from asc_dist.pack import zips as Z
from asc_dist.pack.cli import main as pack_main
from asc_dist.pack.layouts import FolderSource

NAME = "TUT-urban-acoustic-scenes-2018-development"
KW = {"sample_rate": 16000, "shard_max_samples": 4, "progress": False, "verbose": False}
ARGS = ["--sample-rate", "16000", "--shard-max-samples", "4", "--no-progress"]


def _zip_parts(dataset: Path, out: Path, name: str, parts: int = 3) -> list[Path]:
    """Zip ``dataset`` the way DCASE ships it: every member under ``name/``, the audio spread over
    ``parts`` zips, meta.csv and evaluation_setup/ in ``.meta.zip``, a README in ``.doc.zip``."""
    out.mkdir(parents=True, exist_ok=True)
    audio = sorted((dataset / "audio").iterdir())
    groups = {f"audio.{k + 1}": audio[k::parts] for k in range(parts)}
    groups["meta"] = [dataset / "meta.csv", *sorted((dataset / "evaluation_setup").iterdir())]
    made = []
    for part, files in [*groups.items(), ("doc", [])]:
        z = out / f"{name}.{part}.zip"
        with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.mkdir(name)  # zip -r writes the folders as entries too
            for f in files:
                zf.write(f, f"{name}/{f.relative_to(dataset).as_posix()}")
            if part == "doc":
                zf.writestr(f"{name}/README.md", "documentation\n")
        made.append(z)
    return made


@pytest.fixture(scope="session")
def dcase(tmp_path_factory) -> SimpleNamespace:
    """A synthetic TUT 2018 dataset, its DCASE-style zip parts, and its folder packed."""
    root = tmp_path_factory.mktemp("dcase")
    dataset = make_dataset(root / NAME)
    zips = _zip_parts(dataset, root / "downloads", NAME)
    ref = root / "ref"
    P.pack(dataset, ref, workers=1, **KW)
    return SimpleNamespace(dataset=dataset, downloads=root / "downloads", zips=zips, ref=ref)


def _manifest(out: Path, split: str) -> dict:
    return json.loads((out / split / "manifest.json").read_text())


def _assert_same_shards(out: Path, ref: Path, source: str) -> None:
    """Byte-identical split folders; the manifests differ in the recorded source (and time) only."""
    for split in ("train", "test"):
        m, r = _manifest(out, split), _manifest(ref, split)
        assert m["shards"] == r["shards"]  # names, sample counts, sizes, sha256s
        files = sorted(p.name for p in (ref / split).iterdir())
        assert sorted(p.name for p in (out / split).iterdir()) == files
        for name in files:
            if name != "manifest.json":
                assert (out / split / name).read_bytes() == (ref / split / name).read_bytes(), name
        assert {k for k in m if m[k] != r[k]} <= {"settings", "created"}
        assert {k for k in m["settings"] if m["settings"][k] != r["settings"][k]} == {"source"}
        assert m["settings"]["source"] == source


def _wavs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.wav"))


def test_folder_of_zips_gives_the_same_shards(dcase, tmp_path):
    before = sorted(dcase.downloads.iterdir())
    out = tmp_path / "out"
    P.pack(dcase.downloads, out, workers=2, **KW)  # spawned workers open the zips themselves
    _assert_same_shards(out, dcase.ref, str(dcase.downloads))
    assert _wavs(tmp_path) == [] and sorted(dcase.downloads.iterdir()) == before


def test_cli_with_the_zip_paths_extracts_nothing(dcase, tmp_path, cli, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("extracted a zip to disk")

    monkeypatch.setattr(zipfile.ZipFile, "extract", refuse)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", refuse)
    monkeypatch.setattr(shutil, "unpack_archive", refuse)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "out"
    # In any order, as a shell glob or a hand-typed list gives them.
    r = cli(pack_main, [*reversed(dcase.zips), out, "--workers", "1", *ARGS])
    assert r.returncode == 0, r
    _assert_same_shards(out, dcase.ref, " ".join(str(z) for z in sorted(dcase.zips)))
    assert _wavs(tmp_path) == [] and list(scratch.iterdir()) == []
    assert Z._open == {}  # the zips decoded from in this process are closed again


def _damage(z: Path, member: str) -> None:
    """Flip bytes in the middle of ``member``'s compressed data: inflating or its CRC fails."""
    with zipfile.ZipFile(z) as zf:
        info = zf.getinfo(member)
    raw = bytearray(z.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    mid = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    raw[mid:mid + 16] = bytes(b ^ 0xFF for b in raw[mid:mid + 16])
    z.write_bytes(bytes(raw))


def _truncate_member(z: Path, member: str, keep: int) -> None:
    """Rewrite ``z`` (a valid zip again) with ``member`` cut to its first ``keep`` bytes."""
    with zipfile.ZipFile(z) as zf:
        items = [(i, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, data in items:
            zf.writestr(i, data[:keep] if i.filename == member else data)


def _audio_members(z: Path) -> list[str]:
    with zipfile.ZipFile(z) as zf:
        return [n for n in zf.namelist() if n.endswith(".wav")]


def test_damaged_members_are_named_with_their_zip(dcase, tmp_path, cli):
    downloads = tmp_path / "downloads"
    shutil.copytree(dcase.downloads, downloads)
    crc_zip, wav_zip = downloads / f"{NAME}.audio.2.zip", downloads / f"{NAME}.audio.3.zip"
    crc_member, wav_member = _audio_members(crc_zip)[1], _audio_members(wav_zip)[0]
    _damage(crc_zip, crc_member)

    r = cli(pack_main, [downloads, tmp_path / "out", "--workers", "1", *ARGS])
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r
    assert f"{crc_zip}/{crc_member}" in lines[0] and "unreadable zip member" in lines[0]
    assert not (tmp_path / "out" / "train").exists()

    # A member whose zip is fine but whose WAV is cut short: the audio check names it as well.
    _truncate_member(wav_zip, wav_member, 44 + 3000)
    ms = P.pack(downloads, tmp_path / "out", workers=1, on_error="skip", **KW)
    skipped = {s["file"]: s["reason"] for m in ms.values() for s in m["skipped"]}
    crc_file, wav_file = (m.split("/", 1)[1] for m in (crc_member, wav_member))  # as listed
    assert set(skipped) == {crc_file, wav_file}
    assert "unreadable zip member" in skipped[crc_file]
    assert f"{crc_zip}/{crc_member}" in skipped[crc_file]
    assert "truncated WAV" in skipped[wav_file] and f"{wav_zip}/{wav_member}" in skipped[wav_file]
    assert sum(m["num_samples"] for m in ms.values()) == 40 - 2


def test_damaged_or_foreign_zip_is_named(dcase, tmp_path):
    downloads = tmp_path / "downloads"
    shutil.copytree(dcase.downloads, downloads)
    cut = downloads / f"{NAME}.audio.1.zip"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # an interrupted download
    with pytest.raises(P.PackError, match="not a readable zip file") as e:
        P.pack(downloads, tmp_path / "out", workers=1, **KW)
    assert str(cut) in str(e.value)
    fake = tmp_path / "notes.zip"
    fake.write_text("not a zip\n")
    with pytest.raises(P.PackError, match=f"{fake}: not a readable zip file"):
        P.pack([*dcase.zips, fake], tmp_path / "out", workers=1, **KW)


def test_zips_of_two_datasets_are_refused_naming_both(dcase, tmp_path):
    downloads = tmp_path / "downloads"
    shutil.copytree(dcase.downloads, downloads)
    other = "TAU-urban-acoustic-scenes-2019-development"
    with zipfile.ZipFile(downloads / f"{other}.meta.zip", "w") as zf:
        zf.writestr(f"{other}/meta.csv", "filename\tscene_label\n")
    with pytest.raises(P.PackError, match="more than one dataset") as e:
        P.pack(downloads, tmp_path / "out", workers=1, **KW)
    assert f"{NAME}.*.zip (5)" in str(e.value) and f"{other}.*.zip (1)" in str(e.value)
    # Passed as paths, the folders inside tell the datasets apart.
    with pytest.raises(P.PackError, match="more than one dataset") as e:
        P.pack(sorted(downloads.glob("*.zip")), tmp_path / "out", workers=1, **KW)
    assert f"{NAME}/ (in {NAME}.audio.1.zip" in str(e.value) and f"{other}/ (in {other}.meta.zip)" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_audio_only_zips_pack_as_the_unlabelled_folder(dcase, tmp_path):
    """No fold lists in the zips (a leaderboard set): every audio member, as from the folder."""
    folder = tmp_path / "leaderboard"
    shutil.copytree(dcase.dataset / "audio", folder / "audio")
    classes = ",".join(_manifest(dcase.ref, "train")["classes"])
    a = P.pack(folder, tmp_path / "a", workers=1, classes=classes, **KW)
    b = P.pack([z for z in dcase.zips if ".audio." in z.name], tmp_path / "b", workers=1,
               classes=classes, **KW)
    assert list(a) == list(b) == ["eval"] and a["eval"]["num_samples"] == 40
    assert a["eval"]["shards"] == b["eval"]["shards"]


def test_which_source(dcase, tmp_path):
    # A folder holding its dataset unpacked beside zips: the unpacked files are packed.
    both = tmp_path / "both"
    shutil.copytree(dcase.dataset, both)
    shutil.copy(dcase.zips[0], both)
    assert isinstance(Z.open_source(both), FolderSource)
    src = Z.open_source(dcase.downloads)
    assert isinstance(src, Z.ZipSource) and src.top == NAME
    assert src.is_dir("audio") and src.is_file("meta.csv") and not src.is_file("audio")
    assert src.glob("evaluation_setup", "fold1_*.txt") == [
        f"evaluation_setup/fold1_{s}.txt" for s in ("evaluate", "test", "train")]
    assert src.locate("meta.csv") == f"{dcase.downloads / (NAME + '.meta.zip')}/{NAME}/meta.csv"
    assert not src.ref("audio/nope.wav").is_file()
    with pytest.raises(P.PackError, match="a folder among several"):
        Z.open_source([dcase.zips[0], dcase.dataset])
    with pytest.raises(P.PackError, match="not a .zip file"):
        Z.open_source([dcase.zips[0], dcase.dataset / "meta.csv"])
    with pytest.raises(P.PackError, match="zip file not found"):
        Z.open_source([tmp_path / "gone.zip"])
