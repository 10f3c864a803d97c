import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from asc_dist import config
from asc_dist.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_paper():
    cfg = config.load()
    f = cfg.features
    assert (f.sample_rate, f.n_fft, f.win_length, f.hop_length, f.n_mels) == (48000, 2048, 2048, 1500, 64)
    assert (f.f_min, f.f_max, f.frames) == (50.0, 24000.0, 320)
    assert cfg.model.name == "resnet50" and cfg.model.pretrained == "imagenet"
    assert cfg.loss.name == "focal" and cfg.augment.mixup.enabled and cfg.augment.mixup.alpha == 0.3
    o = cfg.optim
    assert (o.name, o.lr, o.final_lr, o.decay_every, o.decay_factor) == ("adabound", 1e-3, 0.1, 200, 0.9)
    assert cfg.train.max_iters == 5000 and cfg.train.global_batch == 64


def test_yaml_files_then_overrides_merge_in_order(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("optim:\n  lr: 0.5\ntrain:\n  max_iters: 7\n")
    b = tmp_path / "b.yaml"
    b.write_text("optim:\n  lr: 0.25\n")
    cfg = config.load([str(a), str(b), "train.max_iters=9", "name=x"])
    assert cfg.optim.lr == 0.25 and cfg.train.max_iters == 9
    assert cfg.run_dir == "runs/x"  # interpolation resolved after overrides


@pytest.mark.parametrize("args, key", [
    (["optim.lrr=0.1"], "optim.lrr"),
    (["nonsense=1"], "nonsense"),
    (["optim.lr=fast"], "optim.lr"),
    (["train.max_iters=1.5"], "train.max_iters"),
    (["features.hop_length=4096"], "features.hop_length"),
    (["features.f_max=30000"], "features.f_max"),
    (["data.backend=tensorflow"], "data.backend"),
    (["train.global_batch=0"], "train.global_batch"),
    (["loss.alpha=[1,2]"], "loss.alpha"),
    (["features.frames=400"], "features.frames"),
])
def test_bad_values_name_the_key(args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(args)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: 50\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.depth"):
        config.load([str(bad)])


def test_global_batch_must_divide_world_size():
    config.load(["train.global_batch=64"], world_size=4)
    with pytest.raises(ConfigError, match="train.global_batch=63.*world size 2"):
        config.load(["train.global_batch=63"], world_size=2)


def test_dump_reload_round_trip(tmp_path):
    cfg = config.load(["optim.lr=0.002", "loss.alpha=[1,1,1,1,1,2,2,2,2,2]"])
    out = tmp_path / "resolved.yaml"
    out.write_text(config.to_yaml(cfg))
    again = config.load([str(out)])
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    assert config.from_dict(config.to_dict(cfg)) == cfg


def test_shipped_configs_all_load():
    # the distillation recipe takes its teachers from the command line, and says so without them
    needs = {"dcase2024_kd.yaml": ["distill.teachers=[runs/teacher]"]}
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        if path.name != "config.yaml":
            config.load([str(path), *needs.get(path.name, [])])
    with pytest.raises(ConfigError, match=r"distill.weight=0.98 needs teachers"):
        config.load([str(ROOT / "conf/experiment/dcase2024_kd.yaml")])


def test_old_mixup_keys_are_refused_naming_the_new_ones_and_old_saved_configs_load(tmp_path):
    with pytest.raises(ConfigError, match=r"mixup.alpha is now augment.mixup.alpha"):
        config.load(["mixup.alpha=0.2"])
    old = tmp_path / "old.yaml"
    old.write_text("mixup:\n  enabled: false\n")
    with pytest.raises(ConfigError, match=r"old.yaml: mixup.enabled is now augment.mixup.enabled"):
        config.load([str(old)])
    # a checkpoint's config saved before the move (from_dict and restore read those)
    saved = config.to_dict(config.load([]))
    saved["mixup"] = {**saved.pop("augment")["mixup"], "alpha": 0.7}
    assert config.from_dict(saved).augment.mixup.alpha == 0.7


def test_cli_prints_the_config_and_reports_errors_with_exit_code_2(cli):
    ok = cli(config.main, ["optim.lr=0.01"])
    assert ok.returncode == 0 and "lr: 0.01" in ok.stdout
    bad = cli(config.main, ["train.bogus=1"])
    assert bad.returncode == 2 and "train.bogus" in bad.stderr and not bad.stdout
    bad = cli(config.main, ["--default"])
    assert bad.returncode == 2 and "--default" in bad.stderr


def test_conf_config_yaml_states_exactly_the_defaults(cli):
    """conf/config.yaml is for reading: the schema's defaults with comments. It is never merged
    into a run, so a stale copy would mislead, not change a run: this test keeps it current."""
    printed = cli(config.main, ["--defaults"])
    assert printed.returncode == 0
    stated = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    assert stated == yaml.safe_load(printed.stdout), (
        "conf/config.yaml is stale: update it from `python -m asc_dist.config --defaults`")


def test_choices_and_bounds_live_in_the_schema():
    """A choice is a Literal field (the config layer names the key and the allowed values); a
    bound sits next to its field."""
    with pytest.raises(ConfigError, match=r"data\.backend.*'dalli'.*\['dali', 'torch', 'auto'\]"):
        config.load(["data.backend=dalli"])
    with pytest.raises(ConfigError, match=r"train\.precision.*'fp16'"):
        config.load(["train.precision=fp16"])
    with pytest.raises(ConfigError, match=r"optim\.decay_every=0: must be > 0"):
        config.load(["optim.decay_every=0"])
    with pytest.raises(ConfigError, match=r"optim\.weight_decay=-0\.1: must be >= 0"):
        config.load(["optim.weight_decay=-0.1"])


# A default restated on purpose: YAMLs compose, and these values must hold whatever came before.
RESTATED = {("baseline.yaml", "features.n_fft"),  # its 1920-sample window needs n_fft >= 1920
            ("dcase2025_device.yaml", "augment.mixstyle.p")}  # off again over stage 1's 0.4


def test_experiment_yamls_state_only_what_differs_from_the_defaults():
    defaults = OmegaConf.to_container(config.defaults())

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        if path.name == "config.yaml":
            continue
        for key, value in leaves(yaml.safe_load(path.read_text()) or {}):
            default = defaults
            for part in key.split("."):
                default = default[part]
            assert value != default or (path.name, key) in RESTATED, (
                f"{path.relative_to(ROOT)}: {key}: {value!r} is the default")


def test_model_names_come_from_the_models_registry():
    """Config accepts any model.name string (it imports no torch); the registry refuses unknown
    ones before any process group, listing the known names, prefixed families included."""
    from asc_dist import models

    cfg = config.load(["model.name=resnet51"])  # the config layer does not know the models
    with pytest.raises(ConfigError, match=r"model\.name='resnet51': unknown model; known: .*resnet50"):
        models.check_model(cfg.model)
    for name in models.MODELS:  # today's names, also those in saved checkpoints
        mels = ["features.n_mels=128"] if name == "passt" else []  # PaSST's 128-bin embedding
        models.check_model(config.load([f"model.name={name}", "model.pretrained=none", *mels]).model)
    with pytest.raises(ConfigError, match="no ImageNet weights for model.name=seresnet50"):
        models.check_model(config.load(["model.name=seresnet50"]).model)


def test_shipped_configs_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config.load(["conf/experiment/nll.yaml"]).loss.name == "ce"
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text("optim:\n  lr: 0.5\n")  # the caller's own first
    assert config.load(["conf/mine.yaml"]).optim.lr == 0.5
    with pytest.raises(ConfigError, match="config file not found: conf/nope.yaml"):
        config.load(["conf/nope.yaml"])


@pytest.mark.slow
def test_installed_wheel_works_from_outside_the_repository(tmp_path, packed_shards):
    """What a cluster image or `pip install .` does: build the wheel, install it into a target
    dir, and run the config dump and a smoke training from elsewhere (no checkout on the path)."""
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("asc_dist-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), OMP_NUM_THREADS="1", WANDB_SILENT="true")
    probe = subprocess.run([sys.executable, "-c", "import asc_dist; print(asc_dist.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.startswith(str(target))  # the wheel, not the checkout
    packages = {p.parent.relative_to(ROOT) for p in (ROOT / "asc_dist").rglob("__init__.py")}
    assert packages and all((target / p / "__init__.py").is_file() for p in packages), packages
    dump = subprocess.run([sys.executable, "-m", "asc_dist.config", "conf/experiment/nll.yaml"],
                          cwd=work, env=env, capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    assert "name: table1-nll" in dump.stdout and "sample_rate: 48000" in dump.stdout
    listed = subprocess.run([sys.executable, "-m", "asc_dist.datasets", "list"], cwd=work, env=env,
                            capture_output=True, text=True, check=False)
    assert listed.returncode == 0 and "tau2022-mobile-evaluation" in listed.stdout, listed.stderr
    train = subprocess.run(
        [sys.executable, "-m", "asc_dist.train", "conf/smoke.yaml", f"data.shards={packed_shards}",
         "run_dir=run", "data.backend=torch", "train.device=cpu", "train.max_iters=2",
         "train.eval_every=2"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (work / "run" / "checkpoints" / "step_2.pt").is_file()
