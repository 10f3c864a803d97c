"""DALI backend (the only module that imports NVIDIA DALI).

readers.webdataset (tars + their index files from the manifest; shard_id/num_shards split the
samples into contiguous ranges, pad_last_batch) -> decoders.audio (CPU; FLOAT, downmix, resample
to the feature rate) -> fixed length -> spectrogram -> mel_filter_bank -> to_decibels, the last
three on the GPU when the training device is CUDA and the whole pipeline CPU-only
(``device_id=None``) otherwise. Every setting that differs from torchaudio/librosa defaults is
pinned (see asc_dist.features), so both backends agree to ~1e-4 dB.

Epochs: one pipeline per epoch, seeded from (seed, epoch, shard), with the shard a rank reads
rotated by the epoch (``shard_id = (rank + epoch) % world``): the rank's epoch is then a pure
function of (seed, epoch, rank), as resuming needs. Training takes exactly ``steps_per_epoch``
batches of the rank's range (shuffled within ``data.shuffle_buffer``); evaluation reads the range
in order and marks rows past its end (DALI's repeated padding) ``valid=False``. A pipeline build
costs milliseconds (measured in BENCHMARKS.md), against seconds per epoch.

Keys come from each sample's ``source_info`` ("<tar>:<offset>:<member name>"). DALI's own errors
name no sample, so a failing build or run is followed by a scan of the rank's samples
(:func:`asc_dist.data.manifest.diagnose`) and re-raised as DataError naming shard and key.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from asc_dist.data import Batch, BatchSource
from asc_dist.data.manifest import DataError, diagnose
from asc_dist.data.sharding import derive_seed, shard_range
from asc_dist.features import clip_samples, hann_window


def logmel_graph(encoded, cfg_features: Any, gpu: bool):
    """Encoded audio bytes (a DataNode) -> [1, n_mels, frames] float dB, as LogMel computes it."""
    f = cfg_features
    audio, _ = fn.decoders.audio(encoded, dtype=types.FLOAT, downmix=True,
                                 sample_rate=float(f.sample_rate))
    # Pad/crop inside the pipeline: a truncated WAV decodes (silently) short.
    audio = fn.slice(audio, start=[0], shape=[clip_samples(f)], axes=[0],
                     out_of_bounds_policy="pad", fill_values=0.0)
    if gpu:
        audio = audio.gpu()
    # Time-major ("tf") spectrogram + mel measured ~20% faster on CPU than the default "ft";
    # one small transpose at the end restores [n_mels, frames].
    spec = fn.spectrogram(audio, nfft=int(f.n_fft), window_length=int(f.win_length),
                          window_step=int(f.hop_length), power=2, center_windows=True,
                          reflect_padding=True, layout="tf",
                          # DALI's built-in Hann differs from torch's by ~0.02 dB
                          window_fn=hann_window(int(f.win_length)).tolist())
    mel = fn.mel_filter_bank(spec, sample_rate=float(f.sample_rate),  # default would be 44.1 kHz
                             nfilter=int(f.n_mels), freq_low=float(f.f_min), freq_high=float(f.f_max),
                             mel_formula="slaney", normalize=True)
    # reference=1.0: without it DALI scales by each clip's own maximum.
    db = fn.to_decibels(mel, multiplier=10.0, reference=1.0, cutoff_db=float(f.floor_db))
    db = fn.slice(db, start=[0], shape=[int(f.frames)], axes=[0], out_of_bounds_policy="pad",
                  fill_values=float(f.floor_db))
    db = fn.transpose(db, perm=[1, 0])
    return fn.expand_dims(db, axes=[0])


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


class DaliSource(BatchSource):
    backend = "dali"

    def __init__(self, cfg: Any, split: str, **kw):
        super().__init__(cfg, split, **kw)
        self.gpu = self.device.type == "cuda"
        if self.gpu and not torch.cuda.is_available():
            raise DataError(f"device {self.device} requested but CUDA is not available")
        self.device_id = (self.device.index if self.device.index is not None
                          else torch.cuda.current_device()) if self.gpu else None
        self._copy_stream = torch.cuda.Stream(self.device) if self.gpu else None
        self.threads = int(cfg.data.num_threads)
        self.prefetch = max(1, int(getattr(cfg.data, "prefetch", 2)))
        self.buffer = max(1, int(getattr(cfg.data, "shuffle_buffer", 256)))
        self.paths = [str(s.path) for s in self.index.shards]
        self.index_paths = [str(s.index_path) for s in self.index.shards]
        self._pipes: list[Pipeline] = []
        self.last_resume: str | None = None  # how the last epoch(start_step>0) got there
        # Reading through the index bypasses tar headers, so DALI would not notice a corrupt one;
        # check them (and the WAV magic) once for every sample this source can reach.
        reach = range(self.num_samples) if self.train else range(*shard_range(
            self.num_samples, self.rank, self.world_size))
        problem = diagnose(self.index, reach)
        if problem:
            raise DataError(problem)

    # -- pipeline ----------------------------------------------------------------------------

    def shard_id(self, epoch: int) -> int:
        return (self.rank + epoch) % self.world_size if self.train else self.rank

    def build_pipeline(self, epoch: int, *, decode: bool = True, checkpointing: bool = False,
                       checkpoint: bytes | None = None) -> Pipeline:
        """The epoch's pipeline; ``decode=False`` keeps only the reader (for fast-forwarding)."""
        shard_id = self.shard_id(epoch)
        seed = derive_seed(self.seed, epoch, shard_id, 0xDA11)
        # exec_dynamic=False: the classic pipelined executor measured ~1.3x faster on this
        # CPU-bound graph than 2.x's default dynamic one (BENCHMARKS.md).
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.threads,
                        device_id=self.device_id if decode else None, seed=seed,
                        prefetch_queue_depth=self.prefetch, exec_dynamic=False,
                        enable_checkpointing=checkpointing, checkpoint=checkpoint)
        with pipe:
            wav, label = fn.readers.webdataset(
                paths=self.paths, index_paths=self.index_paths,
                ext=[self.index.audio_ext, self.index.label_ext],
                dtypes=[types.UINT8, types.INT32], missing_component_behavior="error",
                shard_id=shard_id, num_shards=self.world_size, pad_last_batch=True,
                random_shuffle=self.train, initial_fill=self.buffer, seed=seed, name="reader",
            )
            info = fn.get_property(wav, key="source_info")
            if decode:
                pipe.set_outputs(logmel_graph(wav, self.cfg.features, self.gpu), label, info)
            else:
                pipe.set_outputs(label, info)
        try:
            pipe.build()
        except Exception as e:  # noqa: BLE001 - any DALI failure becomes a DataError naming data
            raise self._data_error(e, shard_id, "building the pipeline") from None
        return pipe

    def _fast_forward(self, epoch: int, steps: int) -> tuple[Pipeline | None, list[str]]:
        """A decoding pipeline positioned after ``steps`` batches without decoding them.

        A reader-only pipeline (same reader arguments, so the same sample sequence) runs
        ``steps`` batches, its reader state is spliced into a fresh full pipeline's checkpoint
        and the full pipeline is built from it. Returns (pipeline, keys its next batch must
        have) or (None, []) when DALI's checkpoint format is not the one expected.
        """
        light = self.build_pipeline(epoch, decode=False, checkpointing=True)
        try:
            for step in range(steps + 1):
                out = self._run(light, self.shard_id(epoch), step, epoch)
                if step == steps - 1:
                    state = light.checkpoint()
            expect = _keys(out[1])
        finally:
            _shutdown(light)
        try:
            fresh = self.build_pipeline(epoch, checkpointing=True)
            template = fresh.checkpoint()
            _shutdown(fresh)
            spliced = _splice_checkpoint(template, state)
        except Exception:  # noqa: BLE001 - any surprise here just means: replay instead
            return None, []
        return self.build_pipeline(epoch, checkpointing=True, checkpoint=spliced), expect

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

    def _to_torch(self, feats, labels, info, first_row: int, count: int) -> Batch:
        shape = (self.batch_size, 1, int(self.cfg.features.n_mels), int(self.cfg.features.frames))
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
        lab = np.asarray(labels.as_tensor()).reshape(-1).astype(np.int64)
        keys = _keys(info)
        valid = np.arange(first_row, first_row + self.batch_size) < count
        lab[~valid] = -1
        keys = [k if v else "" for k, v in zip(keys, valid)]
        return Batch(features=out, labels=torch.from_numpy(lab).to(self.device, non_blocking=True),
                     keys=keys, valid=torch.from_numpy(valid).to(self.device, non_blocking=True))

    def _epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        if start_step >= self.steps_per_epoch:
            return
        shard_id = self.shard_id(epoch)
        lo, hi = shard_range(self.num_samples, shard_id, self.world_size)
        # Training never reaches the padding: a share holds >= steps * batch samples.
        count = self.steps_per_epoch * self.batch_size if self.train else hi - lo
        pipe, replay, first = None, start_step, None
        if start_step:
            pipe, expect = self._fast_forward(epoch, start_step)
            if pipe is not None:
                try:
                    first = self._run(pipe, shard_id, start_step, epoch)
                except BaseException:
                    _shutdown(pipe)
                    raise
                if _keys(first[2]) == expect:
                    replay, self.last_resume = 0, "fast-forward"
                else:  # not where it should be: fall back to replaying (decoding) the skipped steps
                    _shutdown(pipe)
                    pipe, first = None, None
        if pipe is None:
            pipe = self.build_pipeline(epoch)
            self.last_resume = "replay" if start_step else None
        self._pipes.append(pipe)
        try:
            for step in range(start_step - replay, self.steps_per_epoch):
                out = first if first is not None else self._run(pipe, shard_id, step, epoch)
                first = None
                if step < start_step:
                    continue
                yield self._to_torch(*out, step * self.batch_size, count)
        finally:
            if pipe in self._pipes:
                self._pipes.remove(pipe)
            _shutdown(pipe)

    def _run(self, pipe: Pipeline, shard_id: int, step: int, epoch: int):
        try:
            return pipe.run()
        except Exception as e:  # noqa: BLE001 - DALI raises plain RuntimeErrors
            raise self._data_error(e, shard_id, f"reading step {step} of epoch {epoch}") from None

    def close(self) -> None:
        """Stop the DALI threads of any epoch still open (e.g. one abandoned at max_iters)."""
        while self._pipes:
            _shutdown(self._pipes.pop())


def _keys(info) -> list[str]:
    """Sample keys from source_info strings '<tar>:<offset>:<member name>'."""
    names = (np.asarray(info[i]).tobytes().decode("utf-8", "replace").rsplit(":", 1)[-1]
             for i in range(len(info)))
    return [Path(n).name.split(".", 1)[0] for n in names]


# DALI checkpoints are protobuf: field 1 repeated {1: operator name, 2: state}, field 2 the
# external (iterator) context. Only length-delimited fields occur, so a tiny codec suffices.
def _pb_fields(buf: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(buf):
        tag = buf[i]
        i += 1
        if tag & 7 != 2:
            raise ValueError(f"unexpected protobuf wire type {tag & 7}")
        n = shift = 0
        while True:
            b = buf[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        out.append((tag >> 3, bytes(buf[i:i + n])))
        i += n
    return out


def _pb_encode(fields: list[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for num, data in fields:
        out.append((num << 3) | 2)
        n = len(data)
        while n >= 0x80:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
        out += data
    return bytes(out)


def _splice_checkpoint(template: bytes, reader_state: bytes) -> bytes:
    """``template`` (a full pipeline's checkpoint) with the reader operator's state and the
    iteration context taken from ``reader_state`` (a reader-only pipeline's checkpoint)."""
    template, reader_state = bytes(template), bytes(reader_state)
    light = _pb_fields(reader_state)
    ops = {dict(_pb_fields(d)).get(1): d for f, d in light if f == 1}
    ctx = [d for f, d in light if f == 2]
    out, replaced = [], False
    for f, d in _pb_fields(template):
        if f == 1 and dict(_pb_fields(d)).get(1) == b"reader":
            d, replaced = ops[b"reader"], True
        elif f == 2 and ctx:
            d = ctx[0]
        out.append((f, d))
    if not replaced:
        raise ValueError("no reader state in the checkpoint")
    return _pb_encode(out)


def _shutdown(pipe: Pipeline) -> None:
    # Frees the pipeline's worker threads now instead of whenever the generator is collected.
    shutdown = getattr(pipe, "_shutdown", None)
    if shutdown is not None:
        shutdown()


def logmel_for_file(path: str | Path, cfg_features: Any) -> np.ndarray:
    """[1, n_mels, frames] for one audio file through the same DALI graph (CPU)."""
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
    return np.array(out[0], dtype=np.float32)
