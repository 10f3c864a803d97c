"""DALI backend (the only module that imports NVIDIA DALI).

readers.webdataset (tars + their index files from the manifest; shard_id/num_shards split the
samples into contiguous ranges, pad_last_batch) -> decoders.audio (CPU; FLOAT, downmix, resample
to the feature rate) -> [GPU] fixed length -> preemphasis_filter (``features.preemphasis``; its
first output sample dropped, so the clip is one sample shorter as in asc_dist.frontend) ->
spectrogram (the configured Hann window's values) -> mel_filter_bank (``mel_scale``, ``mel_norm``
as its mel_formula, normalize) -> to_decibels (``features.log=db``) or log(x + log_eps) (``ln``)
-> the affine map. DALI has no Kaldi filterbank: with ``mel_scale=kaldi`` the graph ends at the
power spectrogram and LogMel.from_spectrogram (torch, on the training device) does the rest.
With a CUDA training device the CPU only reads and decodes; without one the whole pipeline runs
on the CPU (``device_id=None``). Every setting that differs from
torchaudio/librosa defaults is pinned (see asc_dist.frontend), so both backends agree for every
option: ~1e-4 dB near a clip's peak, < 0.002 dB (< 5e-4 in ln) in bins 60-80 dB below it, where
float32 FFT rounding dominates (tests/test_frontend_options.py).

Epochs: one pipeline per epoch, seeded from (seed, epoch, shard), with the shard a rank reads
rotated by the epoch (``shard_id = (rank + epoch) % world``): the rank's epoch is then a pure
function of (seed, epoch, rank), as resuming needs. The next epoch's pipeline is built in the
background while the current one runs. Training takes exactly ``steps_per_epoch`` batches of
the rank's range (shuffled within ``data.shuffle_buffer``); evaluation reads the range in order
and marks rows past its end (DALI's repeated padding) ``valid=False``. Resuming mid-epoch
replays the skipped batches (cheap next to a run; the feature cache, asc_dist.data.cache, makes
it arithmetic).

Keys come from each sample's ``source_info`` ("<tar>:<offset>:<member name>"), copied with each
batch and decoded only when read. DALI's own errors name no sample, so a failing build or run is
followed by a scan of the rank's samples (:func:`asc_dist.data.manifest.diagnose`) and re-raised
as DataError naming shard and key.

Integrity (``data.verify``, on by default): DALI decodes inside its graph, so the reader's raw
encoded audio is a further (CPU) output of the pipeline, the very buffer the decoder read; before
a batch is handed out, each row's audio bytes and int32 label are hashed on the CPU (xxh3_64)
and compared with the digests of samples.jsonl (:func:`asc_dist.data.manifest.check_member`).
With a GPU the hashing runs in a small thread pool while the features are copied out, so the
training thread does not hash a large batch alone; on a CPU-only pipeline it runs inline (a pool
only added thread hand-offs there). The GPU graph is unchanged; the check costs ~0.04 ms of CPU
per 10 s 48 kHz clip (BENCHMARKS.md, "Shard integrity").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from asc_dist.data import Batch, BatchSource
from asc_dist.data.manifest import DataError, check_member, diagnose
from asc_dist.data.sharding import derive_seed, shard_range
from asc_dist.frontend import (
    LogMel,
    affine,
    clip_samples,
    hann_window,
    log_eps,
    log_zero,
    options,
    periodic_window,
    preemphasis,
    stft_frames,
)


def dali_computes_mel(cfg_features: Any) -> bool:
    """False when DALI stops at the power spectrogram (mel_scale=kaldi: no such operator)."""
    return options(cfg_features)[0] != "kaldi"


def graph_shape(cfg_features: Any) -> tuple[int, int, int]:
    """What :func:`logmel_graph` gives per clip: [1, n_mels, frames], or [1, n_fft/2 + 1, STFT
    frames] when torch finishes the features (:func:`torch_tail`)."""
    f = cfg_features
    if dali_computes_mel(f):
        return 1, int(f.n_mels), int(f.frames)
    return 1, int(f.n_fft) // 2 + 1, stft_frames(f)


def torch_tail(cfg_features: Any) -> LogMel | None:
    """What finishes the graph's output in torch (LogMel.from_spectrogram), or None."""
    return None if dali_computes_mel(cfg_features) else LogMel(cfg_features)


def logmel_graph(encoded, cfg_features: Any, gpu: bool):
    """Encoded audio bytes (a DataNode) -> [1, n_mels, frames] float log mel power, as LogMel
    computes it for every ``mel_scale`` / ``mel_norm`` / ``log`` option (mel_scale=kaldi: the
    power spectrogram, see :func:`graph_shape`)."""
    f = cfg_features
    mel_scale, mel_norm, log = options(f)
    audio, _ = fn.decoders.audio(encoded, dtype=types.FLOAT, downmix=True,
                                 sample_rate=float(f.sample_rate))
    if gpu:  # the CPU threads only read and decode; everything after runs on the device
        audio = audio.gpu()
    # Pad/crop inside the pipeline: a truncated WAV decodes (silently) short.
    n = clip_samples(f)
    audio = fn.slice(audio, start=[0], shape=[n], axes=[0],
                     out_of_bounds_policy="pad", fill_values=0.0)
    c = preemphasis(f)
    if c > 0:  # out[t] = x[t] - c x[t-1]; PaSST's y[n] = x[n+1] - c x[n] is out[1:]
        audio = fn.preemphasis_filter(audio, preemph_coeff=c, border="zero")
        audio = fn.slice(audio, start=[1], shape=[n - 1], axes=[0])
    # Time-major ("tf") spectrogram + mel measured ~20% faster on CPU than the default "ft";
    # one small transpose at the end restores [n_mels, frames].
    spec = fn.spectrogram(audio, nfft=int(f.n_fft), window_length=int(f.win_length),
                          window_step=int(f.hop_length), power=2, center_windows=True,
                          reflect_padding=True, layout="tf",
                          # DALI's built-in Hann differs from torch's by ~0.02 dB
                          window_fn=hann_window(int(f.win_length), periodic_window(f)).tolist())
    if not dali_computes_mel(f):
        return fn.expand_dims(fn.transpose(spec, perm=[1, 0]), axes=[0])
    # DALI builds the triangles as torchaudio does (in Hz between mel-spaced edges) for both
    # formulas; the weights agree to float32 rounding (~3e-5 relative), normalised or not.
    mel = fn.mel_filter_bank(spec, sample_rate=float(f.sample_rate),  # default would be 44.1 kHz
                             nfilter=int(f.n_mels), freq_low=float(f.f_min), freq_high=float(f.f_max),
                             mel_formula=mel_scale, normalize=mel_norm == "slaney")
    if log == "ln":
        out = dmath.log(mel + log_eps(f))
    else:  # reference=1.0: without it DALI scales by each clip's own maximum.
        out = fn.to_decibels(mel, multiplier=10.0, reference=1.0, cutoff_db=float(f.floor_db))
    offset, divisor = affine(f)
    if offset != 0.0 or divisor != 1.0:
        out = (out + offset) / divisor
    out = fn.slice(out, start=[0], shape=[int(f.frames)], axes=[0], out_of_bounds_policy="pad",
                   fill_values=log_zero(f))
    out = fn.transpose(out, perm=[1, 0])
    return fn.expand_dims(out, axes=[0])


def _first_line(e: BaseException) -> str:
    """DALI's operator and reason, without its boilerplate and C++ context."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    op = next((ln.rstrip(",") for ln in lines if ln.startswith("Error in ")), "")
    reason = ""
    if "encountered:" in text:
        after = [ln.strip() for ln in text.split("encountered:", 1)[1].splitlines() if ln.strip()]
        reason = after[0] if after else ""
    if not reason:
        skip = ("Critical error", "Current pipeline object", "C++ context", "Stacktrace", "[/")
        reason = next((ln for ln in lines if not ln.startswith(skip)), type(e).__name__)
    return (f"{op}: {reason}" if op else reason)[:300]


def _source(row: np.ndarray) -> tuple[str, str]:
    """(tar path, sample key) of a padded source_info row "<tar>:<offset>:<member name>"."""
    path, _, name = row.tobytes().rstrip(b"\0").decode("utf-8", "replace").rsplit(":", 2)
    return path, Path(name).name.split(".", 1)[0]


class _Keys(Sequence):
    """Sample keys of one batch, decoded from a copy of DALI's padded source_info on first read."""

    def __init__(self, info: np.ndarray, valid: np.ndarray):
        self._info, self._valid = info, valid

    @cached_property
    def _keys(self) -> list[str]:
        return [_source(row)[1] if ok else "" for row, ok in zip(self._info, self._valid)]

    def __getitem__(self, i):
        return self._keys[i]

    def __len__(self) -> int:
        return len(self._valid)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(self._keys)


class DaliSource(BatchSource):
    backend = "dali"

    def __init__(self, cfg: Any, split: str, **kw):
        super().__init__(cfg, split, **kw)
        if self.train and (self.ids is not None or not self.drop_last):
            # DALI's readers split whole shards between ranks in fixed-size batches: neither a
            # subset of clips nor a smaller last batch can be asked of them.
            what = (f"data.devices={list(cfg.data.devices)}" if self.ids is not None
                    else "train.drop_last=false")
            raise DataError(f"{what} cannot stream from DALI: use the feature cache "
                            f"(data.cache=device), the waveform cache (data.cache=waveform) or "
                            f"the torch backend (data.backend=torch)")
        self.gpu = self.device.type == "cuda"
        if self.gpu and not torch.cuda.is_available():
            raise DataError(f"device {self.device} requested but CUDA is not available")
        self.device_id = (self.device.index if self.device.index is not None
                          else torch.cuda.current_device()) if self.gpu else None
        self._copy_stream = torch.cuda.Stream(self.device) if self.gpu else None
        tail = torch_tail(cfg.features)
        self.tail = tail.to(self.device) if tail is not None else None
        self.threads = self.num_threads
        self.prefetch = int(cfg.data.prefetch)
        self.buffer = int(cfg.data.shuffle_buffer)
        self.paths = [str(s.path) for s in self.index.shards]
        self.index_paths = [str(s.index_path) for s in self.index.shards]
        self._pipes: list[Pipeline] = []
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dali-build")
        self._next: tuple[int, Future] | None = None  # (epoch, its pipeline being built)
        # Reading through the index bypasses tar headers, so DALI would not notice a corrupt one;
        # check them (and the WAV magic) once for every sample this source can reach.
        reach = range(self.num_samples) if self.train else range(*shard_range(
            self.num_samples, self.rank, self.world_size))
        problem = diagnose(self.index, reach)
        if problem:
            raise DataError(problem)
        # Per-member digests: the raw audio becomes a pipeline output, checked in _to_torch.
        self.verify = bool(cfg.data.verify) and self.index.has_digests
        # With a GPU, hash in a pool while the features are copied (and spread big batches over
        # cores); on a CPU-only pipeline inline: measured cheaper there (BENCHMARKS.md).
        self._hash_workers = max(1, min(4, self.threads))
        self._hasher = (ThreadPoolExecutor(max_workers=self._hash_workers, thread_name_prefix="dali-verify")
                        if self.verify and self.gpu else None)
        self._ids = {(str(self.index.shards[s.shard].path), s.key): i
                     for i, s in enumerate(self.index.samples)} if self.verify else {}

    # -- pipeline ----------------------------------------------------------------------------

    def shard_id(self, epoch: int) -> int:
        return (self.rank + epoch) % self.world_size if self.train else self.rank

    def build_pipeline(self, epoch: int) -> Pipeline:
        """The epoch's pipeline, built and already filling its prefetch queue (``schedule_run``):
        prebuilt in the background for the next epoch, the reader's shuffle-buffer fill and the
        first batches happen while the current epoch trains, not as a stall at its boundary."""
        shard_id = self.shard_id(epoch)
        seed = derive_seed(self.seed, epoch, shard_id, 0xDA11)
        # exec_dynamic=False: the classic pipelined executor measured ~1.3x faster on this
        # CPU-bound graph than 2.x's default dynamic one (BENCHMARKS.md).
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.threads,
                        device_id=self.device_id, seed=seed, prefetch_queue_depth=self._depth,
                        exec_dynamic=False)
        with pipe:
            wav, label = fn.readers.webdataset(
                paths=self.paths, index_paths=self.index_paths,
                ext=[self.index.audio_ext, self.index.label_ext],
                dtypes=[types.UINT8, types.INT32], missing_component_behavior="error",
                shard_id=shard_id, num_shards=self.world_size, pad_last_batch=True,
                random_shuffle=self.train, initial_fill=self.buffer, seed=seed, name="reader",
            )
            # Padded to one length so a batch copies out as one array (decoded lazily: _Keys).
            info = fn.pad(fn.get_property(wav, key="source_info"), fill_value=0)
            # With data.verify the reader's raw audio (CPU) is a 4th output, hashed in _to_torch.
            pipe.set_outputs(logmel_graph(wav, self.cfg.features, self.gpu), label, info,
                             *([wav] if self.verify else []))
        try:
            pipe.build()
            pipe.schedule_run()  # the first call schedules prefetch_queue_depth iterations
        except Exception as e:  # noqa: BLE001 - any DALI failure becomes a DataError naming data
            _shutdown(pipe)
            raise self._data_error(e, shard_id, "building the pipeline") from None
        return pipe

    @property
    def _depth(self) -> int:
        """The prefetch queue: never deeper than the epoch, whose iterations are all it runs."""
        return max(1, min(self.prefetch, self.steps_per_epoch))

    def _pipeline(self, epoch: int) -> Pipeline:
        """The epoch's pipeline: the one prebuilt in the background if it is this epoch's."""
        ahead, self._next = self._next, None
        if ahead is not None:
            if ahead[0] == epoch:
                return ahead[1].result()
            _discard(ahead[1])
        return self.build_pipeline(epoch)

    def _data_error(self, e: BaseException, shard_id: int, doing: str) -> DataError:
        lo, hi = shard_range(self.num_samples, shard_id, self.world_size)
        problem = diagnose(self.index, range(lo, hi), deep=True) or diagnose(self.index, deep=True)
        if problem:
            return DataError(f"{problem} [DALI failed {doing}: {_first_line(e)}]")
        shards = sorted({self.index.shards[s.shard].path.name for s in self.index.samples[lo:hi]})
        return DataError(
            f"DALI failed {doing} on split '{self.split}' (shards {', '.join(shards)} in "
            f"{self.index.dir}) and no bad sample was found in them: {_first_line(e)}"
        )

    # -- batches -----------------------------------------------------------------------------

    def _sample_id(self, row: np.ndarray) -> int:
        """The index position of the sample a padded source_info row ("<tar>:<offset>:<member>")
        names."""
        path, key = _source(row)
        i = self._ids.get((path, key))
        if i is None:
            raise DataError(f"DALI read sample '{key}' of {path}, which the index of split "
                            f"'{self.split}' in {self.index.dir} does not list: stale index; repack")
        return i

    def _verify_rows(self, rows: list[tuple[np.ndarray, np.ndarray, bytes]]) -> None:
        for info_row, audio, label in rows:
            i = self._sample_id(info_row)
            check_member(self.index, i, self.index.audio_ext, audio)
            check_member(self.index, i, self.index.label_ext, label)

    def _verify(self, raw, labels32: np.ndarray, info: np.ndarray, valid: np.ndarray) -> list[Future]:
        """Check the batch's valid rows against their digests: the audio is a view of DALI's buffer
        (no copy), the label its 4 bytes as read. Inline without a pool; else started in the pool
        (xxhash releases the GIL): wait with :func:`_checked` before DALI's buffers may be reused."""
        rows = [(info[j], np.asarray(raw[j]), labels32[j:j + 1].astype("<i4").tobytes())
                for j in np.flatnonzero(valid)]
        if self._hasher is None:
            self._verify_rows(rows)
            return []
        n = self._hash_workers
        return [self._hasher.submit(self._verify_rows, rows[k::n]) for k in range(n) if rows[k::n]]

    def _to_torch(self, feats, labels, info, *rest) -> Batch:
        """One Batch from the pipeline's outputs (+ the raw audio with data.verify), the row its
        first sample has in the rank's share and the share's size; checked before it is returned."""
        *raw, first_row, count = rest
        shape = (self.batch_size, *graph_shape(self.cfg.features))
        valid = np.arange(first_row, first_row + self.batch_size) < count
        labels32 = np.asarray(labels.as_tensor()).reshape(-1)
        info = np.array(info.as_array())
        checks = self._verify(raw[0], labels32, info, valid) if raw else []
        try:  # the copy overlaps the hashing
            if self.gpu:
                # Copy on a side stream and wait for it alone: DALI may reuse this output buffer
                # once we call run() again, and syncing the training stream would stall the step.
                # The buffer is allocated on that stream too, so the caching allocator cannot hand
                # us a block that kernels queued on the training stream still use.
                with torch.cuda.stream(self._copy_stream):
                    out = torch.empty(shape, dtype=torch.float32, device=self.device)
                feed_ndarray(feats.as_tensor(), out, cuda_stream=self._copy_stream)
                self._copy_stream.synchronize()
                out.record_stream(torch.cuda.current_stream(self.device))
            else:
                out = torch.empty(shape, dtype=torch.float32, device=self.device)
                feed_ndarray(feats.as_tensor(), out)
        finally:
            _checked(checks)  # nothing unchecked leaves here; DALI's buffers are free again after
        if self.tail is not None:
            with torch.no_grad():
                out = self.tail.from_spectrogram(out[:, 0])
        lab = labels32.astype(np.int64)
        lab[~valid] = -1
        return Batch(features=out, labels=self._to_device(lab), keys=_Keys(info, valid),
                     valid=self._to_device(valid))

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        """A small host array on the training device. On a GPU through pinned memory: a copy
        from pageable memory with non_blocking is staged and waited for; from pinned memory it is
        only queued (the pinned allocator keeps the block until the copy has run)."""
        t = torch.from_numpy(a)
        return t.pin_memory().to(self.device, non_blocking=True) if self.gpu else t

    def _epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        if start_step >= self.steps_per_epoch:
            return
        shard_id = self.shard_id(epoch)
        lo, hi = shard_range(self.num_samples, shard_id, self.world_size)
        # Training never reaches the padding: a share holds >= steps * batch samples.
        count = self.steps_per_epoch * self.batch_size if self.train else hi - lo
        pipe = self._pipeline(epoch)
        self._pipes.append(pipe)
        if self.train:  # the next epoch's pipeline builds while this one runs
            self._next = (epoch + 1, self._builder.submit(self.build_pipeline, epoch + 1))
        try:
            for step in range(self.steps_per_epoch):
                out = self._run(pipe, shard_id, step, epoch)
                if step >= start_step:  # earlier steps are replayed to reach start_step
                    yield self._to_torch(*out, step * self.batch_size, count)
        finally:
            if pipe in self._pipes:
                self._pipes.remove(pipe)
            _shutdown(pipe)

    def _run(self, pipe: Pipeline, shard_id: int, step: int, epoch: int):
        # The build scheduled iterations 0 .. depth-1; each later step schedules the one `depth`
        # ahead while it is still part of the epoch: steps_per_epoch iterations in all, not one
        # more that nobody reads (a b256 epoch of 10 steps would do 10 % extra work, and the
        # pipeline's shutdown would wait for it).
        try:
            if step > 0 and step + self._depth <= self.steps_per_epoch:
                pipe.schedule_run()
            return pipe.outputs()
        except Exception as e:  # noqa: BLE001 - DALI raises plain RuntimeErrors
            raise self._data_error(e, shard_id, f"reading step {step} of epoch {epoch}") from None

    def close(self) -> None:
        """Stop the DALI threads of any epoch still open (e.g. one abandoned at max_iters)."""
        while self._pipes:
            _shutdown(self._pipes.pop())
        if self._next is not None:
            _discard(self._next[1])
            self._next = None
        self._builder.shutdown(wait=True)
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)


def _checked(futures: list[Future]) -> None:
    """Wait for every check (they view DALI's buffers), then raise the first failure."""
    wait(futures)
    for f in futures:
        f.result()


def _discard(future: Future) -> None:
    try:
        _shutdown(future.result())
    except Exception:  # noqa: BLE001 - a failed prebuild is rebuilt (and reported) when needed
        pass


def _shutdown(pipe: Pipeline) -> None:
    # Frees the pipeline's worker threads now instead of whenever the generator is collected.
    shutdown = getattr(pipe, "_shutdown", None)
    if shutdown is not None:
        shutdown()


def logmel_for_file(path: str | Path, cfg_features: Any) -> np.ndarray:
    """[1, n_mels, frames] for one audio file through the same DALI graph (CPU), finished by
    :func:`torch_tail` where DALI stops at the spectrogram."""
    data = np.fromfile(path, dtype=np.uint8)
    pipe = Pipeline(batch_size=1, num_threads=1, device_id=None, seed=0)
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        pipe.set_outputs(logmel_graph(encoded, cfg_features, gpu=False))
    pipe.build()
    pipe.feed_input("encoded", [data])
    try:
        (out,) = pipe.run()
    except Exception as e:  # noqa: BLE001 - DALI raises plain RuntimeErrors
        raise ValueError(f"DALI cannot decode {path}: {_first_line(e)}") from None
    result = np.array(out[0], dtype=np.float32)
    tail = torch_tail(cfg_features)
    if tail is not None:
        with torch.no_grad():
            result = tail.from_spectrogram(torch.from_numpy(result))[0].numpy()
    return result
