"""The trainer measured from inside its process (asc_dist.bench.probe), the row made from it, and
what the results then say: in this process, on the CPU (the CUDA figures null, said so)."""

from __future__ import annotations

import json

import pytest
import torch

import asc_dist.train as tr
from asc_dist.bench import gpu_results, probe, throughput
from asc_dist.bench.plan import Variant
from asc_dist.tracking import read_metrics


@pytest.fixture
def backends_restored():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = saved


def test_the_probe_records_the_trainer_phases_and_settings_from_inside(
        packed_shards, tmp_path, backends_restored):
    out, run_dir = tmp_path / "probe.jsonl", tmp_path / "run"
    original = (tr.build, tr.train_step, tr.evaluate, tr.Checkpointer, tr.write_report)
    rc = probe.main([str(out), "--warmup", "2", "--settings",
                     json.dumps({"cudnn_benchmark": True, "tf32": True}), "--",
                     "conf/smoke.yaml", f"data.shards={packed_shards}", f"run_dir={run_dir}",
                     "train.max_iters=5", "train.log_every=1", "train.eval_every=1000",
                     "train.ckpt_every=1000", "data.backend=torch", "data.cache=none",
                     "data.num_threads=1", "data.prefetch=2", "train.precision=fp32",
                     "wandb.mode=disabled"])
    assert rc == 0
    assert (tr.build, tr.train_step, tr.evaluate, tr.Checkpointer, tr.write_report) == original
    m = probe.read(out)
    assert m["rc"] == 0 and m["asc_imports_s"] >= 0 and m["build_s"] > 0
    assert 0 < m["first_step_s"] < m["time_to_first_step_s"]
    # the settings the row names, as the trainer's process ran with them
    s = m["settings"]
    assert s["cudnn_benchmark"] is True and s["tf32_matmul"] is True
    assert (s["backend"], s["workers"], s["prefetch"], s["compile"]) == ("torch", 1, 2, False)
    assert s["pin_memory"] is False  # a CPU run pins nothing
    assert [x["k"] for x in m["steps"]] == [3, 4, 5]  # the timed steps, after the warm-up
    assert all(x["host_ms"] > 0 and x["device_ms"] is None for x in m["steps"])
    assert m["peak_host_gb"] > 0 and m["peak_device_gb"] is None and m["peak_pinned_gb"] is None
    assert m["eval_clips"] == 20 and m["eval_s"] > 0 and m["checkpoint_s"] > 0
    assert m["report_s"] > 0

    v = Variant("trainer torch, streamed", 4, "trainer", "torch", "none", 20, 5, 2, 3, workers=1,
                prefetch=2)
    ctx = type("Ctx", (), {"device": torch.device("cpu"), "clip_samples": 16000})()
    requested = {**throughput.ROW_SETTINGS, "precision": "fp32", "compile": False,
                 "workers": 1, "prefetch": 2}
    row = throughput.summarize(v, read_metrics(run_dir / "metrics.jsonl"), m, requested, 1e6, ctx)
    assert row["windows"] == 3 and row["clips_per_s"] > 0 and row["settings_differ"] == []
    other = throughput.summarize(v, [], m, {**requested, "compile": True}, 1e6, ctx)
    assert other["settings_differ"] == ["compile"]  # a row never names what its run did not use
    assert row["step_ms_from"] == "wall clock" and row["gpu_idle_pct"] is None
    assert row["eval_clips_per_s"] > 0 and row["phases"]["checkpoint_s"] > 0

    results = {"device": "cpu", "quick": True, "machine": "m", "torch": torch.__version__,
               "steps": {"trainer-torch-streamed-b4": {"status": "ok", "rows": [row],
                                                       "seconds": 1.0, "budget_s": 9.0}}}
    user = gpu_results.gpu_user(results)
    assert set(gpu_results.LABELS) <= set(user)
    first = user["time_to_first_step"]["trainer-torch-streamed-b4"]
    assert first["imports_s"] > 0 and first["cuda_init_s"] is None
    assert user["gpu_idle"] == {"trainer-torch-streamed-b4": None} and user["compile"] is None
    costs = gpu_results.measured_costs(results)
    assert {"python_torch", "asc_imports", "autotune", "checkpoint", "report"} <= set(costs)
    md = gpu_results.summary(results)
    assert "- GPU idle between steps: GPU only (CUDA events): null on a CPU" in md
    assert "- train.compile on vs off (trainer, batch 256): GPU only" in md
    assert "trainer-torch-streamed-b4: eval_clips_per_s" in md
