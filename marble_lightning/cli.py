"""The ``marble`` command line: LightningCLI for MARBLE training plus two small utilities.

Usage::

    marble fit --config configs/sd35m_marble.yaml            # also: python -m marble_lightning ...
    marble fit --config configs/tiny_sd3.yaml --print_config # resolved config, then exit
    marble validate | test | predict --config ... --ckpt_path ...
    marble test --config configs/marble.yaml                 # no --ckpt_path: the base model
    marble export-lora --ckpt RUN/checkpoints/last.ckpt --out lora_dir [--config RUN/config.yaml]
    marble make-tiny-sd3 --out build/tiny_sd3                # tiny random SD3 pipeline for tests
    marble make-tiny-flux --out build/tiny_flux              # ... FLUX / qwen-image / wan twins

``fit`` and friends are LightningCLI subcommands over
:class:`~marble_lightning.module.MarbleDiffusionModule` and
:class:`~marble_lightning.data.PromptDataModule` (this is the ``lightning fit --config ...`` of
the design card: Lightning no longer ships a ``lightning`` command, so the package ships its own).
Each run writes into its own versioned folder ``<default_root_dir>/lightning_logs/version_N``
(logger, ``config.yaml``, ``checkpoints/``), so re-running into the same root never collides;
the saved config may be overwritten when no logger is configured. Distributed strategies
relaunch the other ranks through this same entry point (console script or ``python -m``).

``fit`` ends with the line ``marble: fit finished, checkpoints in <dir>`` on global rank 0, which
scripts can wait for.

``validate`` / ``test`` / ``predict`` score ``data.heldout_prompts``; when the config leaves it
unset they take the ``prompts`` of the config's ``RewardEvalCallback`` (one such callback), else
they stop with an error. Without ``--ckpt_path`` they score the model as configured: the LoRA
adapters start as the identity, so that is the base model. With ``--ckpt_path`` the evaluation
data settings (:data:`EVALUATION_DATA_KEYS`) may differ from the checkpoint's run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from marble_lightning.interrupts import GracefulInterrupt, checkpoint_dir

__all__ = [
    "EVALUATION_DATA_KEYS",
    "FIT_MARKER",
    "RESUME_AUTO",
    "RESUME_LAST",
    "SAFE_ON_RESUME",
    "MarbleCLI",
    "allocator_hint",
    "main",
]

FIT_MARKER = "marble: fit finished, checkpoints in"
"""Prefix of the line printed on global rank 0 after a successful ``fit``."""

_ALLOCATOR_ENV = (
    "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=1073741824"
)


def allocator_hint(
    environ: dict[str, str] | None = None, platform: str | None = None
) -> str | None:
    """One-line advice on glibc's allocator for CPU training, or ``None`` when not needed.

    On Linux, glibc returning large tensor buffers to the OS after every step can make CPU
    training several times slower (measured ~7x on a tiny diffusion step: 6.5 s -> 0.89 s). The
    ``MALLOC_*`` variables must be set before the process starts, so the CLI only advises.

    Args:
        environ: environment to inspect (default ``os.environ``).
        platform: ``sys.platform`` override (for tests).

    Returns:
        The hint, or ``None`` when not on Linux or a ``MALLOC_*`` variable or a preloaded
        jemalloc/tcmalloc is already in place.
    """
    environ = dict(os.environ if environ is None else environ)
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux"):
        return None
    if any(key.startswith("MALLOC_") for key in environ):
        return None
    if any(name in environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc")):
        return None
    return (
        "marble: hint: CPU training on Linux is much faster with glibc told to keep freed memory; "
        f"start the process with {_ALLOCATOR_ENV} (or preload jemalloc/tcmalloc)"
    )


RESUME_LAST = "last"
"""``--ckpt_path last``: resume the newest run of this root that has a ``last.ckpt`` (error if
none)."""
RESUME_AUTO = "auto"
"""``--ckpt_path auto``: like ``last`` when such a run exists, else start fresh (auto-resume)."""

SAFE_ON_RESUME = frozenset({"diagnostics_every", "merge_lora", "eval_sample_steps"})
"""Model hyper-parameters that may differ from the checkpoint's on resume (applied and logged).

Every ``trainer`` setting (``max_steps``, callbacks such as the evaluation frequency, loggers) may
change on resume too; any other model setting, the backbone, the reward list, the data settings
and ``seed_everything`` must match the checkpoint's run, or the CLI refuses to resume."""

EVALUATION_DATA_KEYS = frozenset(
    {"heldout_prompts", "eval_images_per_prompt", "eval_seed", "eval_batch_size", "num_workers"}
)
"""Data settings that only choose what ``validate`` / ``test`` / ``predict`` score: these commands
accept values differing from the checkpoint's run (applied and logged)."""

_EVALUATION_COMMANDS = ("validate", "test", "predict")


def _first_rank() -> bool:
    """Before the trainer exists: not a process that a distributed launcher started as rank > 0."""
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "NODE_RANK"))


def _plain(value: Any) -> Any:
    """JSON-normal form (tuples -> lists, Namespaces -> dicts, paths -> str) for comparisons."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _diff(prefix: str, old: Any, new: Any, out: list[tuple[str, Any, Any]]) -> None:
    """Leaf-level differences between two plain values, as ``(dotted key, old, new)``."""
    if (
        isinstance(old, dict)
        and isinstance(new, dict)
        and old.get("class_path") == new.get("class_path")
    ):
        for key in sorted(set(old) | set(new)):
            _diff(f"{prefix}.{key}" if prefix else key, old.get(key), new.get(key), out)
    elif old != new:
        out.append((prefix, old, new))


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a ``raise ... from`` / ``__context__`` chain."""
    seen = {id(err)}
    while True:
        nxt = err.__cause__ or err.__context__
        if nxt is None or id(nxt) in seen:
            return err
        seen.add(id(nxt))
        err = nxt


def _fail(message: str, code: int = 2) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _logger_entries(trainer_cfg: Any) -> list[Any]:
    logger = trainer_cfg.get("logger") if trainer_cfg is not None else None
    if logger is None or isinstance(logger, bool):
        return []
    return list(logger) if isinstance(logger, list) else [logger]


def _without(value: Any, keys: frozenset[str]) -> Any:
    return {k: v for k, v in value.items() if k not in keys} if isinstance(value, dict) else value


def _init_args(entry: Any) -> Any:
    """The init arguments of a ``class_path`` entry, or the entry itself."""
    init = entry.get("init_args") if hasattr(entry, "get") else None
    return entry if init is None else init


def _versioned_logger(entry: Any) -> bool:
    path = str(entry.get("class_path", "")) if hasattr(entry, "get") else ""
    return path.endswith(("TensorBoardLogger", "CSVLogger"))


class MarbleCLI(LightningCLI):
    """LightningCLI with resume that finds the run, no silent overrides, outputs under the root.

    * ``--ckpt_path last`` resumes the newest ``<root>/<logger name>/version_N`` that has
      ``checkpoints/last.ckpt`` and keeps logging into that same folder; ``--ckpt_path auto``
      does the same when such a run exists and starts fresh otherwise. Without ``--ckpt_path`` a
      run always starts fresh in a new ``version_N``.
    * Before anything is restored the checkpoint is read with ``weights_only=True`` and its
      settings are compared with the requested ones (see :data:`SAFE_ON_RESUME`): differing model
      or data settings fail, listing each key with the checkpoint's and the requested value.
      (Lightning's own CLI would silently replace the requested model settings by the
      checkpoint's.)
    * Loggers whose ``save_dir`` is not given write under ``trainer.default_root_dir``.
    * SIGINT/SIGTERM: see :mod:`marble_lightning.interrupts` (exit code 130/143).
    * Errors while building the model, data or callbacks end with the original message as the
      last line of stderr; a config file that is not valid YAML is named.
    """

    _resume_path: str | None = None
    _resume_version: int | None = None

    # ------------------------------------------------------------------ config helpers
    def _sub(self) -> Any:
        sub = self.config.get("subcommand")
        return self.config[sub] if sub else self.config

    def _root(self) -> str:
        trainer_cfg = self._sub().get("trainer")
        root = trainer_cfg.get("default_root_dir") if trainer_cfg is not None else None
        return os.fspath(root) if root else os.getcwd()

    def _runs_dir(self) -> Path:
        """``<save_dir>/<name>`` of the first logger: where the ``version_N`` folders live."""
        root = self._root()
        entries = _logger_entries(self._sub().get("trainer"))
        if entries and _versioned_logger(entries[0]):
            init = entries[0].get("init_args") or {}
            save_dir = init.get("save_dir") or root
            name = init.get("name")
            name = "lightning_logs" if name is None else name
            return Path(os.fspath(save_dir)) / str(name)
        return Path(root) / "lightning_logs"

    # ------------------------------------------------------------------ resume
    def _find_last(self) -> tuple[str, int] | None:
        runs = self._runs_dir()
        found = []
        if runs.is_dir():
            for child in runs.iterdir():
                number = child.name[len("version_") :]
                if (
                    child.name.startswith("version_")
                    and number.isdigit()
                    and (child / "checkpoints" / "last.ckpt").is_file()
                ):
                    found.append(int(number))
        if not found:
            return None
        version = max(found)
        return str(runs / f"version_{version}" / "checkpoints" / "last.ckpt"), version

    def _parse_ckpt_path(self) -> None:
        """Resolve ``last``/``auto``, load the checkpoint safely and check it fits the config.

        Replaces LightningCLI's version, which merged the checkpoint's hyper-parameters into the
        config and so silently overrode what the user asked for.
        """
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if ckpt_path is None:
            return
        ckpt_path = os.fspath(ckpt_path)
        if ckpt_path in (RESUME_LAST, RESUME_AUTO):
            found = self._find_last()
            if found is None:
                where = self._runs_dir() / "version_*" / "checkpoints" / "last.ckpt"
                if ckpt_path == RESUME_AUTO:
                    print(
                        f"marble: nothing to resume ({where} not found); starting a fresh run",
                        file=sys.stderr,
                        flush=True,
                    )
                    self.config[sub]["ckpt_path"] = None
                    return
                _fail(
                    f"marble: error: --ckpt_path last: no run to resume, {where} not found "
                    "(check --trainer.default_root_dir; drop --ckpt_path to start a fresh run)"
                )
            ckpt_path, self._resume_version = found
        elif not Path(ckpt_path).is_file():
            _fail(f"marble: error: --ckpt_path {ckpt_path}: no such checkpoint file")
        checkpoint = self._load_checkpoint(ckpt_path)
        self._check_compatible(ckpt_path, checkpoint)
        self._resume_path = ckpt_path
        self.config[sub]["ckpt_path"] = ckpt_path
        if "weights_only" in self._subcommand_method_arguments.get(sub, []):
            self.config[sub]["weights_only"] = True

    @staticmethod
    def _load_checkpoint(path: str) -> dict[str, Any]:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            _fail(
                f"marble: error: cannot load checkpoint {path} safely (torch.load "
                "weights_only=True refused or failed; nothing was executed or restored): "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            )
        if not isinstance(checkpoint, dict):
            _fail(
                f"marble: error: {path} is not a Lightning checkpoint (got "
                f"{type(checkpoint).__name__})"
            )
        return checkpoint

    def _check_compatible(self, path: str, checkpoint: dict[str, Any]) -> None:
        sub = self.config.subcommand
        requested = self.config[sub]
        conflicts: list[tuple[str, Any, Any]] = []
        applied: list[tuple[str, Any, Any]] = []
        hparams = checkpoint.get("hyper_parameters") or {}
        model_cfg = _plain(requested.get("model") or {})
        model_args = model_cfg.get("init_args", model_cfg) if isinstance(model_cfg, dict) else {}
        for key in sorted(hparams):
            if key.startswith("_") or key not in model_args:
                continue
            old, new = _plain(hparams[key]), model_args[key]
            if old != new:
                (applied if key in SAFE_ON_RESUME else conflicts).append((f"model.{key}", old, new))
        evaluating = sub in _EVALUATION_COMMANDS
        data_hparams = checkpoint.get("datamodule_hyper_parameters") or {}
        data_cfg = _plain(requested.get("data") or {})
        data_args = data_cfg.get("init_args", data_cfg) if isinstance(data_cfg, dict) else {}
        for key in sorted(data_hparams):
            if not key.startswith("_") and key in data_args:
                free = evaluating and key in EVALUATION_DATA_KEYS
                _diff(
                    f"data.{key}",
                    _plain(data_hparams[key]),
                    data_args[key],
                    applied if free else conflicts,
                )
        run_config = Path(path).resolve().parent.parent / "config.yaml"
        saved = None
        if run_config.is_file():
            try:
                saved = yaml.safe_load(run_config.read_text())
                now = yaml.safe_load(self._parser(sub).dump(requested, skip_none=False))
            except Exception:
                saved = None
        if isinstance(saved, dict):
            saved_model = saved.get("model") or {}
            now_model = now.get("model") or {}
            for key in ("backbone", "rewards"):
                _diff(
                    f"model.{key}",
                    _plain(saved_model.get(key)),
                    _plain(now_model.get(key)),
                    conflicts,
                )
            if not data_hparams:
                old_data, new_data = _plain(saved.get("data")), _plain(now.get("data"))
                if evaluating:
                    old_data = _without(old_data, EVALUATION_DATA_KEYS)
                    new_data = _without(new_data, EVALUATION_DATA_KEYS)
                _diff("data", old_data, new_data, conflicts)
            if saved.get("seed_everything") != now.get("seed_everything"):
                conflicts.append(
                    ("seed_everything", saved.get("seed_everything"), now.get("seed_everything"))
                )
            old_trainer = {k: v for k, v in (saved.get("trainer") or {}).items() if k != "logger"}
            new_trainer = {k: v for k, v in (now.get("trainer") or {}).items() if k != "logger"}
            _diff("trainer", _plain(old_trainer), _plain(new_trainer), applied)
        if conflicts:
            lines = [
                f"  {key}: checkpoint {_show(old)}, requested {_show(new)}"
                for key, old, new in conflicts
            ]
            _fail(
                f"marble: error: cannot resume from {path}: {len(conflicts)} setting(s) differ "
                "from the checkpoint's run (nothing was restored):\n" + "\n".join(lines) + "\n"
                "Resume with the run's own settings (its config.yaml), or start a fresh run "
                "without --ckpt_path."
            )
        what = "resume" if sub == "fit" else sub
        for key, old, new in applied:
            print(
                f"marble: {what}: {key}: checkpoint run {_show(old)}, now {_show(new)} (applied)",
                file=sys.stderr,
                flush=True,
            )

    # ------------------------------------------------------------------ parsing
    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, give loggers without ``save_dir`` the ``default_root_dir``, then validate.

        (TensorBoardLogger/CSVLogger require ``save_dir``; the shipped configs leave it out so
        that ``--trainer.default_root_dir`` moves every output, so validation waits for it.)
        """
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
            return
        self.config = parser.parse_args(args, _skip_validation=True)
        self._fill_save_dirs()
        try:
            parser.validate(self.config)
        except (TypeError, KeyError, ValueError) as err:
            parser.error(str(err), err)

    def _fill_save_dirs(self) -> None:
        """Loggers without an explicit ``save_dir`` write under ``trainer.default_root_dir``."""
        if self.config.get("subcommand") is None and "trainer" not in self.config:
            return
        root = self._root()
        for entry in _logger_entries(self._sub().get("trainer")):
            init = entry.get("init_args") if hasattr(entry, "get") else None
            if init is not None and "save_dir" in init and init.get("save_dir") is None:
                init["save_dir"] = root

    # ------------------------------------------------------------------ instantiation
    def before_instantiate_classes(self) -> None:
        self._fill_save_dirs()
        self._evaluation_defaults()

    def _evaluation_defaults(self) -> None:
        """``validate`` / ``test`` / ``predict``: held-out prompts from the config's
        ``RewardEvalCallback`` when ``data.heldout_prompts`` is unset; say what is scored."""
        sub = self.config.get("subcommand")
        if sub not in _EVALUATION_COMMANDS:
            return
        requested = self.config[sub]
        data = _init_args(requested.get("data"))
        if data is not None and hasattr(data, "get") and data.get("heldout_prompts") is None:
            trainer_cfg = requested.get("trainer")
            entries = trainer_cfg.get("callbacks") if trainer_cfg is not None else None
            entries = [] if entries is None else entries if isinstance(entries, list) else [entries]
            found = [
                _init_args(e).get("prompts")
                for e in entries
                if hasattr(e, "get") and str(e.get("class_path", "")).endswith("RewardEvalCallback")
            ]
            found = [p for p in found if p is not None]
            if len(found) != 1:
                _fail(
                    f"marble: error: `marble {sub}` scores data.heldout_prompts, which is not set: "
                    "pass --data.heldout_prompts (a list of prompts, a .txt file, a GenEval .jsonl "
                    "file or toy:heldout)"
                )
            data["heldout_prompts"] = found[0]
            if _first_rank():
                print(
                    f"marble: {sub}: data.heldout_prompts not set; scoring the prompts of the "
                    f"config's RewardEvalCallback ({_show(_plain(found[0]))})",
                    file=sys.stderr,
                    flush=True,
                )
        if requested.get("ckpt_path") is None and _first_rank():
            print(
                f"marble: {sub} without --ckpt_path scores the model as configured (LoRA starts as "
                "the identity: the base model)",
                file=sys.stderr,
                flush=True,
            )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            if os.environ.get("MARBLE_TRACEBACK"):
                raise
            cause = _root_cause(err)
            message = str(cause).strip() or type(cause).__name__
            _fail(
                "marble: error: building the run from the config failed (set MARBLE_TRACEBACK=1 "
                f"for the traceback):\n{type(cause).__name__}: {message}"
            )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        self.interrupt = GracefulInterrupt()
        trainer.callbacks.insert(0, self.interrupt)
        if self._resume_version is not None:
            for logger in trainer.loggers:
                if getattr(logger, "_version", "missing") is None:
                    logger._version = self._resume_version
        return trainer

    # ------------------------------------------------------------------ fit
    def before_fit(self) -> None:
        trainer = self.trainer
        if trainer.is_global_zero and isinstance(trainer.accelerator, CPUAccelerator):
            hint = allocator_hint()
            if hint:
                print(hint, file=sys.stderr, flush=True)
        if self._resume_path is not None and trainer.is_global_zero:
            for logger in trainer.loggers:  # CSVLogger would delete the earlier metrics.csv
                metrics = (
                    Path(logger.log_dir) / "metrics.csv" if isinstance(logger, CSVLogger) else None
                )
                if metrics is not None and metrics.is_file():
                    part = 0
                    while (metrics.parent / f"metrics.part{part}.csv").exists():
                        part += 1
                    metrics.rename(metrics.parent / f"metrics.part{part}.csv")
            print(f"marble: resuming from {os.path.abspath(self._resume_path)}", flush=True)

    def after_fit(self) -> None:
        trainer = self.trainer
        directory = checkpoint_dir(trainer)
        interrupt = getattr(self, "interrupt", None)
        code = interrupt.exit_code if interrupt is not None else None
        if code is not None:
            if trainer.is_global_zero:
                name = signal.Signals(interrupt.signum).name
                print(
                    f"marble: {name}: stopped after step {interrupt.steps_done}; resumable "
                    f"checkpoint {os.path.abspath(interrupt.saved or directory)}; resume with the "
                    "same command plus --ckpt_path last",
                    file=sys.stderr,
                    flush=True,
                )
            sys.exit(code)
        if trainer.is_global_zero:
            print(f"{FIT_MARKER} {os.path.abspath(directory)}", flush=True)


def _export_lora_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="marble export-lora",
        description=(
            "Export a trained LoRA adapter from a marble checkpoint: diffusers' SD3 LoRA file "
            "(pipeline.load_lora_weights) for SD3 backbones, a peft adapter directory otherwise."
        ),
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        help="checkpoint written by `marble fit`: a .ckpt file or a sharded run's folder",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--config",
        default=None,
        help="the run's config.yaml (default: found next to the checkpoints folder)",
    )
    parser.add_argument("--adapter", default="policy", help="adapter to export (default: policy)")
    parser.add_argument("--format", default="auto", choices=["auto", "diffusers", "peft"])
    parser.add_argument("--lora-alpha", type=float, default=None, help="override lora_alpha")
    parser.add_argument(
        "--ema", action="store_true", help="export the policy EMA (PolicyEMACallback)"
    )
    args = parser.parse_args(list(argv))
    from marble_lightning.lora_export import export_lora

    try:
        path = export_lora(
            args.ckpt,
            args.out,
            adapter_name=args.adapter,
            format=args.format,
            config=args.config,
            lora_alpha=args.lora_alpha,
            ema=args.ema,
        )
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a crafted file
        first = str(err).splitlines()[0] if str(err) else ""
        parser.error(
            f"cannot load {args.ckpt} safely (weights_only=True refused it; nothing was executed): "
            f"{first}"
        )
    print(f"marble: exported LoRA adapter {args.adapter!r} to {path}", flush=True)
    return 0


def _make_tiny_sd3_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="marble make-tiny-sd3",
        description=(
            "Write a tiny randomly initialised SD3 pipeline (32 px, no T5) for tests and CPU demos."
        ),
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv))
    from marble_lightning.testing import build_tiny_sd3_pipeline

    path = build_tiny_sd3_pipeline(Path(args.out), seed=args.seed)
    print(f"marble: tiny SD3 pipeline written to {path}", flush=True)
    return 0


def _config_files(argv: Sequence[str]) -> list[str]:
    """Values of ``--config``/``-c`` (and ``--config=...``) in ``argv``."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _check_config_files(argv: Sequence[str]) -> None:
    """Exit with an error naming the file when a ``--config`` file is not valid YAML."""
    for name in _config_files(argv):
        path = Path(name)
        if not path.is_file():
            continue  # jsonargparse reports it (or the value is inline YAML)
        try:
            yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            detail = " ".join(str(err).replace('"<unicode string>"', str(path)).split())
            _fail(f"marble: error: config file {path} is not valid YAML: {detail}")


_TINY_FAMILIES = {  # issue 20: `marble make-tiny-<family> --out D` (builder, description)
    "flux": ("build_tiny_flux_pipeline", "FLUX.1-dev layout, 32 px, guidance embedding"),
    "qwen-image": ("build_tiny_qwen_image_pipeline", "Qwen-Image layout, 32 px"),
    "wan": ("build_tiny_wan_pipeline", "Wan 2.1 text-to-video layout, 5 frames of 32 px"),
}


def _make_tiny_family_command(family: str):
    builder, what = _TINY_FAMILIES[family]

    def command(argv: Sequence[str]) -> int:
        parser = argparse.ArgumentParser(
            prog=f"marble make-tiny-{family}",
            description=(
                f"Write a tiny randomly initialised {family} pipeline ({what}) for tests and CPU "
                "demos."
            ),
        )
        parser.add_argument("--out", required=True, help="output directory")
        parser.add_argument("--seed", type=int, default=0)
        args = parser.parse_args(list(argv))
        from marble_lightning import testing

        path = getattr(testing, builder)(Path(args.out), seed=args.seed)
        print(f"marble: tiny {family} pipeline written to {path}", flush=True)
        return 0

    return command


_EXTRA_COMMANDS = {
    "export-lora": _export_lora_command,
    "make-tiny-sd3": _make_tiny_sd3_command,
    **{f"make-tiny-{family}": _make_tiny_family_command(family) for family in _TINY_FAMILIES},
}


def _drop_service_tips(record: logging.LogRecord) -> bool:
    """Logging filter: False for Lightning's "Tip: ... try installing litlogger/litmodels" lines."""
    message = record.getMessage()
    return not ("Tip:" in message and ("litlogger" in message or "litmodels" in message))


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``marble`` console script and ``python -m marble_lightning``.

    Args:
        args: command-line arguments without the program name (default ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in _EXTRA_COMMANDS:
        sys.exit(_EXTRA_COMMANDS[argv[0]](argv[1:]))

    _check_config_files(argv)
    # the module optimises in training_step and checkpoints after the step, by design
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # PromptBatches is an IterableDataset with a length that splits its batches across dataloader
    # workers itself, which Lightning cannot know
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    # the frozen backbone and rewards stay in eval mode by design (MarbleDiffusionModule.train)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start")
    # Lightning's own use of a torch pytree class that newer torch deprecates; nothing to act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning's advertisements for its hosted services, printed at every fit
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_drop_service_tips)
    from marble_lightning.data import PromptDataModule
    from marble_lightning.module import MarbleDiffusionModule

    MarbleCLI(
        MarbleDiffusionModule,
        PromptDataModule,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": (
                "MARBLE multi-reward diffusion fine-tuning (LightningCLI). Extra commands: "
                "`marble export-lora --ckpt C --out D` and "
                "`marble make-tiny-{sd3,flux,qwen-image,wan} --out D` (see --help of each)."
            )
        },
        args=None if args is None else argv,  # None: LightningCLI reads sys.argv itself
        run=True,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
