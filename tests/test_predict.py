"""``python -m asc_dist.predict``: WAV/FLAC, any rate, mono/stereo, short/long files and a corrupt
one; DCASE TSV output; agreement with the model applied directly to the same waveform."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_evaluate import SMOKE_STEPS, direct_logits, split_clips, trained_run

from asc_dist import predict


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, packed_shards) -> Path:
    return trained_run(tmp_path_factory, packed_shards)


def tone(sr: int, seconds: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    return np.stack([x * (1 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory, packed_shards) -> Path:
    d = tmp_path_factory.mktemp("audio")
    (d / "sub").mkdir()
    sf.write(d / "mono16k.wav", tone(16000, 1.0), 16000, subtype="PCM_16")
    sf.write(d / "mono16k.flac", tone(16000, 1.0, seed=1), 16000)
    sf.write(d / "stereo44k.wav", tone(44100, 1.0, channels=2, seed=2), 44100, subtype="PCM_24")
    sf.write(d / "sub" / "stereo48k.flac", tone(48000, 1.5, channels=2, seed=3), 48000)
    sf.write(d / "short.wav", tone(16000, 0.1, seed=4), 16000)  # padded to the clip length
    sf.write(d / "long.wav", tone(22050, 4.0, seed=5), 22050)  # cropped to the clip length
    (d / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage, not audio")
    (d / "notes.txt").write_text("not audio: ignored when a directory is searched")
    # A real test clip, byte for byte as packed: its prediction must match the model's own output.
    clip = split_clips(packed_shards / "test")[0]
    (d / f"{clip['key']}.wav").write_bytes(clip["wav_bytes"])
    return d


def read_tsv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


def test_directory_with_a_corrupt_file_dcase_format(run_dir, audio_dir, packed_shards, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    out.write_text("stale\n")  # replaced, not appended to
    rc = predict.main([str(run_dir), str(audio_dir), "--out", str(out), "--workers", "0",
                       "--batch-size", "3", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1  # some files unreadable, the rest written
    assert "corrupt.wav" in err and "1 unreadable file(s)" in err
    rows = read_tsv(out)
    key = split_clips(packed_shards / "test")[0]["key"]
    assert sorted(r[0] for r in rows) == sorted([  # relative to the directory given
        "mono16k.wav", "mono16k.flac", "stereo44k.wav", "sub/stereo48k.flac", "short.wav", "long.wav",
        f"{key}.wav"])
    classes = torch.load(run_dir / "checkpoints" / f"step_{SMOKE_STEPS}.pt", weights_only=True)["classes"]
    assert all(len(r) == 2 and r[1] in classes for r in rows)  # filename<TAB>scene_label, no header
    assert not list(tmp_path.glob(".*tmp*"))


def test_scores_header_probabilities_and_agreement_with_the_model(run_dir, audio_dir, packed_shards,
                                                                  tmp_path, capsys):
    out = tmp_path / "scores.tsv"
    files = [audio_dir / "stereo44k.wav", audio_dir / "sub" / "stereo48k.flac"]
    clip = split_clips(packed_shards / "test")[0]
    files.append(audio_dir / f"{clip['key']}.wav")
    rc = predict.main([str(run_dir), *map(str, files), "--out", str(out), "--scores", "--workers", "1",
                       "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rows = read_tsv(out)
    classes = torch.load(run_dir / "checkpoints" / f"step_{SMOKE_STEPS}.pt", weights_only=True)["classes"]
    assert rows[0] == ["filename", "scene_label", *classes]
    assert [r[0] for r in rows[1:]] == [str(f) for f in files]  # as given, in order
    for r in rows[1:]:
        p = np.array(r[2:], dtype=float)
        assert p.sum() == pytest.approx(1.0, abs=1e-4)
        assert r[1] == classes[int(p.argmax())]
    logits, _ = direct_logits(run_dir / "checkpoints" / f"step_{SMOKE_STEPS}.pt", [clip["wave"]])
    want = logits.softmax(1)[0].numpy()
    assert np.array(rows[3][2:], dtype=float) == pytest.approx(want, abs=2e-6)


def test_stereo_is_downmixed_and_other_rates_resampled(run_dir, tmp_path):
    from asc_dist.restore import restore

    x = tone(16000, 1.0, seed=7)[:, 0]
    sf.write(tmp_path / "mono.wav", x, 16000, subtype="FLOAT")
    sf.write(tmp_path / "stereo.wav", np.stack([x, x], 1), 16000, subtype="FLOAT")
    # Same content at 32 kHz: after resampling, close to the 16 kHz original.
    import torchaudio

    up = torchaudio.functional.resample(torch.from_numpy(x), 16000, 32000).numpy()
    sf.write(tmp_path / "up32k.wav", up, 32000, subtype="FLOAT")
    items = predict.collect_inputs([tmp_path])
    restored = restore(run_dir)
    probs, failed = predict.predict_files(restored, items, batch_size=8, workers=0, progress=False)
    assert not failed
    by_name = {it.name: probs[i] for i, it in enumerate(items)}
    assert torch.allclose(by_name["mono.wav"], by_name["stereo.wav"], atol=1e-6)
    assert torch.allclose(by_name["mono.wav"], by_name["up32k.wav"], atol=2e-2)


def test_missing_file_reported_and_nothing_to_do_is_an_error(run_dir, tmp_path, capsys):
    sf.write(tmp_path / "ok.flac", tone(16000, 0.5), 16000)
    out = tmp_path / "p.csv"
    assert predict.main([str(run_dir), str(tmp_path / "ok.flac"), str(tmp_path / "gone.wav"),
                         "--out", str(out), "--workers", "0", "--quiet"]) == 1
    assert "gone.wav: no such file" in capsys.readouterr().err
    assert [r[0] for r in read_tsv(out)] == [str(tmp_path / "ok.flac")]
    (tmp_path / "empty").mkdir()
    assert predict.main([str(run_dir), str(tmp_path / "empty"), "--out", str(out), "--quiet"]) == 2
    assert "no audio files" in capsys.readouterr().err
    # DCASE names relative to a dataset root
    assert predict.main([str(run_dir), str(tmp_path / "ok.flac"), "--relative-to", str(tmp_path.parent),
                         "--out", str(out), "--workers", "0", "--quiet"]) == 0
    assert read_tsv(out) == [[f"{tmp_path.name}/ok.flac", read_tsv(out)[0][1]]]


def test_format_is_sniffed_and_a_truncated_file_is_reported(run_dir, tmp_path, capsys):
    # FLAC bytes under a .wav name decode by content (soundfile sniffs the format); a truncated
    # FLAC does not: it is reported, not fatal.
    buf = io.BytesIO()
    sf.write(buf, tone(16000, 1.0), 16000, format="FLAC")
    (tmp_path / "flac_named.wav").write_bytes(buf.getvalue())
    (tmp_path / "truncated.flac").write_bytes(buf.getvalue()[:40])
    out = tmp_path / "p.csv"
    rc = predict.main([str(run_dir), str(tmp_path), "--out", str(out), "--workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "truncated.flac" in err
    assert [r[0] for r in read_tsv(out)] == ["flac_named.wav"]
