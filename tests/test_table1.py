"""Table I: the four experiment rows trained for real (smoke size) by ``table1 run``, then tabulated
beside the paper's numbers; ``collect`` on incomplete or mismatched runs; the launch script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_evaluate import ROOT, ok, run

from asc_dist import table1

PAPER = {"DCASE 2018 baseline CNN": 0.625, "ResNet-50 + NLL": 0.725, "ResNet-50 + focal loss": 0.733,
         "ResNet-50 + focal loss + mixup": 0.747}


def table_rows(md: str) -> list[list[str]]:
    """Body rows of the first markdown table."""
    lines = [x for x in md.splitlines() if x.startswith("|")]
    return [[c.strip() for c in x.strip("|").split("|")] for x in lines[2:]]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, packed_shards) -> Path:
    """The real sweep at smoke size: 4 trainings (2 iterations each), then the table."""
    root = tmp_path_factory.mktemp("table1")
    p = ok(run([sys.executable, "-m", "asc_dist.table1", "run", "--shards", str(packed_shards),
                "--runs-root", str(root), "conf/smoke.yaml", "train.max_iters=2", "train.eval_every=2",
                "data.backend=torch"], timeout=400))
    assert "wrote" in p.stdout
    return root


def test_sweep_trains_four_rows_and_tabulates_them_beside_the_paper(sweep, packed_shards):
    md = (sweep / "table1.md").read_text()
    rows = table_rows(md)
    assert [r[0] for r in rows] == list(PAPER)
    assert [float(r[1]) for r in rows] == list(PAPER.values())
    data = json.loads((sweep / "table1.json").read_text())
    for row, name in zip(data, ["table1-baseline", "table1-nll", "table1-focal", "table1-focal-mixup"]):
        run_dir = sweep / name
        report = json.loads((run_dir / "eval" / "report.json").read_text())
        assert row["ours"] == report["classwise_accuracy"] and row["accuracy"] == report["accuracy"]
        assert row["run"]["run_dir"] == str(run_dir)
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["train"]["seed"] == 0 and cfg["data"]["shards"] == str(packed_shards)
        assert cfg["train"]["max_iters"] == 2
    by_row = {r[0]: r for r in rows}
    assert by_row["DCASE 2018 baseline CNN"][5] == "dcase_baseline"
    assert by_row["ResNet-50 + NLL"][6:8] == ["ce", "no"]
    assert by_row["ResNet-50 + focal loss"][6:8] == ["focal", "no"]
    assert by_row["ResNet-50 + focal loss + mixup"][6:8] == ["focal", "yes"]
    for r in rows:
        ours, delta, paper = float(r[2]), float(r[3]), float(r[1])
        assert delta == pytest.approx(ours - paper, abs=1e-3)
    assert "not the TUT 2018 fold 1 test split" in md  # 20 synthetic clips: a pipeline check
    assert "seed 0" in md and "differ in" not in md


def test_rerunning_the_sweep_skips_finished_runs(sweep, packed_shards):
    p = ok(run([sys.executable, "-m", "asc_dist.table1", "run", "--shards", str(packed_shards),
                "--runs-root", str(sweep), "--only", "baseline", "conf/smoke.yaml", "train.max_iters=2",
                "train.eval_every=2", "data.backend=torch"]))
    assert "already finished at step 2" in p.stdout


def test_collect_marks_missing_unfinished_and_mismatched_runs(sweep, tmp_path, capsys):
    unfinished = tmp_path / "table1-focal"
    shutil.copytree(sweep / "table1-focal", unfinished)
    (unfinished / "eval" / "report.json").unlink()
    other_seed = tmp_path / "table1-nll"
    shutil.copytree(sweep / "table1-nll", other_seed)
    cfg = yaml.safe_load((other_seed / "config.yaml").read_text())
    cfg["train"]["seed"] = 7
    (other_seed / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "t.md"
    rc = table1.main(["collect", "--runs", str(sweep / "table1-baseline"), str(other_seed), str(unfinished),
                      "--out", str(out)])
    assert rc == 1
    rows = {r[0]: r for r in table_rows(out.read_text())}
    assert len(rows) == 4
    assert rows["ResNet-50 + focal loss + mixup"][2] == "not run"
    assert "no " in rows["ResNet-50 + focal loss"][2] and "report.json" in rows["ResNet-50 + focal loss"][2]
    assert "differ in `train.seed`" in out.read_text()
    assert "incomplete rows" in capsys.readouterr().err
    # The W&B column: the run id stored in the newest checkpoint, a link for online runs.
    online = tmp_path / "runs" / "table1-baseline"
    shutil.copytree(sweep / "table1-baseline", online)
    cfg = yaml.safe_load((online / "config.yaml").read_text())
    cfg["wandb"].update(mode="online", entity="me", project="asc")
    (online / "config.yaml").write_text(yaml.safe_dump(cfg))
    latest = online / "checkpoints" / (online / "checkpoints" / "latest").read_text().strip()
    state = torch.load(latest, weights_only=True)
    torch.save({**state, "wandb_id": "abc123"}, latest)
    table1.main(["collect", "--runs", str(online), "--out", str(out)])
    row = table_rows(out.read_text())[0]
    assert row[-1] == "[abc123](https://wandb.ai/me/asc/runs/abc123)"
    # A folder of runs stands for its table1-* run dirs.
    assert table1.main(["collect", "--runs", str(sweep), "--out", str(tmp_path / "all.md")]) == 0


def test_dry_run_reduced_commands_share_data_and_seed(tmp_path, capsys):
    assert table1.main(["run", "--dry-run", "--reduced", "--nproc", "2", "--shards", "S", "--seed", "5",
                        "--runs-root", str(tmp_path), "conf/data/tut2018.yaml", "optim.lr=0.002"]) == 0
    cmds = [c.split() for c in capsys.readouterr().out.splitlines()]
    assert len(cmds) == 4
    for c, exp in zip(cmds, ["baseline", "nll", "focal", "focal_mixup"]):
        assert c[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]
        assert "train.seed=5" in c and "data.shards=S" in c and "model.pretrained=none" in c
        # YAMLs first, the row's experiment file after them, the user's overrides last
        exp_at = next(i for i, a in enumerate(c) if a.endswith(f"conf/experiment/{exp}.yaml"))
        assert c.index("conf/data/tut2018.yaml") < exp_at
        assert c[-1] == "optim.lr=0.002"
    with pytest.raises(SystemExit):
        table1.main(["run", "--only", "nope"])


def test_launch_script_help_and_bad_subcommand():
    p = subprocess.run(["bash", "launch/table1.sh", "--help"], cwd=ROOT, capture_output=True, text=True,
                       check=False)
    assert p.returncode == 0 and "conf/experiment" in p.stdout and "--synthetic" in p.stdout
    p = run([sys.executable, "-m", "asc_dist.table1", "bogus"])
    assert p.returncode == 2 and "usage" in p.stderr


def test_exported_baseline_cnn_round_trips(sweep, tmp_path):
    # The Table I baseline is a different architecture: it must export as well as the ResNets.
    from asc_dist import export

    assert export.main([str(sweep / "table1-baseline"), "--out", str(tmp_path / "m")]) == 0
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["model"] == "dcase_baseline" and set(meta["files"]) >= {"torchscript", "export"}
