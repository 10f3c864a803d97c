"""Table I as an experiment: rows x seeds trained for real (smoke size) by ``table1 run``, the
statistics in table1.md/.json/.png checked against the runs' own reports and predictions,
resuming a sweep, ``collect`` on incomplete or mismatched runs, ``plan``, the launch script."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from test_evaluate import ROOT

from asc_dist import config, table1
from asc_dist.table1.stats import mean_ci, paired_bootstrap
from asc_dist.validate import read_predictions

# features.frames=16: the baseline's own front end (hop 960) gives 17 frames for 1 s at 16 kHz
SMOKE = ["conf/smoke.yaml", str(Path(__file__).parent / "smoke_resnet.yaml"), "train.max_iters=2",
         "train.eval_every=2", "data.backend=torch", "train.device=cpu", "features.frames=16"]


def sweep_args(shards: Path, root: Path, *extra: str) -> list[str]:
    return ["run", "--shards", str(shards), "--runs-root", str(root), *extra, *SMOKE]


@pytest.fixture(scope="session")
def sweep(tmp_path_factory, packed_shards) -> Path:
    """Two rows x two seeds at smoke size, two trainings at a time (each a real torchrun), then
    the table."""
    root = tmp_path_factory.mktemp("table1")
    assert table1.main(sweep_args(packed_shards, root, "--only", "baseline,nll", "--seeds", "0,1",
                                  "--parallel", "2")) == 0
    assert (root / "table1.md").is_file() and (root / "logs" / "table1-nll-seed1.log").is_file()
    return root


@pytest.mark.slow
def test_rows_carry_mean_std_ci_over_seeds_equal_to_the_runs_reports(sweep):
    summary = json.loads((sweep / "table1.json").read_text())
    rows = {r["key"]: r for r in summary["rows"]}
    assert [r["row"] for r in summary["rows"]] == [r.label for r in table1.ROWS]
    for key in ("baseline", "nll"):
        row = rows[key]
        assert [s["seed"] for s in row["seeds"]] == [0, 1]
        own = [json.loads((Path(s["run_dir"]) / "eval" / "report.json").read_text())["classwise_accuracy"]
               for s in row["seeds"]]
        assert [s["classwise"] for s in row["seeds"]] == own
        assert row["mean"] == pytest.approx(statistics.mean(own))
        assert row["std"] == pytest.approx(statistics.stdev(own))
        assert row["ci95"] == pytest.approx(mean_ci(own)["ci95"])
        lo, hi = row["ci95"]
        assert lo <= row["mean"] <= hi and row["paper_in_ci"] == (lo <= row["paper"] <= hi)
        cfg = yaml.safe_load((Path(row["seeds"][1]["run_dir"]) / "config.yaml").read_text())
        assert cfg["train"]["seed"] == 1 and cfg["name"] == f"table1-{key}-seed1"
    assert rows["baseline"]["model"] == "dcase_baseline" and rows["nll"]["loss"] == "ce"
    assert rows["focal"]["seeds"] == [] and rows["focal"]["mean"] is None
    md = (sweep / "table1.md").read_text()
    assert "| ResNet-50 + focal loss | 0.733 | not run |" in md
    assert "not the TUT 2018 fold 1 test split" in md  # 20 synthetic clips: a pipeline check
    assert "GAN-based augmentation is not reproduced" in md  # the SE-ResNet row says what differs
    png = (sweep / "table1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_paired_comparison_from_the_runs_predictions(sweep):
    summary = json.loads((sweep / "table1.json").read_text())
    (step,) = [c for c in summary["comparisons"] if c["to"] == "ResNet-50 + NLL"]
    assert step["from"] == "DCASE 2018 baseline CNN" and step["n_seeds"] == 2 and step["n_clips"] == 20
    lo, hi = step["ci95"]
    assert lo <= step["mean_diff"] <= hi and "points" in step["verdict"]
    # the mean difference is the mean over seeds of the runs' own class-wise accuracies
    rows = {r["key"]: r for r in summary["rows"]}
    diffs = [b["classwise"] - a["classwise"] for a, b in zip(rows["baseline"]["seeds"], rows["nll"]["seeds"])]
    assert step["mean_diff"] == pytest.approx(statistics.mean(diffs))
    later = [c for c in summary["comparisons"] if c["from"] == "ResNet-50 + NLL"]
    assert later[0]["mean_diff"] is None and "not available" in later[0]["verdict"]

    # a row against itself: the bootstrap interval contains 0 (it is exactly [0, 0])
    runs = {}
    for s in rows["nll"]["seeds"]:
        classes, table = read_predictions(Path(s["run_dir"]) / "eval" / "predictions.tsv")
        keys = sorted(table)
        runs[s["seed"]] = ([table[k][0] for k in keys], [int(table[k][1].argmax()) for k in keys])
    same = paired_bootstrap(runs, runs, len(classes))
    assert same["ci95"][0] <= 0 <= same["ci95"][1] and same["mean_diff"] == 0


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one(sweep, packed_shards, tmp_path,
                                                                 capfd):
    from asc_dist import train

    root = tmp_path / "runs"
    shutil.copytree(sweep, root)
    finished = root / "table1-nll-seed0" / "checkpoints" / "step_2.pt"
    before = finished.stat().st_mtime_ns
    # seed 2 of the NLL row stopped after one step (its last checkpoint is step 1)
    assert table1.main(["plan", "--only", "nll", "--seeds", "2", "--runs-root", str(root),
                        "--shards", str(packed_shards), *SMOKE]) == 0
    (interrupted,) = [line.split("\t") for line in capfd.readouterr().out.splitlines()]
    assert train.main([*interrupted[2:], "train.max_iters=1"]) == 0
    capfd.readouterr()
    assert table1.main(sweep_args(packed_shards, root, "--only", "nll", "--seeds", "0,1,2")) == 0
    err = capfd.readouterr().err  # this process's log and the training's (a child process)
    assert "skipping 2 finished run(s): table1-nll-seed0, table1-nll-seed1" in err
    assert "resumed from" in err and "at step 1" in err
    assert finished.stat().st_mtime_ns == before
    summary = json.loads((root / "table1.json").read_text())
    nll = next(r for r in summary["rows"] if r["key"] == "nll")
    assert [s["seed"] for s in nll["seeds"]] == [0, 1, 2] and all(s["problem"] is None for s in nll["seeds"])


@pytest.mark.slow
def test_collect_marks_unfinished_and_mismatched_runs(sweep, tmp_path, capsys):
    unfinished = tmp_path / "table1-nll-seed0"
    shutil.copytree(sweep / "table1-nll-seed0", unfinished)
    (unfinished / "eval" / "report.json").unlink()
    other_data = tmp_path / "table1-baseline-seed0"
    shutil.copytree(sweep / "table1-baseline-seed0", other_data)
    cfg = yaml.safe_load((other_data / "config.yaml").read_text())
    cfg["data"]["shards"] = "/elsewhere"
    (other_data / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "t.md"
    assert table1.main(["collect", "--runs", str(other_data), str(unfinished),
                        str(sweep / "table1-nll-seed1"), "--out", str(out)]) == 1
    md = out.read_text()
    assert "report.json (run not finished?)" in md and "differ in `data.shards`" in md
    assert "incomplete runs: ResNet-50 + NLL seed 0" in capsys.readouterr().err
    # The W&B column: the run id stored in the newest checkpoint, a link for online runs.
    online = tmp_path / "runs" / "table1-baseline-seed1"
    shutil.copytree(sweep / "table1-baseline-seed1", online)
    cfg = yaml.safe_load((online / "config.yaml").read_text())
    cfg["wandb"].update(mode="online", entity="me", project="asc")
    (online / "config.yaml").write_text(yaml.safe_dump(cfg))
    latest = online / "checkpoints" / (online / "checkpoints" / "latest").read_text().strip()
    state = torch.load(latest, weights_only=True)
    torch.save({**state, "wandb_id": "abc123"}, latest)
    table1.main(["collect", "--runs", str(tmp_path / "runs"), "--out", str(out)])
    assert "[abc123](https://wandb.ai/me/asc/runs/abc123)" in out.read_text()


def test_dry_run_reduced_commands_share_data_and_seeds(tmp_path, capsys):
    assert table1.main(["run", "--dry-run", "--reduced", "--nproc", "2", "--shards", "S", "--seeds", "5,6",
                        "--runs-root", str(tmp_path), "conf/data/tut2018.yaml", "optim.lr=0.002"]) == 0
    cmds = [c.split() for c in capsys.readouterr().out.splitlines()]
    assert len(cmds) == 2 * len(table1.ROWS)
    for i, c in enumerate(cmds):
        row, seed = table1.ROWS[i // 2], (5, 6)[i % 2]
        assert c[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]
        assert f"train.seed={seed}" in c and "data.shards=S" in c and "model.pretrained=none" in c
        assert f"name=table1-{row.key.replace('_', '-')}-seed{seed}" in c
        # YAMLs first, the row's experiment file after them, the user's overrides last
        exp_at = next(j for j, a in enumerate(c) if a.endswith(f"conf/experiment/{row.experiment}.yaml"))
        assert c.index("conf/data/tut2018.yaml") < exp_at and c[-1] == "optim.lr=0.002"
        batch = [a for a in c if a.startswith("train.global_batch=")][-1]
        assert batch == ("train.global_batch=16" if row.key == "baseline" else "train.global_batch=32")
    with pytest.raises(SystemExit):
        table1.main(["run", "--only", "nope"])
    with pytest.raises(SystemExit):
        table1.main(["run", "--seeds", "a,b"])


def test_faithful_comparison_rows():
    from asc_dist import config

    base = config.load(["conf/experiment/baseline.yaml"])
    f = base.features
    assert (f.n_mels, f.win_length, f.hop_length) == (40, 1920, 960)  # 40 ms windows, 50 % hop at 48 kHz
    assert f.win_length / f.sample_rate == 0.04 and f.hop_length * 2 == f.win_length
    assert (base.optim.name, base.optim.lr, base.optim.decay_factor) == ("adam", 1e-3, 1.0)
    assert base.train.global_batch == 16 and base.train.max_iters == 200 * (6122 // 16)
    se = config.load(["conf/experiment/seresnet.yaml"])
    assert se.model.name == "seresnet50" and se.loss.name == "ce" and not se.augment.mixup.enabled
    assert table1.row_of(config.to_dict(se)) == "seresnet" and table1.row_of(config.to_dict(base)) == "baseline"


def test_a_fold1_sweep_names_its_protocol_and_anchor():
    """Table I's values are leaderboard accuracies: a fold-1 sweep says so and names its anchor."""
    from asc_dist.table1.collect import notes

    (line,) = notes([{"report": {"count": 2518}}], {"rows": []})
    assert "fold 1 test split (2518 clips)" in line and "leaderboard" in line and "59.7 %" in line
    assert "as in the paper" not in line


def test_launch_script_help_and_bad_subcommand(cli):
    p = subprocess.run(["bash", "launch/table1.sh", "--help"], cwd=ROOT, capture_output=True, text=True,
                       check=False)
    assert p.returncode == 0 and "--seeds" in p.stdout and "--synthetic" in p.stdout
    p = cli(table1.main, ["bogus"])
    assert p.returncode == 2 and "usage" in p.stderr


@pytest.mark.slow
def test_exported_baseline_cnn_round_trips(sweep, tmp_path):
    # The Table I baseline is a different architecture: it must export as well as the ResNets.
    from asc_dist import export

    assert export.main([str(sweep / "table1-baseline-seed0"), "--out", str(tmp_path / "m")]) == 0
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["model"] == "dcase_baseline" and set(meta["files"]) >= {"torchscript", "export"}


def test_a_run_saved_before_mixup_moved_is_still_its_row(tmp_path):
    """Runs saved with the old top-level ``mixup`` and without the newer feature keys: read
    through today's schema, the row is right and the features compare equal to a new run's."""
    from asc_dist.table1.collect import read_run

    saved = config.to_dict(config.load(["loss.name=ce", "augment.mixup.enabled=false"]))
    saved["mixup"] = saved.pop("augment")["mixup"]
    for key in ("mel_scale", "mel_norm", "log", "log_eps"):
        del saved["features"][key]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(saved))
    rec = read_run(tmp_path / "old")
    assert rec["row"] == "nll" and rec["mixup"] is False
    assert rec["shared"]["features"] == config.to_dict(config.load([]))["features"]
