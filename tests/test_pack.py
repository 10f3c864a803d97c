"""asc_dist.pack: layouts, the shard contract, both readers, audio conversion, bad input,
atomic output and determinism."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asc_dist import audio, synth
from asc_dist import pack as P
from asc_dist.data.manifest import pack_command
from asc_dist.pack.cli import main as pack_main
from asc_dist.pack.layouts import detect_layout
from asc_dist.pack.writer import _tarinfo

VENV_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- helpers


def _fold(root: Path, name: str) -> list[list[str]]:
    return [line.split("\t") for line in (root / "evaluation_setup" / name).read_text().splitlines()]


def _manifest(out: Path, split: str) -> dict:
    return json.loads((out / split / "manifest.json").read_text())


def _tars(out: Path, split: str) -> list[Path]:
    return sorted((out / split).glob("*.tar"))


def _read_samples(out: Path, split: str) -> list[dict]:
    """All samples of a split in shard order via tarfile: {key: {ext: bytes}}."""
    samples = []
    for t in _tars(out, split):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = tf.extractfile(m).read()
    return samples


def _stored(sample: dict) -> tuple[np.ndarray, int]:
    x, sr = sf.read(io.BytesIO(sample["wav"]), dtype="float64", always_2d=True)
    return x, sr


def _write(path: Path, data: np.ndarray, sr: int, subtype: str = "PCM_24") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, subtype=subtype, format="WAV")
    return path


def _noise(n: int, channels: int, seed: int, amp: float = 0.3) -> np.ndarray:
    return amp * np.random.default_rng(seed).uniform(-1, 1, (n, channels))


def _csv_dataset(root: Path, files: dict[str, str | None], n_good: int = 3) -> Path:
    """A CSV-layout dataset: ``n_good`` valid 16 kHz stereo clips plus ``files`` (name -> label).

    Listed names that do not exist on disk stay missing (the caller creates the bad ones).
    """
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_good):
        _write(root / f"good{i}.wav", _noise(1600, 2, i), 16000)
        rows.append((f"good{i}.wav", "a" if i % 2 else "b"))
    rows += [(f, lab or "a") for f, lab in files.items()]
    (root / "list.csv").write_text("filename,label\n" + "".join(f"{f},{lab}\n" for f, lab in rows))
    return root


def _retar(src: Path) -> bytes:
    """The same members written by Python's tarfile (GNU format, our member settings)."""
    buf = io.BytesIO()
    with tarfile.open(src) as t, tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as o:
        for m in t.getmembers():
            data = t.extractfile(m).read()
            o.addfile(_tarinfo(m.name, len(data)), io.BytesIO(data))
    return buf.getvalue()


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


# --------------------------------------------------------------------------- synth -> shards


def test_synth_layout_packs_to_contract(synth_dataset, packed_shards):
    classes = sorted(synth.SCENES)
    for split, fold in (("train", "fold1_train.txt"), ("test", "fold1_evaluate.txt")):
        listed = _fold(synth_dataset, fold)
        m = _manifest(packed_shards, split)
        assert m["format"] == "asc-dist-shards/1" and m["split"] == split and m["labelled"]
        assert m["classes"] == classes
        assert m["num_samples"] == len(listed)
        expect_counts = {c: sum(lab == c for _, lab in listed) for c in classes}
        assert m["class_counts"] == expect_counts
        assert m["audio"] == {"format": "wav", "sample_rate": 16000, "channels": 1, "subtype": "PCM_24"}
        assert m["components"] == {"audio": "wav", "label": "cls", "label_int": "i32", "meta": "json"}
        assert m["settings"]["layout"] == "tut2018" and m["settings"]["fold"] == 1
        assert m["skipped"] == [] and m["packer"].startswith("asc_dist ")
        # Shards: names, counts, sizes and checksums as listed; >= 4 train shards for rank tests.
        assert [s["name"] for s in m["shards"]] == [t.name for t in _tars(packed_shards, split)]
        assert [s["index"] for s in m["shards"]] == list(range(len(m["shards"])))
        assert len(m["shards"]) >= 4 and all(s["samples"] <= 4 for s in m["shards"])
        assert sum(s["samples"] for s in m["shards"]) == m["num_samples"]
        for s in m["shards"]:
            data = (packed_shards / split / s["name"]).read_bytes()
            assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
            assert (packed_shards / split / s["name"]).with_suffix(".idx").is_file()

        samples = _read_samples(packed_shards, split)
        jsonl = [json.loads(line) for line in (packed_shards / split / "samples.jsonl").read_text().splitlines()]
        assert [r["key"] for r in jsonl] == [s["__key__"] for s in samples]
        assert sorted(r["key"] for r in jsonl) == sorted(Path(f).stem for f, _ in listed)
        shard_of = [s["name"] for s in m["shards"] for _ in range(s["samples"])]
        assert [r["shard"] for r in jsonl] == shard_of
        label_of = {Path(f).stem: lab for f, lab in listed}
        for s, r in zip(samples, jsonl):
            assert set(s) == {"__key__", "wav", "cls", "i32", "json"}
            meta = json.loads(s["json"])
            idx = classes.index(label_of[s["__key__"]])
            assert int(s["cls"].decode("ascii")) == idx == struct.unpack("<i", s["i32"])[0]
            _scene, city, loc, _seg, dev = s["__key__"].split("-")
            assert meta["key"] == s["__key__"] and meta["filename"] == f"audio/{s['__key__']}.wav"
            assert (meta["scene"], meta["label"], meta["city"], meta["location"], meta["device"]) == (
                label_of[s["__key__"]], idx, city, f"{city}-{loc}", dev)
            assert (meta["source_sample_rate"], meta["source_channels"], meta["source_subtype"]) == (
                16000, 2, "PCM_24")
            assert meta["duration"] == pytest.approx(1.0)
            assert {k: r[k] for k in ("label", "scene", "city", "location", "device", "filename")} == {
                k: meta[k] for k in ("label", "scene", "city", "location", "device", "filename")}
            x, sr = _stored(s)
            assert sr == 16000 and x.shape == (16000, 1)
        # Shuffled at pack time: not in sorted (class-grouped) order.
        keys = [s["__key__"] for s in samples]
        assert keys != sorted(keys)


def test_webdataset_and_dali_read_the_same_samples(packed_shards):
    wds = pytest.importorskip("webdataset")
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    for split in ("train", "test"):
        tars = [str(t) for t in _tars(packed_shards, split)]
        ds = wds.WebDataset(tars, shardshuffle=False).decode()
        by_wds = {s["__key__"]: (s["cls"], s["wav"], s["json"]) for s in ds}
        assert len(by_wds) == _manifest(packed_shards, split)["num_samples"]
        assert all(isinstance(c, int) and isinstance(j, dict) for c, _, j in by_wds.values())

        @dali.pipeline_def(batch_size=3, num_threads=1, device_id=None)
        def pipe(tars=tars):
            wav, lab, meta = fn.readers.webdataset(
                paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["wav", "i32", "json"],
                dtypes=[types.UINT8, types.INT32, types.UINT8], missing_component_behavior="error",
                name="reader", pad_last_batch=True,
            )
            audio, sr = fn.decoders.audio(wav, dtype=types.FLOAT, downmix=False)
            return wav, lab, meta, audio, sr

        p = pipe()
        p.build()
        n = p.epoch_size("reader")
        assert n == len(by_wds)
        by_dali = {}
        while len(by_dali) < n:
            wav, lab, meta, audio, sr = p.run()
            for i in range(len(lab)):
                key = json.loads(bytes(np.array(meta.at(i))))["key"]
                label = np.array(lab.at(i))
                assert label.shape == (1,) and label.dtype == np.int32
                by_dali[key] = (int(label[0]), bytes(np.array(wav.at(i))), np.array(audio.at(i)),
                                float(np.array(sr.at(i))))
        assert set(by_dali) == set(by_wds)
        for key, (label, wav, audio, sr) in by_dali.items():
            assert label == by_wds[key][0] == by_wds[key][2]["label"]
            assert wav == by_wds[key][1]
            ref, ref_sr = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
            assert sr == ref_sr and audio.shape == ref.shape
            np.testing.assert_allclose(audio, ref, atol=1e-6)


def test_gnu_tar_lists_and_format(packed_shards):
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("no tar binary")
    t = _tars(packed_shards, "train")[0]
    head = t.read_bytes()[:512]
    assert head[257:265] == b"ustar  \x00"  # GNU magic (POSIX ustar/PAX would be b"ustar\x0000")
    out = subprocess.run([tar, "--list", "--verbose", "--numeric-owner", "--file", str(t)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    samples = _read_samples(packed_shards, "train")[: _manifest(packed_shards, "train")["shards"][0]["samples"]]
    names = [f"{s['__key__']}.{e}" for s in samples for e in ("wav", "cls", "i32", "json")]
    assert [line.split()[-1] for line in out] == names
    assert all(line.startswith("-rw-r--r-- 0/0 ") and " 1970-01-01 00:00 " in line for line in out)
    # Our streamed writer produces exactly what tarfile's GNU writer would.
    assert t.read_bytes() == _retar(t)
    with tarfile.open(t) as tf:
        assert all(m.mtime == 0 and m.uid == m.gid == 0 and m.uname == m.gname == "" and m.mode == 0o644
                   for m in tf.getmembers())


def test_index_files_equal_dali_wds2idx(packed_shards, tmp_path):
    script = VENV_BIN / "wds2idx"
    if not script.exists() or shutil.which("tar") is None:
        pytest.skip("DALI's wds2idx (and GNU tar) not available")
    for split in ("train", "test"):
        for t in _tars(packed_shards, split)[:2]:
            ref = tmp_path / f"{t.stem}.idx"
            subprocess.run([sys.executable, str(script), str(t), str(ref)], check=True,
                           capture_output=True)
            assert t.with_suffix(".idx").read_bytes() == ref.read_bytes()


# --------------------------------------------------------------------------- audio conversion


def test_24bit_stereo_downmix_and_keep_channels(tmp_path):
    root = tmp_path / "ds"
    src = _noise(4800, 2, 7, amp=0.9)
    src[:, 1] = -0.5 * src[:, 1]
    _write(root / "clip.wav", src, 48000, "PCM_24")
    (root / "list.csv").write_text("filename,label\nclip.wav,x\n")
    source, _ = sf.read(str(root / "clip.wav"), dtype="float64")  # the exact 24-bit values

    out = tmp_path / "mono"
    P.pack(root, out, layout="csv", workers=1, progress=False, verbose=False)
    [s] = _read_samples(out, "train")
    x, sr = _stored(s)
    assert sr == 48000 and x.shape == (4800, 1)
    assert sf.info(io.BytesIO(s["wav"])).subtype == "PCM_24"
    # Mean of the two channels, quantised to 24 bits: within half an LSB (+ rounding slack).
    np.testing.assert_allclose(x[:, 0], source.mean(axis=1), atol=1.01 * 2.0**-24)

    out = tmp_path / "kept"
    P.pack(root, out, layout="csv", workers=1, keep_channels=True, progress=False, verbose=False)
    [s] = _read_samples(out, "train")
    x, sr = _stored(s)
    assert x.shape == (4800, 2) and np.array_equal(x, source)  # bit exact
    assert _manifest(out, "train")["audio"]["channels"] == 2


@pytest.mark.parametrize("src_sr", [44100, 16000])
def test_resampled_to_48k(tmp_path, src_sr):
    root = tmp_path / "ds"
    n = src_sr // 5  # 0.2 s
    t = np.arange(n) / src_sr
    tone = 0.5 * np.sin(2 * np.pi * 1000.0 * t)
    stereo = np.stack([tone + 0.05 * np.sin(2 * np.pi * 300 * t), tone - 0.05 * np.sin(2 * np.pi * 300 * t)], 1)
    _write(root / "clip.wav", stereo, src_sr, "PCM_24")
    (root / "list.csv").write_text("filename,label\nclip.wav,x\n")
    source, _ = sf.read(str(root / "clip.wav"), dtype="float64", always_2d=True)

    out = tmp_path / "out"
    P.pack(root, out, layout="csv", workers=1, progress=False, verbose=False)
    [s] = _read_samples(out, "train")
    x, sr = _stored(s)
    assert sr == 48000
    assert x.shape[0] == round(n * 48000 / src_sr)
    assert json.loads(s["json"])["source_sample_rate"] == src_sr
    # Equals soundfile decode + the packer's resampler, up to 24-bit quantisation.
    ref = audio.convert(source, src_sr, 48000)
    np.testing.assert_allclose(x, ref, atol=1.01 * 2.0**-24)
    # And is a faithful resampling: the downmix (the 300 Hz parts cancel) is the 1 kHz tone.
    t48 = np.arange(x.shape[0]) / 48000
    mid = slice(480, -480)  # away from the filter's edge transients
    np.testing.assert_allclose(x[mid, 0], 0.5 * np.sin(2 * np.pi * 1000.0 * t48[mid]), atol=2e-3)


# --------------------------------------------------------------------------- bad input


def _make_bad(root: Path, kind: str) -> str:
    """Create one bad file of ``kind`` in ``root``; return its listed name."""
    name = f"bad_{kind}.wav"
    p = root / name
    if kind == "truncated":
        _write(p, _noise(8000, 2, 1), 16000)
        p.write_bytes(p.read_bytes()[: 44 + 3000])
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "nonaudio":
        p.write_text("this is not audio\n" * 20)
    elif kind == "nan":
        x = _noise(1600, 1, 2)
        x[100] = np.nan
        _write(p, x, 16000, "FLOAT")
    elif kind == "missing":
        pass
    return name


BAD = {
    "truncated": "truncated WAV",
    "empty": "empty file",
    "nonaudio": "not readable as audio",
    "nan": "non-finite",
    "missing": "missing file",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_clip_fails_naming_file(tmp_path, kind):
    root = tmp_path / "ds"
    root.mkdir()
    name = _make_bad(root, kind)
    _csv_dataset(root, {name: "a"})
    with pytest.raises(P.PackError) as e:
        P.pack(root, tmp_path / "out", layout="csv", workers=1, sample_rate=16000,
               progress=False, verbose=False)
    assert name in str(e.value) and BAD[kind] in str(e.value)
    # Nothing that looks like a finished split, and no temp dirs left behind.
    assert not (tmp_path / "out" / "train").exists()
    assert not list((tmp_path / "out").glob(".*"))


def test_bad_clips_skipped_and_listed(tmp_path, capsys):
    root = tmp_path / "ds"
    root.mkdir()
    names = {kind: _make_bad(root, kind) for kind in BAD}
    _csv_dataset(root, {n: "a" for n in names.values()}, n_good=3)
    out = tmp_path / "out"
    rc = pack_main([str(root), str(out), "--layout", "csv", "--workers", "1", "--on-error", "skip",
                 "--sample-rate", "16000", "--no-progress"])
    assert rc == 0
    m = _manifest(out, "train")
    assert m["num_samples"] == 3 and sum(m["class_counts"].values()) == 3
    skipped = {s["file"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == set(names.values())
    for kind, name in names.items():
        assert BAD[kind] in skipped[name]
    err = capsys.readouterr().err
    for name in names.values():
        assert f"skipped {name}" in err
    assert sorted(s["__key__"] for s in _read_samples(out, "train")) == ["good0", "good1", "good2"]


def test_all_bad_split_is_an_error(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    name = _make_bad(root, "empty")
    (root / "list.csv").write_text(f"filename,label\n{name},a\n")
    with pytest.raises(P.PackError, match="no usable clips"):
        P.pack(root, tmp_path / "out", layout="csv", on_error="skip", workers=1, progress=False,
               verbose=False)


def test_expected_rate_and_duration(tmp_path):
    root = _csv_dataset(tmp_path / "ds", {})
    with pytest.raises(P.PackError, match=r"good\d\.wav: sample rate 16000 Hz, expected 48000"):
        P.pack(root, tmp_path / "o1", layout="csv", workers=1, expect_sample_rate=48000,
               progress=False, verbose=False)
    with pytest.raises(P.PackError, match=r"good\d\.wav: duration 0\.100 s, expected 10"):
        P.pack(root, tmp_path / "o2", layout="csv", workers=1, expect_duration=10.0,
               progress=False, verbose=False)


def _copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unknown_label_in_fold_file(synth_dataset, tmp_path):
    root = _copy_dataset(synth_dataset, tmp_path / "ds")
    f = root / "evaluation_setup" / "fold1_train.txt"
    lines = f.read_text().splitlines()
    bad = lines[2].split("\t")[0]
    lines[2] = f"{bad}\tspaceship"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(P.PackError) as e:
        P.pack(root, tmp_path / "out", workers=1, progress=False, verbose=False)
    msg = str(e.value)
    assert "fold1_train.txt:3" in msg and "spaceship" in msg and bad in msg and "not among the classes" in msg
    # A label that exists but contradicts meta.csv is caught too.
    other = "bus" if "airport" in bad or "bus" not in bad else "tram"
    lines[2] = f"{bad}\t{other}"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(P.PackError, match="disagrees with meta.csv"):
        P.pack(root, tmp_path / "out", workers=1, progress=False, verbose=False)


def test_missing_file_in_fold_list(synth_dataset, tmp_path):
    root = _copy_dataset(synth_dataset, tmp_path / "ds")
    gone = _fold(root, "fold1_evaluate.txt")[0][0]
    (root / gone).unlink()
    with pytest.raises(P.PackError, match=f"{gone}: missing file"):
        P.pack(root, tmp_path / "out", workers=1, sample_rate=16000, progress=False, verbose=False)
    ms = P.pack(root, tmp_path / "out", workers=1, sample_rate=16000, on_error="skip",
                progress=False, verbose=False)
    assert ms["test"]["skipped"] == [{"file": gone, "reason": "missing file"}]
    assert ms["test"]["num_samples"] == len(_fold(root, "fold1_evaluate.txt")) - 1


def test_duplicates_are_errors(synth_dataset, tmp_path):
    root = _copy_dataset(synth_dataset, tmp_path / "ds")
    f = root / "evaluation_setup" / "fold1_train.txt"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines + [lines[0]]) + "\n")
    with pytest.raises(P.PackError) as e:
        P.pack(root, tmp_path / "out", workers=1, progress=False, verbose=False)
    assert "duplicate filename" in str(e.value) and lines[0].split("\t")[0] in str(e.value)
    assert f"fold1_train.txt:{len(lines) + 1}" in str(e.value)

    # The same file in train and test is a leak, not a duplicate row.
    f.write_text("\n".join(lines) + "\n")
    ev = root / "evaluation_setup" / "fold1_evaluate.txt"
    ev.write_text(ev.read_text() + lines[0] + "\n")
    with pytest.raises(P.PackError, match="both splits 'train' and 'test'"):
        P.pack(root, tmp_path / "out", workers=1, progress=False, verbose=False)

    # Different files that map to one key.
    csv_root = tmp_path / "csv"
    _write(csv_root / "a" / "x.wav", _noise(800, 1, 0), 16000)
    _write(csv_root / "b" / "x.wav", _noise(800, 1, 1), 16000)
    (csv_root / "list.csv").write_text("filename,label\na/x.wav,u\nb/x.wav,v\n")
    with pytest.raises(P.PackError) as e:
        P.pack(csv_root, tmp_path / "out2", workers=1, progress=False, verbose=False)
    assert "duplicate sample key 'x'" in str(e.value) and "a/x.wav" in str(e.value) and "b/x.wav" in str(e.value)


# --------------------------------------------------------------------------- atomic output


def test_existing_output_refused_or_replaced_atomically(synth_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(synth_dataset), str(out), "--workers", "1", "--sample-rate", "16000",
            "--shard-max-samples", "4", "--no-progress"]
    assert pack_main(args) == 0
    assert "clips/s" in capsys.readouterr().err  # throughput line
    before = {s: _digest(out / s) for s in ("train", "test")}

    assert pack_main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert {s: _digest(out / s) for s in ("train", "test")} == before

    # A failing re-pack (a clip of the *test* split is corrupt, so train was already written to
    # its temp dir) leaves both previous splits untouched.
    bad = _copy_dataset(synth_dataset, tmp_path / "bad")
    victim = bad / _fold(bad, "fold1_evaluate.txt")[-1][0]
    victim.write_bytes(victim.read_bytes()[:100])
    assert pack_main([str(bad)] + args[1:] + ["--overwrite", "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "truncated" in err
    assert {s: _digest(out / s) for s in ("train", "test")} == before
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]  # no temp/old dirs

    assert pack_main(args + ["--overwrite", "--seed", "5"]) == 0
    after = {s: _digest(out / s) for s in ("train", "test")}
    assert after["train"] != before["train"]
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    assert _manifest(out, "train")["settings"]["seed"] == 5


def test_deterministic_across_runs_and_workers(synth_dataset, tmp_path):
    kw = {"sample_rate": 16000, "shard_max_samples": 3, "progress": False, "verbose": False}
    P.pack(synth_dataset, tmp_path / "a", workers=1, seed=1, **kw)
    P.pack(synth_dataset, tmp_path / "b", workers=2, seed=1, **kw)
    P.pack(synth_dataset, tmp_path / "c", workers=1, seed=2, **kw)
    for split in ("train", "test"):
        a, b = _digest(tmp_path / "a" / split), _digest(tmp_path / "b" / split)
        a.pop("manifest.json"), b.pop("manifest.json")  # holds the creation time
        assert a == b
        ma, mb = _manifest(tmp_path / "a", split), _manifest(tmp_path / "b", split)
        assert ma["shards"] == mb["shards"]
    keys = lambda d: [json.loads(x)["key"] for x in (d / "train" / "samples.jsonl").read_text().splitlines()]
    assert keys(tmp_path / "a") != keys(tmp_path / "c")
    assert sorted(keys(tmp_path / "a")) == sorted(keys(tmp_path / "c"))


def test_shard_size_limit(synth_dataset, tmp_path):
    # ~32 KB per 1 s 16 kHz 24-bit mono clip: a 0.05 MiB limit fits one sample per shard.
    ms = P.pack(synth_dataset, tmp_path / "out", sample_rate=16000, shard_size_mb=0.05, workers=1,
                progress=False, verbose=False)
    for m in ms.values():
        assert len(m["shards"]) == m["num_samples"]
        assert all(s["bytes"] <= 0.05 * 2**20 + 10240 for s in m["shards"])


# --------------------------------------------------------------------------- other layouts


def test_tau2019_layout(synth_dataset, tmp_path):
    root = _copy_dataset(synth_dataset, tmp_path / "tau")
    es = root / "evaluation_setup"
    for split in ("train", "evaluate"):
        rows = _fold(root, f"fold1_{split}.txt")
        (es / f"fold1_{split}.csv").write_text(
            "filename\tscene_label\n" + "".join(f"{f}\t{lab}\n" for f, lab in rows))
        (es / f"fold1_{split}.txt").unlink()
    (es / "fold1_test.txt").unlink()
    (es / "fold1_test.csv").write_text("filename\n" + "".join(
        f"{f}\n" for f, _ in _fold(synth_dataset, "fold1_evaluate.txt")))
    assert detect_layout(root) == "tau2019"
    ms = P.pack(root, tmp_path / "out", sample_rate=16000, workers=1, progress=False, verbose=False)
    ref = {s: _manifest(Path(tmp_path / "out"), s) for s in ("train", "test")}
    for split, fold in (("train", "fold1_train.txt"), ("test", "fold1_evaluate.txt")):
        rows = _fold(synth_dataset, fold)
        assert ms[split]["num_samples"] == len(rows) == ref[split]["num_samples"]
        assert ms[split]["settings"]["layout"] == "tau2019"
        assert ms[split]["class_counts"] == {c: sum(lab == c for _, lab in rows) for c in sorted(synth.SCENES)}
    # A header without scene_label is rejected naming the file.
    (es / "fold1_train.csv").write_text("filename\nx.wav\n")
    with pytest.raises(P.PackError, match="fold1_train.csv:1"):
        P.pack(root, tmp_path / "out2", workers=1, progress=False, verbose=False)


def test_csv_layout_and_split_name(tmp_path):
    root = _csv_dataset(tmp_path / "ds", {})
    ms = P.pack(root, tmp_path / "out", split="dev", workers=1, sample_rate=16000, progress=False,
                verbose=False)
    assert list(ms) == ["dev"]
    m = ms["dev"]
    assert m["settings"]["layout"] == "csv" and m["classes"] == ["a", "b"]
    assert m["class_counts"] == {"a": 1, "b": 2}
    samples = {s["__key__"]: s for s in _read_samples(tmp_path / "out", "dev")}
    assert {k: int(s["cls"]) for k, s in samples.items()} == {"good0": 1, "good1": 0, "good2": 1}
    meta = json.loads(samples["good0"]["json"])
    assert meta["city"] is None and meta["location"] is None and meta["device"] is None
    # Keys never contain dots (or spaces, which would break DALI's index format).
    _write(root / "my.clip one.wav", _noise(800, 1, 3), 16000)
    (root / "list.csv").write_text("filename,label\nmy.clip one.wav,a\n")
    P.pack(root, tmp_path / "out3", workers=1, sample_rate=16000, progress=False, verbose=False)
    [s] = _read_samples(tmp_path / "out3", "train")
    assert s["__key__"] == "my_clip_one"
    idx = (tmp_path / "out3" / "train" / "train-000000.idx").read_text().splitlines()
    assert idx[0] == "v1.2 1" and len(idx[1].split()) == 16


def test_unlabelled_folder_becomes_eval_split(synth_dataset, tmp_path):
    root = tmp_path / "leaderboard"
    shutil.copytree(synth_dataset / "audio", root / "audio")
    classes_from = tmp_path / "classes.json"
    classes_from.write_text(json.dumps({"classes": sorted(synth.SCENES)}))
    ms = P.pack(root, tmp_path / "out", sample_rate=16000, workers=1, classes=str(classes_from),
                progress=False, verbose=False)
    assert list(ms) == ["eval"]
    m = ms["eval"]
    assert not m["labelled"] and m["class_counts"] == {} and m["classes"] == sorted(synth.SCENES)
    assert m["num_samples"] == len(list((root / "audio").glob("*.wav")))
    for s in _read_samples(tmp_path / "out", "eval"):
        assert s["cls"] == b"-1" and struct.unpack("<i", s["i32"])[0] == -1
        meta = json.loads(s["json"])
        assert meta["scene"] is None and meta["label"] == -1 and meta["city"] is not None


def test_fold_all_packs_every_labelled_clip_as_the_train_split(synth_dataset, packed_shards,
                                                                tmp_path, cli):
    """The paper's protocol: meta.csv's clips and labels; the fold files are not even read."""
    root = tmp_path / "development"
    shutil.copytree(synth_dataset, root)
    (root / "evaluation_setup" / "fold1_train.txt").write_text("audio/nope.wav\tspaceship\n")
    out = tmp_path / "out"
    r = cli(pack_main, [root, out, "--fold", "all", "--sample-rate", "16000", "--workers", "1",
                        "--no-progress"])
    assert r.returncode == 0, r
    assert [p.name for p in out.iterdir()] == ["train"]
    meta = [row.split("\t") for row in (root / "meta.csv").read_text().splitlines()[1:]]
    m = _manifest(out, "train")
    assert m["settings"]["fold"] == "all" and m["labelled"] and m["num_samples"] == len(meta) == 40
    assert m["class_counts"] == {c: sum(row[1] == c for row in meta) for c in sorted(synth.SCENES)}
    samples = [json.loads(s) for s in (out / "train" / "samples.jsonl").read_text().splitlines()]
    assert sorted((s["filename"], s["scene"]) for s in samples) == sorted(tuple(r[:2]) for r in meta)
    fold1 = [json.loads(line)["key"] for split in ("train", "test")
             for line in (packed_shards / split / "samples.jsonl").read_text().splitlines()]
    assert sorted(s["key"] for s in samples) == sorted(fold1)  # fold 1's train and test clips
    assert "--fold all: the train split is every clip meta.csv labels (40 of 40)" in r.stderr
    assert f"{out} --fold all --splits train --overwrite" in pack_command([out / "train"])


def test_fold_and_layout_errors(synth_dataset, tmp_path, capsys):
    with pytest.raises(P.PackError, match="no fold2 files"):
        P.pack(synth_dataset, tmp_path / "o", fold=2, workers=1, progress=False, verbose=False)
    with pytest.raises(P.PackError, match=r"fold=0: expected a fold number \(1, 2, ...\) or 'all'"):
        P.pack(synth_dataset, tmp_path / "o", fold=0, progress=False, verbose=False)
    with pytest.raises(SystemExit) as e:
        pack_main([str(synth_dataset), str(tmp_path / "o"), "--fold", "first"])
    assert e.value.code == 2
    assert "expected a fold number or 'all', got 'first'" in capsys.readouterr().err
    leaderboard = tmp_path / "leaderboard"  # audio only, like the leaderboard set
    shutil.copytree(synth_dataset / "audio", leaderboard / "audio")
    with pytest.raises(P.PackError, match=rf"{leaderboard}/meta.csv: --fold all packs the clips "
                       "meta.csv labels, and there is no meta.csv"):
        P.pack(leaderboard, tmp_path / "o", fold="all", progress=False, verbose=False)
    with pytest.raises(P.PackError, match="the csv layout has no folds"):
        P.pack(synth_dataset, tmp_path / "o", layout="csv", csv_path=synth_dataset / "meta.csv",
               fold="all", progress=False, verbose=False)
    with pytest.raises(P.PackError, match="dataset folder not found"):
        P.pack(tmp_path / "nope", tmp_path / "o", workers=1, progress=False, verbose=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(P.PackError, match="cannot detect the layout"):
        P.pack(tmp_path / "empty", tmp_path / "o", workers=1, progress=False, verbose=False)


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "asc_dist.pack", "--help"], capture_output=True,
                       text=True, check=False, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0 and "--overwrite" in r.stdout and "atomically" in r.stdout


def test_long_keys_index_offsets(tmp_path):
    """Names over 100 bytes get a GNU LongLink header; the index must point past it (DALI's own
    wds2idx assumes one header block per member and gets these offsets wrong)."""
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    root = tmp_path / "ds"
    names = ["k" * 130 + ".wav", "short.wav"]
    for i, n in enumerate(names):
        _write(root / n, _noise(800 + 100 * i, 1, i), 16000)
    (root / "list.csv").write_text("filename,label\n" + "".join(f"{n},a\n" for n in names))
    P.pack(root, tmp_path / "out", workers=1, sample_rate=16000, progress=False, verbose=False)
    tars = [str(t) for t in _tars(tmp_path / "out", "train")]
    by_tar = {s["__key__"]: s["wav"] for s in _read_samples(tmp_path / "out", "train")}

    @dali.pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        wav, meta = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                          ext=["wav", "json"], dtypes=[types.UINT8, types.UINT8])
        return wav, meta

    p = pipe()
    p.build()
    wav, meta = p.run()
    got = {json.loads(bytes(np.array(meta.at(i))))["key"]: bytes(np.array(wav.at(i))) for i in range(2)}
    assert got == by_tar and len(got) == 2
    assert Path(tars[0]).read_bytes() == _retar(Path(tars[0]))  # LongLink headers included


def test_splits_option_packs_a_subset_with_the_full_class_list(synth_dataset, packed_shards, tmp_path):
    out = tmp_path / "out"
    P.pack(synth_dataset, out, sample_rate=16000, shard_max_samples=4, only=["test"], workers=1,
           progress=False, verbose=False)
    assert not (out / "train").exists()
    mine = json.loads((out / "test" / "manifest.json").read_text())
    full = json.loads((packed_shards / "test" / "manifest.json").read_text())
    assert mine["classes"] == full["classes"] and mine["shards"] == full["shards"]
    with pytest.raises(P.PackError, match="--splits valid: not in this dataset"):
        P.pack(synth_dataset, tmp_path / "o2", only=["valid"], progress=False, verbose=False)
