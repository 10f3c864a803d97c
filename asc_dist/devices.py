"""Device-specific models (DCASE 2025 task 1): a general model fine-tuned once per training
device, and the device set that evaluate, predict, export and complexity take like a checkpoint.

    [torchrun ...] python -m asc_dist.devices finetune GENERAL --out DEVSET
        [--devices a,b,c,s1,s2,s3] [--only DEVICE] [conf.yaml ...] [key=value ...]
    python -m asc_dist.devices assemble DEVSET

``finetune`` runs one ordinary training run per device (its own run dir, lock, resume,
metrics, W&B run of ``group`` = the set's name and ``job_type=device``), one after another with
all ranks, each configured as the general run was (its saved config), then the given YAMLs and
overrides (conf/experiment/dcase2025_device.yaml: the baseline's stage 2), then
``data.devices=[DEVICE]`` and ``train.init_from=GENERAL``: every parameter trained, batch norm
statistics adapting to the device, the last checkpoint kept. A rerun resumes the unfinished
device and skips the finished ones. ``--only DEVICE`` trains that device alone (one SLURM array
task per device: slurm/devices.sh); without it, ``finetune`` assembles the set at the end.
``--devices`` defaults to the devices the general model was trained on (DCASE 2025's split25:
a, b, c, s1, s2, s3).

Layout of a device set::

    DEVSET/plan.json       the general checkpoint's sha256 and the training devices (first run)
    DEVSET/general.pt      the general checkpoint (a hard link, or a copy across file systems)
    DEVSET/<device>/       the device's run dir (config.yaml, metrics.jsonl, checkpoints/, eval/)
    DEVSET/devices.json    written by ``assemble``: every member's checkpoint and sha256, the
                           classes, the devices, the front end's digest

``assemble`` refuses while a member is unfinished, was fine-tuned from another general model or
with another front end; loading a set (:func:`load_set`) refuses one whose members changed or
went missing since, naming them. Every other device id (DCASE 2025's s4-s6 and the unseen
evaluation devices, clips without one) is scored by the general model (:class:`RoutedModel`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from asc_dist import atomic, dist
from asc_dist import config as config_lib
from asc_dist.checkpoint import Checkpointer, file_sha256, step_of
from asc_dist.checkpoint import load as load_checkpoint
from asc_dist.cli import EXIT_ERROR, EXIT_STOPPED, command
from asc_dist.errors import TrainingDiverged, UserError
from asc_dist.frontend import settings
from asc_dist.restore import (
    Restored,
    checkpoint_config,
    frozen_differences,
    resolve_checkpoint,
    restore,
)

log = logging.getLogger(__name__)

FORMAT = "asc-dist-devices/1"
SET_FILE, PLAN_FILE, GENERAL_FILE = "devices.json", "plan.json", "general.pt"
# DCASE 2025 task 1's training devices (CPJKU/dcase2025_task1_baseline train_device_specific.py)
DCASE2025_DEVICES = ("a", "b", "c", "s1", "s2", "s3")


class DeviceSetError(UserError):
    """A device set that is unfinished, changed or inconsistent; the message names the member."""


# -------------------------------------------------------------------------- the set on disk


def is_device_set(path: str | Path) -> bool:
    p = Path(path)
    return (p / SET_FILE).is_file() or (p.name == SET_FILE and p.is_file())


def frontend_digest(state: dict, cfg: DictConfig) -> str:
    """What a member's inputs are made of: feature settings, standardisation and its statistics,
    the resampler for other rates. Members of one set must agree on it."""
    stats = state.get("feature_stats") if cfg.data.standardize else None
    blob = json.dumps({
        "features": settings(cfg.features), "standardize": bool(cfg.data.standardize),
        "stats": None if stats is None else [torch.as_tensor(stats[k]).flatten().tolist()
                                             for k in ("mean", "std")],
        "resampler": state.get("resampler"),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _devices_arg(text: str | None) -> list[str]:
    return [d.strip() for d in (text or "").split(",") if d.strip()]


def write_plan(out: Path, general: Path, devices: list[str]) -> dict:
    """``out/plan.json`` and ``out/general.pt`` on the first run; later runs (another SLURM array
    task, a rerun) must name the same general model and devices."""
    sha = file_sha256(general)
    plan = {"format": FORMAT, "name": out.name, "general_sha256": sha, "devices": devices,
            "source": str(general.resolve())}
    path = out / PLAN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("general_sha256") != sha or old.get("devices") != devices:
            raise DeviceSetError(
                f"{out} was planned for devices {old.get('devices')} from the general model "
                f"{old.get('source')} (sha256 {str(old.get('general_sha256'))[:12]}); this run "
                f"names devices {devices} from {general} (sha256 {sha[:12]}): use another --out")
        return old
    out.mkdir(parents=True, exist_ok=True)
    target = out / GENERAL_FILE
    tmp = out / f".{GENERAL_FILE}.tmp.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(general, tmp)  # no space, and the set keeps the file if the run dir goes
        except OSError:
            shutil.copyfile(general, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    atomic.write_text(path, json.dumps(plan, indent=2) + "\n")
    return plan


def _member_problem(device: str, run_dir: Path, general_cfg: DictConfig, general_sha: str
                    ) -> tuple[str | None, dict | None]:
    """(why ``device``'s run cannot join the set, or its record)."""
    latest = Checkpointer(run_dir).latest() if run_dir.is_dir() else None
    if latest is None:
        return f"{device}: not trained yet (no checkpoint in {run_dir / 'checkpoints'})", None
    state = load_checkpoint(latest)
    cfg = checkpoint_config(state, path=latest)
    if state.get("step", 0) < cfg.train.max_iters:
        return (f"{device}: unfinished, at step {state.get('step')} of {cfg.train.max_iters} "
                f"({latest}); rerun finetune to complete it"), None
    if list(cfg.data.devices) != [device]:
        return f"{device}: {latest} was trained on devices {list(cfg.data.devices)}", None
    if (state.get("init_from") or {}).get("sha256") != general_sha:
        return f"{device}: {latest} was not fine-tuned from this set's general model", None
    differ = frozen_differences(general_cfg, cfg)
    if differ:
        return f"{device}: {latest} differs from the general model in {'; '.join(differ)}", None
    return None, {"checkpoint": latest.relative_to(run_dir.parent).as_posix(),
                  "sha256": file_sha256(latest), "step": int(state["step"]),
                  "frontend": frontend_digest(state, cfg)}


def assemble(out: str | Path) -> dict:
    """Write ``out/devices.json`` atomically from the plan and the finished device runs."""
    out = Path(out)
    if not (out / PLAN_FILE).is_file():
        raise DeviceSetError(f"{out}: no {PLAN_FILE} (not a device set made by "
                             f"'python -m asc_dist.devices finetune ... --out {out}')")
    plan = json.loads((out / PLAN_FILE).read_text())
    general = out / GENERAL_FILE
    if not general.is_file() or file_sha256(general) != plan["general_sha256"]:
        raise DeviceSetError(f"{general}: missing or changed since {out / PLAN_FILE} was written")
    gstate = load_checkpoint(general)
    gcfg = checkpoint_config(gstate, path=general)
    problems, members = [], {}
    for device in plan["devices"]:
        problem, record = _member_problem(device, out / device, gcfg, plan["general_sha256"])
        if problem:
            problems.append(problem)
        else:
            members[device] = record
    if problems:
        raise DeviceSetError(f"{out}: {len(problems)} of {len(plan['devices'])} members cannot "
                             f"join the set: " + "; ".join(problems))
    digest = frontend_digest(gstate, gcfg)
    odd = [d for d, m in members.items() if m.pop("frontend") != digest]
    if odd:
        raise DeviceSetError(f"{out}: members {odd} have another front end or feature "
                             f"statistics than the general model")
    record = {
        "format": FORMAT, "name": plan["name"], "devices": list(plan["devices"]),
        "general": {"checkpoint": GENERAL_FILE, "sha256": plan["general_sha256"],
                    "step": int(gstate.get("step", 0))},
        "members": members, "classes": list(gstate["classes"]), "model": gcfg.model.name,
        "frontend": digest, "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic.write_text(out / SET_FILE, json.dumps(record, indent=2) + "\n")
    log.info(f"device set {out / SET_FILE}: the general model and {len(members)} device models "
             f"({', '.join(members)})")
    return record


# -------------------------------------------------------------------------- the set in memory


class RoutedModel(nn.Module):
    """Logits of each row from its recording device's model; every other device id (and None,
    e.g. a clip without one) from the general model. Each member standardises its own input
    (``x`` is the raw log-mel) and runs in its own dtype (float16 after ``.half()``), so a batch
    gives exactly what each device's clips alone give their model."""

    routes_by_device = True

    def __init__(self, general: nn.Module, general_standardize: nn.Module,
                 members: dict[str, tuple[nn.Module, nn.Module]]):
        super().__init__()
        self.general = general
        self.general_standardize = general_standardize
        self.members = nn.ModuleDict({d: m for d, (m, _) in members.items()})
        self.member_standardize = nn.ModuleDict({d: s for d, (_, s) in members.items()})

    def routes(self, devices: Sequence[str | None]) -> dict[str | None, list[int]]:
        """Row indices per model: a member's device id, or None for the general model."""
        out: dict[str | None, list[int]] = {}
        for i, d in enumerate(devices):
            out.setdefault(d if d in self.members else None, []).append(i)
        return out

    def forward(self, x: torch.Tensor, devices: Sequence[str | None]) -> torch.Tensor:
        if len(devices) != x.shape[0]:
            raise ValueError(f"{len(devices)} device ids for a batch of {x.shape[0]}")
        out = None
        for device, rows in self.routes(devices).items():
            model = self.general if device is None else self.members[device]
            standardize = (self.general_standardize if device is None
                           else self.member_standardize[device])
            part = x
            if len(rows) != x.shape[0]:
                idx = torch.tensor(rows, device=x.device)
                part = x.index_select(0, idx)
            dtype = next(model.parameters()).dtype
            with torch.autocast(x.device.type, enabled=False):  # features stay float32
                inp = standardize(part.float()).to(dtype)
            y = model(inp)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out


@dataclass
class DeviceSet:
    """A device set made ready for inference: the general model and one model per device."""

    path: Path
    record: dict
    general: Restored
    members: dict[str, Restored]

    @property
    def cfg(self) -> DictConfig:
        return self.general.cfg

    @property
    def classes(self) -> list[str]:
        return self.general.classes

    @property
    def step(self) -> int:
        return self.general.step

    @property
    def resampler(self) -> str:
        return self.general.resampler

    @property
    def devices(self) -> list[str]:
        """The devices with a model of their own (the set's known devices)."""
        return list(self.members)

    @property
    def half(self) -> bool:
        return self.general.half

    def autocast(self, device: torch.device):
        return self.general.autocast(device)

    def router(self, half: bool | None = None) -> RoutedModel:
        """The models behind one forward (float16 copies when ``half``, default: as configured)."""
        half = self.half if half is None else half
        pick = _half_copy if half else (lambda m: m)
        members = {d: (pick(r.model), r.standardize) for d, r in self.members.items()}
        return RoutedModel(pick(self.general.model), self.general.standardize, members).eval()


def _half_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).half()


def load_set(path: str | Path, *, overrides: Sequence[str] = (),
             device: torch.device | str = "cpu") -> DeviceSet:
    """A device set (its folder or devices.json): every member checked against the sha256 it was
    assembled with, then restored (asc_dist.restore) with ``overrides``."""
    path = Path(path)
    root = path.parent if path.name == SET_FILE else path
    try:
        record = json.loads((root / SET_FILE).read_text())
    except (OSError, ValueError) as e:
        raise DeviceSetError(f"{root / SET_FILE}: not a readable device set ({e})") from None
    if record.get("format") != FORMAT:
        raise DeviceSetError(f"{root / SET_FILE}: format {record.get('format')!r}, "
                             f"expected {FORMAT}")
    entries = {None: record["general"], **record["members"]}
    problems = []
    for name, m in entries.items():
        f = root / m["checkpoint"]
        who = "the general model" if name is None else f"member {name}"
        if not f.is_file():
            problems.append(f"{who}: {f} is missing")
        elif file_sha256(f) != m["sha256"]:
            problems.append(f"{who}: {f} changed since the set was assembled")
    if problems:
        raise DeviceSetError(f"device set {root}: " + "; ".join(problems)
                             + f"; rerun 'python -m asc_dist.devices assemble {root}' once the "
                               f"members are as they should be")
    general = restore(root / record["general"]["checkpoint"], overrides=overrides, device=device)
    members = {d: restore(root / m["checkpoint"], overrides=overrides, device=device)
               for d, m in record["members"].items()}
    for d, r in members.items():
        if r.classes != general.classes:
            raise DeviceSetError(f"device set {root}: member {d} names classes {r.classes}, the "
                                 f"general model {general.classes}")
    return DeviceSet(root, record, general, members)


def router_of(model: Restored | DeviceSet) -> RoutedModel:
    """A :class:`RoutedModel` for a device set, or for one checkpoint (its model serves every
    device), in float16 copies when its train.eval_precision says so."""
    if isinstance(model, DeviceSet):
        return model.router()
    net = _half_copy(model.model) if model.half else model.model
    return RoutedModel(net, model.standardize, {}).eval()


def load_model_or_set(path: str | Path, *, overrides: Sequence[str] = (),
                      device: torch.device | str = "cpu") -> Restored | DeviceSet:
    """A device set when ``path`` is one, else a checkpoint (file or run dir)."""
    if is_device_set(path):
        return load_set(path, overrides=overrides, device=device)
    return restore(path, overrides=overrides, device=device)


def unknown_devices(counts: dict[str, int], members: Sequence[str]) -> str | None:
    """One line on the clips whose device has no model of its own (the general model scored
    them), or None when there are none."""
    other = {d: n for d, n in sorted(counts.items()) if d not in members}
    if not other:
        return None
    listed = ", ".join(f"{d}: {n}" for d, n in other.items())
    return (f"{sum(other.values())} clip(s) of devices without a model of their own ({listed}) "
            f"were scored by the general model")


# -------------------------------------------------------------------------- finetune


def device_config(base: DictConfig, args: Sequence[str], out: Path, device: str, general: Path,
                  world_size: int) -> DictConfig:
    """The run config of ``device``: the general run's, the YAMLs and overrides, then the set's."""
    forced = [f"name={out.name}-{device}", f"run_dir={out / device}", f"data.devices=[{device}]",
              f"train.init_from={general}", "resume=auto", f"wandb.group={out.name}",
              "wandb.job_type=device"]
    return config_lib.load([*args, *forced], world_size=world_size, base=base)


def finetune(general: str | Path, out: str | Path, args: Sequence[str] = (), *,
             devices: Sequence[str] | None = None, only: str | None = None) -> int:
    """Fine-tune ``general`` once per device into the set ``out`` (module doc); the exit code."""
    from asc_dist import train

    out = Path(out)
    general = resolve_checkpoint(general)
    state = load_checkpoint(general)
    base = checkpoint_config(state, path=general)
    devices = list(devices or state.get("train_devices") or DCASE2025_DEVICES)
    if only is not None and only not in devices:
        raise DeviceSetError(f"--only {only}: not one of the set's devices {devices}")
    world = dist.env_world_size()
    todo = [only] if only is not None else devices
    try:
        cfgs = {}
        for device in todo:  # every device's config and data first: a mistake costs seconds
            cfg = device_config(base, args, out, device, general, world)
            train.preflight(cfg)
            cfg = train.resolve_epochs(cfg, world)
            train.check_schedule(cfg)
            cfgs[device] = cfg
        if dist.env_rank() == 0:
            write_plan(out, general, devices)
    except UserError:
        if dist.env_rank() != 0:  # every rank finds the same problem: rank 0 says it once
            return EXIT_ERROR
        raise
    env = dist.init(next(iter(cfgs.values())).train.device)  # the overrides' train.device too
    try:
        for device, cfg in cfgs.items():
            if _finished(cfg):
                if env.is_main:
                    log.info(f"device {device}: {cfg.run_dir} is finished; skipped")
                continue
            if env.is_main:
                log.info(f"device {device}: fine-tuning {general.name} on its clips -> "
                         f"{cfg.run_dir}")
            if train.train(cfg, env)["stopped"]:
                train.leave_together(env)
                return EXIT_STOPPED
        if only is None and env.is_main:
            assemble(out)
    except TrainingDiverged:
        train.leave_together(env)
        if not env.is_main:  # every rank stopped at the same step: rank 0 says it once
            return EXIT_ERROR
        raise
    finally:
        dist.teardown()
    return 0


def _finished(cfg: DictConfig) -> bool:
    latest = Checkpointer(cfg.run_dir).latest()
    return latest is not None and step_of(latest) >= cfg.train.max_iters


# -------------------------------------------------------------------------- CLI


@command("asc_dist.devices")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asc_dist.devices",
                                description="Device-specific models (DCASE 2025 task 1).")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("finetune", help="fine-tune a general model once per training device",
                       description=__doc__.split("\n\n")[2])
    f.add_argument("general", help="the general model: a checkpoint .pt or a run dir")
    f.add_argument("--out", required=True, help="the device set's folder")
    f.add_argument("--devices", default=None,
                   help="comma list of training devices (default: the general model's training "
                        f"devices, else {','.join(DCASE2025_DEVICES)})")
    f.add_argument("--only", default=None, help="train this one device (one SLURM array task)")
    f.add_argument("--array-task", action="store_true",
                   help="train the device at position $SLURM_ARRAY_TASK_ID of --devices "
                        "(slurm/devices.sh)")
    f.add_argument("config", nargs="*", help="YAML files, then key=value overrides")
    a = sub.add_parser("assemble", help="write DEVSET/devices.json once every member is finished")
    a.add_argument("devset", help="the device set's folder")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.cmd == "assemble" or any(r.startswith("-") for r in rest):
        args = p.parse_args(sys.argv[1:] if argv is None else argv)  # says what is unknown
    else:  # YAMLs and overrides may stand before or after the options
        args.config = [*args.config, *rest]
    if args.cmd == "assemble":
        record = assemble(args.devset)
        print(json.dumps({"devices": record["devices"], "file": str(Path(args.devset) / SET_FILE)}))
        return 0
    for item in args.config:
        if "=" not in item and Path(item).suffix not in (".yaml", ".yml"):
            raise config_lib.ConfigError(f"{item!r}: expected a YAML file or key=value")
    devices = _devices_arg(args.devices) or None
    only = args.only
    if args.array_task:
        task = os.environ.get("SLURM_ARRAY_TASK_ID", "")
        if not devices or not task.isdigit() or int(task) >= len(devices):
            raise DeviceSetError(f"--array-task needs --devices and SLURM_ARRAY_TASK_ID within it "
                                 f"(got --devices {args.devices}, SLURM_ARRAY_TASK_ID={task!r})")
        only = devices[int(task)]
    return finetune(args.general, args.out, args.config, devices=devices, only=only)


if __name__ == "__main__":
    raise SystemExit(main())
