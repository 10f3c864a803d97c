"""asc_dist.synth: TUT 2018 layout, audio format, determinism, learnable but varied scenes."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asc_dist import synth
from asc_dist.errors import UserError

NAME = re.compile(r"^audio/([a-z_]+)-([a-z]+)-(\d+)-(\d+)-a\.wav$")


def _lines(p: Path) -> list[str]:
    text = p.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text.splitlines()


def test_layout_matches_tut2018(synth_dataset):
    root = synth_dataset
    meta = _lines(root / "meta.csv")
    assert meta[0] == "filename\tscene_label\tidentifier\tsource_label"
    rows = [line.split("\t") for line in meta[1:]]
    assert len(rows) == 10 * 4
    assert sorted({r[1] for r in rows}) == sorted(synth.SCENES)
    assert len(synth.SCENES) == 10
    cities = set()
    for fn, scene, ident, source in rows:
        m = NAME.match(fn)
        assert m, fn
        assert m[1] == scene and ident == f"{m[2]}-{m[3]}" and source == "a"
        assert (root / fn).is_file()
        cities.add(m[2])
    assert len(cities) >= 3 and cities <= set(synth.CITIES)
    assert sorted(p.name for p in (root / "audio").iterdir()) == sorted(Path(r[0]).name for r in rows)
    # Segment ids are unique, like the real data.
    assert len({NAME.match(r[0])[4] for r in rows}) == len(rows)

    es = root / "evaluation_setup"
    train = [line.split("\t") for line in _lines(es / "fold1_train.txt")]
    evaluate = [line.split("\t") for line in _lines(es / "fold1_evaluate.txt")]
    test = _lines(es / "fold1_test.txt")
    assert all(len(r) == 2 for r in train + evaluate) and all("\t" not in t for t in test)
    assert test == [r[0] for r in evaluate]
    label_of = {r[0]: r[1] for r in rows}
    assert all(label_of[f] == lab for f, lab in train + evaluate)
    assert sorted(f for f, _ in train + evaluate) == sorted(label_of)
    # Split by location: no test location appears in training; every class in both.
    ident = {r[0]: r[2] for r in rows}
    assert not {ident[f] for f, _ in train} & {ident[f] for f, _ in evaluate}
    assert {lab for _, lab in train} == {lab for _, lab in evaluate} == set(synth.SCENES)


def test_defaults_are_48k_24bit_stereo(tmp_path):
    root = synth.generate(tmp_path / "d", clips_per_class=2, duration=0.25, progress=False)
    files = sorted((root / "audio").glob("*.wav"))
    assert len(files) == 20
    info = sf.info(str(files[0]))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (48000, 2, "PCM_24", "WAV")
    assert info.frames == 12000
    x, _ = sf.read(str(files[0]))
    # Real stereo: channels correlated but not identical.
    c = np.corrcoef(x[:, 0], x[:, 1])[0, 1]
    assert 0.1 < c < 0.999


def test_deterministic_per_seed(tmp_path):
    kw = {"clips_per_class": 2, "duration": 0.5, "sample_rate": 16000, "progress": False}
    a = synth.generate(tmp_path / "a", seed=3, **kw)
    b = synth.generate(tmp_path / "b", seed=3, workers=2, **kw)  # worker count must not matter
    c = synth.generate(tmp_path / "c", seed=4, **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    wav_a = min((a / "audio").glob("*.wav"))
    wav_c = sorted((c / "audio").glob("*.wav"))
    assert all(wav_a.read_bytes() != w.read_bytes() for w in wav_c)


def _features(path: Path) -> np.ndarray:
    """Mean and std of log power in 24 log-spaced bands (a crude log-mel summary)."""
    x, sr = sf.read(str(path))
    x = x.mean(axis=1)
    n = 512
    frames = np.lib.stride_tricks.sliding_window_view(x, n)[:: n // 2] * np.hanning(n)
    p = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    edges = np.geomspace(60, sr / 2, 25) * n / sr
    bands = np.stack([p[:, int(lo):max(int(lo) + 1, int(hi))].sum(1) for lo, hi in itertools.pairwise(edges)], 1)
    logp = 10 * np.log10(bands + 1e-10)
    return np.concatenate([logp.mean(0) - logp.mean(), logp.std(0)])


def test_scenes_learnable_on_held_out_locations_but_varied(tmp_path):
    # 4 locations per scene, 2 clips each: 3 train locations, 1 held-out location per scene.
    root = synth.generate(tmp_path / "d", clips_per_class=8, duration=1.5, sample_rate=16000,
                          segments_per_location=2, progress=False)
    es = root / "evaluation_setup"
    train = [line.split("\t") for line in _lines(es / "fold1_train.txt")]
    test = [line.split("\t") for line in _lines(es / "fold1_evaluate.txt")]
    xtr = np.stack([_features(root / f) for f, _ in train])
    xte = np.stack([_features(root / f) for f, _ in test])
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    classes = sorted(synth.SCENES)
    cent = np.stack([xtr[[lab == c for _, lab in train]].mean(0) for c in classes])
    pred = np.argmin(((xte[:, None] - cent[None]) ** 2).sum(-1), 1)
    truth = np.array([classes.index(lab) for _, lab in test])
    classwise = np.mean([np.mean(pred[truth == k] == k) for k in range(10)])
    # A nearest-centroid on band statistics already beats chance (10 %) by far on unseen
    # locations; a CNN has more to learn from.
    assert classwise >= 0.6, classwise

    # Within-class variation: clip levels of one scene spread over several dB, and two clips
    # from the same location are not copies of each other.
    levels = defaultdict(list)
    for f, lab in train + test:
        x, _ = sf.read(str(root / f))
        levels[lab].append(10 * np.log10(np.mean(x**2)))
    assert np.mean([np.ptp(v) for v in levels.values()]) > 2.0


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = synth.main([str(out), "--clips-per-class", "2", "--duration", "0.2", "--sample-rate",
                     "16000", "--seed", "1", "--no-progress"])
    assert rc == 0
    assert len(list((out / "audio").glob("*.wav"))) == 20
    assert "wrote 20 clips" in capsys.readouterr().err
    assert synth.main([str(tmp_path / "bad"), "--clips-per-class", "1"]) == 2
    assert "clips_per_class" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        synth.main(["--help"])
    assert e.value.code == 0


def test_existing_output_refused_or_replaced(tmp_path):
    kw = {"clips_per_class": 2, "duration": 0.2, "sample_rate": 16000, "progress": False}
    out = synth.generate(tmp_path / "d", seed=0, **kw)
    before = sorted(p.name for p in (out / "audio").iterdir())
    with pytest.raises(UserError, match="--overwrite"):
        synth.generate(out, seed=1, **kw)
    assert sorted(p.name for p in (out / "audio").iterdir()) == before
    synth.generate(out, seed=1, clips_per_class=3, duration=0.2, sample_rate=16000,
                   overwrite=True, progress=False)
    # Replaced as a whole: no stale clips of the old dataset, no temp dirs beside it.
    assert len(list((out / "audio").iterdir())) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
