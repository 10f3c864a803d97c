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


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, packed_shards) -> Path:
    return trained_run(tmp_path_factory, packed_shards)


def tone(sr: int, seconds: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    return np.stack([x * (1 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)


@pytest.fixture(scope="session")
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


def test_44k_file_gives_the_same_features_packed_first_or_predicted_directly(tmp_path):
    """One decode/resample path (asc_dist.audio, soxr): a 44.1 kHz stereo file packed into 48 kHz
    shards and read by the data backend gives the features predict computes from the file."""
    import torchaudio

    from asc_dist import audio, config, synth
    from asc_dist.data import build_source
    from asc_dist.frontend import LogMel
    from asc_dist.pack import pack

    ds = synth.generate(tmp_path / "ds", clips_per_class=2, duration=1.0, sample_rate=44100, seed=1,
                        progress=False)
    pack(ds, tmp_path / "shards", sample_rate=48000, workers=1, progress=False, verbose=False)
    cfg = config.load(["features.clip_seconds=1.0", "features.frames=32", "data.backend=torch",
                       "data.cache=none", f"data.shards={tmp_path / 'shards'}"], world_size=1)
    with build_source(cfg, "test", train=False, rank=0, world_size=1, device=torch.device("cpu"),
                      batch_size=4) as src:
        packed = {k: x[0] for b in src.epoch(0) for k, x, ok in zip(b.keys, b.features, b.valid) if ok}
    logmel = LogMel(cfg.features)
    worst_ours, worst_torchaudio = 0.0, 0.0
    for wav in sorted((ds / "audio").glob("*.wav")):
        if wav.stem not in packed:
            continue
        direct = logmel(torch.from_numpy(audio.decode(str(wav), 48000)))[0, 0]
        band = (packed[wav.stem] > -90) & (direct > -90)
        worst_ours = max(worst_ours, float((direct - packed[wav.stem])[band].abs().max()))
        # what predict did before: torchaudio's resampler (the test can tell the difference)
        x, sr = sf.read(wav, dtype="float32")
        old = torchaudio.functional.resample(torch.from_numpy(x.mean(axis=1)), sr, 48000)
        worst_torchaudio = max(worst_torchaudio,
                               float((logmel(old)[0, 0] - packed[wav.stem])[band].abs().max()))
    assert worst_ours < 0.05, worst_ours
    assert worst_torchaudio > 0.05, worst_torchaudio
    print(f"44.1 kHz clips, max |dB| difference packed vs direct: soxr {worst_ours:.4f}, "
          f"torchaudio {worst_torchaudio:.2f}")


def test_predict_scores_equal_evaluate_scores_on_the_same_clips(run_dir, synth_dataset, packed_shards,
                                                               tmp_path):
    """The original test files (stereo, 24-bit) through predict, the packed test split through
    evaluate (predictions.tsv): the same probabilities."""
    from asc_dist import evaluate
    from asc_dist.validate import read_predictions

    assert evaluate.main([str(run_dir), "--split", str(packed_shards / "test"), "--out",
                          str(tmp_path / "eval"), "--backend", "torch", "--quiet"]) == 0
    classes, by_key = read_predictions(tmp_path / "eval" / "predictions.tsv")
    files = [synth_dataset / f"audio/{k}.wav" for k in sorted(by_key)]
    out = tmp_path / "scores.tsv"
    assert predict.main([str(run_dir), *map(str, files), "--scores", "--out", str(out),
                         "--workers", "0", "--quiet"]) == 0
    rows = read_tsv(out)
    assert rows[0] == ["filename", "scene_label", *classes] and len(rows) == 1 + len(by_key) == 21
    for row in rows[1:]:
        _, probs = by_key[Path(row[0]).stem]
        np.testing.assert_allclose(np.asarray(row[2:], dtype=float), probs, atol=2e-5)


def test_front_end_runs_in_float32_outside_bf16_autocast(run_dir, tmp_path, monkeypatch):
    """Under bf16 autocast (CUDA's default precision) only the network runs in bf16: the log-mel's
    mel projection is a matmul that autocast would otherwise round to bf16 (~0.1 dB)."""
    from asc_dist.frontend import LogMel
    from asc_dist.restore import restore

    sf.write(tmp_path / "a.wav", tone(16000, 1.0, seed=9), 16000, subtype="FLOAT")
    restored = restore(run_dir)
    monkeypatch.setattr(type(restored), "autocast",
                        lambda self, device: torch.autocast("cpu", dtype=torch.bfloat16))
    seen = []
    forward = restored.model.forward
    monkeypatch.setattr(restored.model, "forward", lambda x: seen.append(x) or forward(x))
    items = predict.collect_inputs([tmp_path / "a.wav"])
    probs, failed = predict.predict_files(restored, items, workers=0, progress=False)
    assert not failed and len(seen) == 1 and seen[0].dtype == torch.float32
    wave = torch.from_numpy(sf.read(tmp_path / "a.wav", dtype="float32")[0])
    expected = restored.standardize(LogMel(restored.cfg.features)(wave[None]))
    assert torch.equal(seen[0], expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what it would be inside autocast
        inside = restored.standardize(LogMel(restored.cfg.features)(wave[None]))
    assert not torch.equal(inside.float(), expected)


def test_precision_flag_overrides_the_training_runs_precision(run_dir, audio_dir, tmp_path, capsys):
    """The smoke run trained in float32 on CPU: --precision fp32 equals the default, bf16 differs
    (what a GPU-trained bf16 checkpoint needs to be compared in float32 on a CPU)."""
    files = [str(audio_dir / "mono16k.wav"), str(audio_dir / "long.wav")]

    def scores(*flags):
        out = tmp_path / f"p{len(flags)}{'-'.join(flags)}.tsv"
        rc = predict.main([str(run_dir), *files, "--out", str(out), "--scores", "--workers", "0",
                           "--quiet", *flags])
        assert rc == 0, capsys.readouterr().err
        return np.array([r[2:] for r in read_tsv(out)[1:]], dtype=float)

    default, fp32, bf16 = scores(), scores("--precision", "fp32"), scores("--precision", "bf16")
    assert np.array_equal(default, fp32)
    assert np.isfinite(bf16).all() and not np.array_equal(fp32, bf16)
    assert np.abs(fp32 - bf16).max() < 0.01
    fp16 = scores("--precision", "fp16")  # model and inputs cast, as the DCASE baselines test
    assert not np.array_equal(fp32, fp16) and np.abs(fp32 - fp16).max() < 0.01
    with pytest.raises(SystemExit) as e:
        predict.main([str(run_dir), *files, "--precision", "fp8"])
    assert e.value.code == 2 and "--precision" in capsys.readouterr().err
