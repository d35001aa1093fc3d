"""Export the trained policy LoRA adapter for use outside marble-lightning.

Two output formats:

* ``"diffusers"`` (SD3, FLUX, Qwen-Image and Wan backbones):
  ``<out_dir>/pytorch_lora_weights.safetensors`` written by the family pipeline's
  ``save_lora_weights`` (``StableDiffusion3Pipeline``, ``FluxPipeline``, ``QwenImagePipeline``,
  ``WanPipeline``) with keys ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` and the
  adapter's ``LoraConfig`` (rank, alpha, targets) in the file's metadata, so that
  ``pipeline.load_lora_weights(out_dir)`` restores the exact scale ``alpha / r``.
* ``"peft"`` (any other backbone, e.g. the toy UNet): ``<out_dir>/adapter_model.safetensors``
  with keys ``base_model.model.<module>.lora_A.weight`` plus ``adapter_config.json``, the layout
  of ``PeftModel.save_pretrained``, loadable with ``PeftModel.from_pretrained(denoiser, out_dir)``;
  and beside it the same adapter in diffusers' layout, ``pytorch_lora_weights.safetensors``
  (keys ``transformer.<module>.lora_A.weight``, the ``LoraConfig`` in the file's
  ``lora_adapter_metadata``), so that diffusers' model-level loader
  ``denoiser.load_lora_adapter(out_dir, use_safetensors=True)`` restores the exact scale
  ``alpha / r`` too. ``adapter_model.safetensors`` carries the config in its metadata as well
  (under ``base_model.model.``), for ``load_lora_adapter(out_dir,
  weight_name="adapter_model.safetensors", prefix="base_model.model")``. Without that metadata
  diffusers silently builds the adapter with ``lora_alpha = r`` (scale 1).

The source is either a live module (a ``MarbleDiffusionModule``, a backbone, or the denoiser
itself; the adapter is read through peft's ``get_peft_model_state_dict``) or a Lightning
checkpoint: a file (read with ``torch.load(weights_only=True)``) or a sharded run's
distributed-checkpoint folder (:func:`read_checkpoint`); the adapter is found by its
parameter names ``...denoiser.<module>.lora_{A,B}.<adapter>.weight``, the rank from the tensor
shapes and ``lora_alpha`` from the checkpoint's hyper-parameters, the run's saved
``config.yaml`` or the ``lora_alpha`` argument).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = [
    "DIFFUSERS_LORA_FILE",
    "LORA_ADAPTER_METADATA_KEY",
    "PEFT_LORA_FILE",
    "export_lora",
    "lora_config_dict",
    "lora_state_from_model",
    "read_checkpoint",
]

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
"""File name diffusers' ``load_lora_weights(directory)`` looks for."""
PEFT_LORA_FILE = "adapter_model.safetensors"
"""File name of a peft adapter directory."""

_FORMATS = ("auto", "diffusers", "peft")

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
"""safetensors metadata key under which diffusers reads an adapter's ``LoraConfig`` (JSON)."""


def lora_config_dict(
    rank: int,
    alpha: float,
    target_modules: list[str],
    rank_pattern: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The ``LoraConfig`` keyword arguments that describe an exported adapter.

    Args:
        rank: LoRA rank ``r`` (the most common one when ranks differ).
        alpha: ``lora_alpha``; the adapter's output is scaled by ``alpha / r``.
        target_modules: full module names (relative to the denoiser) that carry the adapter.
        rank_pattern: per-module ranks that differ from ``rank``.

    Returns:
        A JSON-serialisable dict accepted by ``peft.LoraConfig(**d)``.
    """
    return {
        "r": int(rank),
        "lora_alpha": float(alpha) if float(alpha) != int(alpha) else int(alpha),
        "target_modules": sorted(target_modules),
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }


def _packed(config: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{"<prefix>.<key>": value}``: diffusers keeps the metadata entries under its ``prefix``."""
    return {f"{prefix}.{key}": value for key, value in config.items()}


def _unwrap_denoiser(source: nn.Module) -> nn.Module:
    """Find the adapted network inside a module, a backbone or a peft wrapper."""
    module = source
    for attribute in ("backbone", "denoiser"):
        inner = getattr(module, attribute, None)
        if isinstance(inner, nn.Module):
            module = inner
    # a peft PeftModel: the adapted network is base_model.model
    base = getattr(module, "base_model", None)
    if base is not None and hasattr(base, "model") and hasattr(module, "peft_config"):
        module = base.model
    return module


def lora_state_from_model(
    source: nn.Module, adapter_name: str = "policy"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read one LoRA adapter from a live model.

    Args:
        source: a ``MarbleDiffusionModule`` (uses ``.backbone.denoiser``), a backbone
            (``.denoiser``), a peft ``PeftModel`` or the adapted network itself.
        adapter_name: the peft adapter to read.

    Returns:
        ``(state, config)``: ``state`` maps ``<module>.lora_A.weight`` (``[r, in]``) and
        ``<module>.lora_B.weight`` (``[out, r]``) to detached CPU tensors (module names relative
        to the denoiser, adapter name removed); ``config`` is :func:`lora_config_dict`.

    Raises:
        ValueError: the network has no peft adapter called ``adapter_name``.
    """
    from peft.utils import get_peft_model_state_dict

    denoiser = _unwrap_denoiser(source)
    configs = getattr(denoiser, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(
            f"export_lora: {type(denoiser).__name__} has no LoRA adapter named {adapter_name!r} "
            f"(adapters: {sorted(configs)})"
        )
    peft_cfg = configs[adapter_name]
    raw = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    state = {k: v.detach().to("cpu").contiguous() for k, v in raw.items()}
    if not state:
        raise ValueError(f"export_lora: adapter {adapter_name!r} has no LoRA weights")
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    rank_pattern = {k: int(v) for k, v in (getattr(peft_cfg, "rank_pattern", None) or {}).items()}
    config = lora_config_dict(peft_cfg.r, peft_cfg.lora_alpha, targets, rank_pattern)
    return state, config


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


def _lora_state_from_checkpoint(
    state_dict: Mapping[str, Tensor], adapter_name: str, path: Path
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Collect ``<module>.lora_{A,B}.weight`` of one adapter from a checkpoint's state dict."""
    state: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for key, value in state_dict.items():
        match = _LORA_KEY.match(key)
        if match is None or match["adapter"] != adapter_name:
            continue
        module = match["module"]
        if "denoiser." not in module:
            continue
        module = module.split("denoiser.", 1)[1]
        module = module.removeprefix("base_model.model.")
        state[f"{module}.lora_{match['ab']}.weight"] = value.detach().to("cpu").contiguous()
        if match["ab"] == "A":
            ranks[module] = int(value.shape[0])
    if not state:
        sample = [k for k in state_dict if ".lora_" in k][:5]
        raise ValueError(
            f"export_lora: no weights of LoRA adapter {adapter_name!r} under a 'denoiser.' prefix "
            f"in checkpoint {str(path)!r} (LoRA keys seen: {sample or 'none'})"
        )
    missing = sorted(m for m in ranks if f"{m}.lora_B.weight" not in state)
    if missing or len(ranks) * 2 != len(state):
        raise ValueError(
            f"export_lora: checkpoint {str(path)!r} has unpaired LoRA A/B weights (e.g. "
            f"{missing[:3]})"
        )
    return state, ranks


def _find_in_config(config: Mapping[str, Any], key: str) -> Any:
    """Find ``key`` in a LightningCLI config (``model: {init_args: {...}}`` or ``model: {...}``)."""
    model = config.get("model", config)
    if isinstance(model, Mapping):
        for section in (model.get("init_args"), model):
            if isinstance(section, Mapping) and key in section:
                return section[key]
    return None


def _run_config(ckpt_path: Path, config: str | Path | None) -> dict[str, Any]:
    """The run's LightningCLI config: ``config`` if given, else ``config.yaml`` above the
    checkpoint."""
    import yaml

    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"export_lora: config file {str(path)!r} does not exist")
    else:
        candidates = [p / "config.yaml" for p in list(ckpt_path.parents)[:3]]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return {}
    loaded = yaml.safe_load(path.read_text()) or {}
    return loaded if isinstance(loaded, dict) else {}


_DIFFUSERS_PIPELINES = {
    "SD3Backbone": "StableDiffusion3Pipeline",
    "SD3Transformer2DModel": "StableDiffusion3Pipeline",
    "FluxBackbone": "FluxPipeline",
    "FluxTransformer2DModel": "FluxPipeline",
    "QwenImageBackbone": "QwenImagePipeline",
    "QwenImageTransformer2DModel": "QwenImagePipeline",
    "WanBackbone": "WanPipeline",
    "WanTransformer3DModel": "WanPipeline",
}
"""Backbone / transformer class name -> the diffusers pipeline whose ``save_lora_weights`` writes
the ``"diffusers"`` format (and whose ``load_lora_weights`` reads it back)."""


def _is_sd3_state(state: Mapping[str, Tensor]) -> bool:
    return any(".attn.add_q_proj." in k or ".attn.to_add_out." in k for k in state) or any(
        k.startswith("transformer_blocks.") for k in state
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as a dict, read with ``weights_only=True``: a ``.ckpt`` file, or the
    distributed-checkpoint folder of a sharded run (``MarbleModelParallelStrategy``), whose
    ``state_dict`` tensors (the adapters) are read whole in this one process and merged with the
    folder's ``meta.pt`` (hyper-parameters, callbacks).

    Raises:
        FileNotFoundError: ``path`` is neither a file nor such a folder.
    """
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if not (path.is_dir() and (path / ".metadata").is_file()):
        raise FileNotFoundError(
            f"export_lora: checkpoint {str(path)!r} does not exist (expected a .ckpt file or a "
            "sharded checkpoint folder holding .metadata)"
        )
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    prefix = "state_dict."
    tensors = {
        fqn[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for fqn, meta in reader.read_metadata().state_dict_metadata.items()
        if fqn.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    load({"state_dict": tensors}, storage_reader=reader, no_dist=True)
    meta = path / "meta.pt"
    checkpoint = torch.load(meta, map_location="cpu", weights_only=True) if meta.is_file() else {}
    checkpoint["state_dict"] = tensors
    return checkpoint


def export_lora(
    source: nn.Module | str | Path,
    out_dir: str | Path,
    *,
    adapter_name: str = "policy",
    format: str = "auto",
    config: str | Path | None = None,
    lora_alpha: float | None = None,
    diffusers_prefix: str = "transformer",
    ema: bool = False,
) -> Path:
    """Write one LoRA adapter of a trained model to ``out_dir``.

    Args:
        source: a live module (``MarbleDiffusionModule``, backbone or denoiser with a peft
            adapter) or the path of a Lightning checkpoint (a ``.ckpt`` file or a sharded run's
            checkpoint folder).
        out_dir: output directory (created).
        adapter_name: adapter to export (``"policy"``: the trained policy).
        format: ``"diffusers"`` (SD3 LoRA file for ``load_lora_weights``), ``"peft"``
            (``PeftModel`` adapter directory) or ``"auto"``: diffusers for an SD3, FLUX,
            Qwen-Image or Wan backbone/transformer, peft otherwise.
        config: checkpoint sources only: the run's LightningCLI config (default: the
            ``config.yaml`` the CLI saved next to the run's ``checkpoints/`` folder), read for
            ``lora_alpha`` and the backbone class.
        lora_alpha: checkpoint sources only: overrides the alpha found in the checkpoint/config.
        diffusers_prefix: peft format only: key prefix of the diffusers-layout copy
            (``pytorch_lora_weights.safetensors``); the ``prefix`` argument of diffusers'
            ``load_lora_adapter``, whose default is ``"transformer"`` (also for a UNet).
        ema: checkpoint sources only: export the policy EMA of
            :class:`~marble_lightning.callbacks.PolicyEMACallback` instead of the policy.

    Returns:
        Path of the written weights file.

    Raises:
        FileNotFoundError: the checkpoint or config file does not exist.
        ValueError: unknown ``format``, no such adapter, or alpha not determinable.
    """
    if format not in _FORMATS:
        raise ValueError(f"export_lora: format={format!r}; expected one of {_FORMATS}")
    out_dir = Path(out_dir)
    if ema and (isinstance(source, nn.Module) or adapter_name != "policy"):
        raise ValueError(
            "export_lora: ema=True exports the policy EMA of a checkpoint (a .ckpt path, adapter "
            "'policy')"
        )
    if isinstance(source, nn.Module):
        state, lora_cfg = lora_state_from_model(source, adapter_name)
        backbone = getattr(source, "backbone", source)
        # issue 20: any family with a diffusers LoRA loader (SD3, FLUX, Qwen-Image, Wan)
        pipeline_name = _DIFFUSERS_PIPELINES.get(
            type(backbone).__name__
        ) or _DIFFUSERS_PIPELINES.get(type(_unwrap_denoiser(source)).__name__)
    else:
        path = Path(source)
        checkpoint = read_checkpoint(path)
        state_dict = checkpoint.get("state_dict", checkpoint)
        if ema:  # the EMA tensors carry the policy tensors' checkpoint names
            from marble_lightning.callbacks.policy_ema import ema_state_from_checkpoint

            state_dict = {**state_dict, **ema_state_from_checkpoint(checkpoint, path)}
        state, ranks = _lora_state_from_checkpoint(state_dict, adapter_name, path)
        run_config = _run_config(path, config)
        hparams = checkpoint.get("hyper_parameters") or {}
        alpha = lora_alpha
        if alpha is None:
            alpha = hparams.get("lora_alpha") if isinstance(hparams, Mapping) else None
        if alpha is None:
            alpha = _find_in_config(run_config, "lora_alpha")
        if alpha is None:
            raise ValueError(
                f"export_lora: cannot tell lora_alpha for checkpoint {str(path)!r}: not in its "
                "hyper-parameters and no run config.yaml with model.lora_alpha was found; pass "
                "lora_alpha= (--lora-alpha) or config="
            )
        counts: dict[int, int] = {}
        for r in ranks.values():
            counts[r] = counts.get(r, 0) + 1
        rank = max(counts, key=counts.get)
        rank_pattern = {m: r for m, r in ranks.items() if r != rank}
        lora_cfg = lora_config_dict(rank, alpha, sorted(ranks), rank_pattern)
        backbone_cfg = _find_in_config(run_config, "backbone")
        class_path = backbone_cfg.get("class_path", "") if isinstance(backbone_cfg, Mapping) else ""
        if class_path:
            pipeline_name = _DIFFUSERS_PIPELINES.get(class_path.rsplit(".", 1)[-1])
        else:
            pipeline_name = "StableDiffusion3Pipeline" if _is_sd3_state(state) else None
    if format == "auto":
        format = "diffusers" if pipeline_name else "peft"
    out_dir.mkdir(parents=True, exist_ok=True)
    if format == "diffusers":
        import diffusers

        # the family's own pipeline writes the file its load_lora_weights reads (SD3 by default)
        getattr(diffusers, pipeline_name or "StableDiffusion3Pipeline").save_lora_weights(
            str(out_dir),
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=dict(lora_cfg),
            weight_name=DIFFUSERS_LORA_FILE,
            safe_serialization=True,
        )
        return out_dir / DIFFUSERS_LORA_FILE
    # the LoraConfig rides in both files' metadata under diffusers' key, so that diffusers' own
    # loader (``load_lora_adapter``) builds the adapter with lora_alpha / r, not its alpha-less
    # default of scale 1 (which it silently falls back to when the metadata is missing)
    weights = {f"base_model.model.{k}": v for k, v in state.items()}
    save_file(
        weights,
        str(out_dir / PEFT_LORA_FILE),
        metadata={
            "format": "pt",
            LORA_ADAPTER_METADATA_KEY: json.dumps(
                _packed(lora_cfg, "base_model.model"), sort_keys=True
            ),
        },
    )
    # diffusers' layout next to it: ``<prefix>.<module>.lora_{A,B}.weight`` with the prefixed
    # config, the file ``load_lora_adapter(out_dir, use_safetensors=True)`` picks in a folder
    prefixed = {f"{diffusers_prefix}.{k}": v for k, v in state.items()}
    save_file(
        prefixed,
        str(out_dir / DIFFUSERS_LORA_FILE),
        metadata={
            "format": "pt",
            LORA_ADAPTER_METADATA_KEY: json.dumps(
                _packed(lora_cfg, diffusers_prefix), sort_keys=True
            ),
        },
    )
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        **lora_cfg,
    }
    (out_dir / "adapter_config.json").write_text(
        json.dumps(adapter_config, indent=2, sort_keys=True)
    )
    return out_dir / PEFT_LORA_FILE
