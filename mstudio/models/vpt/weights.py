"""Loading VPT weights: OpenAI ``.weights`` files, MineStudio Lightning checkpoints, plain state dicts,
MineStudio's Hugging Face layout (``config.json`` + ``model.safetensors``) from a local folder, and mstudio's
single-file ``.safetensors`` exports (config in the file's metadata). Never downloads.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "LIGHTNING_PREFIX", "MSTUDIO_FORMAT", "check_state_dict", "check_temperature", "from_pretrained",
    "load_vpt_weights", "policy_state_dict", "read_safetensors",
]

#: Prefix of the policy's keys inside a MineStudio (``MineLightning``) checkpoint.
LIGHTNING_PREFIX = "mine_policy."

#: ``metadata["format"]`` of mstudio's single-file ``.safetensors`` policy export (``mstudio.trainer``'s
#: ``export_policy``), whose ``metadata["config"]`` holds the JSON of MineStudio's ``config.json``.
MSTUDIO_FORMAT = "mstudio-policy"


def policy_state_dict(checkpoint: Mapping[str, object]) -> dict[str, Tensor]:
    """The policy tensors of a loaded checkpoint: a Lightning ``{"state_dict": {"mine_policy.*": ...}}``, or a
    state dict whose keys may carry the ``mine_policy.`` prefix (OpenAI ``.weights`` files carry none)."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint['state_dict'] is a {type(state).__name__}, not a mapping of tensors")
    if any(k.startswith(LIGHTNING_PREFIX) for k in state):
        state = {k[len(LIGHTNING_PREFIX):]: v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}
    return dict(state)


def check_state_dict(policy: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Raise ``ValueError`` listing missing keys, unexpected keys, shape mismatches (expected vs found), dtype
    mismatches (which ``load_state_dict`` would cast silently: an int64, bool or complex tensor into a float
    parameter) and tensors holding NaN or inf (with how many)."""
    expected = policy.state_dict()
    problems = [f"missing {k} (expected {tuple(v.shape)})" for k, v in expected.items() if k not in state]
    problems += [f"unexpected {k} (found {_describe(v)})" for k, v in state.items() if k not in expected]
    for k, v in expected.items():
        if k in state:
            problems += _tensor_problems(k, v, state[k])
    if problems:
        shown = "\n  ".join(problems[:40]) + ("\n  ..." if len(problems) > 40 else "")
        raise ValueError(
            f"{source} does not fit this {type(policy).__name__} ({len(problems)} problem(s)); is the config the "
            f"one the weights were trained with?\n  {shown}"
        )


def _describe(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else f"a {type(value).__name__}, not a tensor"


def _tensor_problems(key: str, expected: Tensor, found: object) -> list[str]:
    """What is wrong with ``found`` as the value of ``key`` (``expected`` is the policy's own tensor)."""
    if not isinstance(found, Tensor):
        return [f"{key}: expected a tensor {expected.dtype} {tuple(expected.shape)}, found {_describe(found)}"]
    problems = []
    if tuple(found.shape) != tuple(expected.shape):
        problems.append(f"shape of {key}: expected {tuple(expected.shape)}, found {tuple(found.shape)}")
    if found.dtype != expected.dtype:
        problems.append(f"dtype of {key}: expected {expected.dtype}, found {found.dtype} (load_state_dict would cast "
                        f"it silently; convert it explicitly, or build the policy in that dtype)")
    elif found.is_floating_point() or found.is_complex():
        bad = int((~torch.isfinite(found)).sum())
        if bad:
            problems.append(f"{key} holds {bad} non-finite value(s) (NaN or inf) of {found.numel()}")
    return problems


def load_vpt_weights(policy: nn.Module, path: str | Path) -> nn.Module:
    """Load a VPT checkpoint into ``policy`` in place (strictly) and return it.

    Args:
        policy: a :class:`~mstudio.models.VPTPolicy` built with the checkpoint's config.
        path: an OpenAI VPT ``.weights`` file, a MineStudio Lightning ``.ckpt`` (keys ``mine_policy.*``), or a
            ``torch.save``-d plain state dict; read with ``torch.load(weights_only=True)`` (no pickled code).

    Raises:
        ValueError: when keys or shapes differ, listing each offending key with expected and found shapes.
    """
    checkpoint = _torch_load(Path(path))
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or a Lightning checkpoint")
    state = policy_state_dict(checkpoint)
    check_state_dict(policy, state, str(path))
    policy.load_state_dict(state, strict=True)
    return policy


def _torch_load(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, with torch's read errors turned into a ``ValueError``.

    torch's own message for an unreadable file suggests retrying with ``weights_only=False``, which would run
    whatever code the file pickles; that hint is never passed on (the error is raised ``from None``).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, UnicodeDecodeError) as error:
        kind = type(error).__name__
    raise ValueError(
        f"{path} is not a readable weights file: torch.load(weights_only=True) failed ({kind}); it is truncated, "
        "corrupt, not a torch checkpoint, or pickles Python objects besides tensors. mstudio never loads pickled "
        "code (it reads with weights_only=True only); re-save the tensors alone "
        "(torch.save(policy.state_dict(), path)) or as safetensors"
    )


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the string metadata (``{}`` when none) of a ``.safetensors`` file."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs the 'safetensors' package (pip install safetensors); torch cannot read the format"
        ) from error
    try:
        with safe_open(str(path), "pt") as file:
            return {name: file.get_tensor(name) for name in file.keys()}, dict(file.metadata() or {})
    except SafetensorError as error:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): {error}") from error


def from_pretrained(cls: type, path: str | Path) -> nn.Module:
    """Build ``cls(temperature=t, **policy_kwargs)`` from a local folder or file and load its weights.

    Args:
        cls: the policy class (:class:`~mstudio.models.VPTPolicy`).
        path: either a folder in MineStudio's ``PyTorchModelHubMixin`` layout, ``config.json`` (``{"policy_kwargs":
            {...}, "temperature": t}``, ``temperature`` optional) beside ``model.safetensors`` (or
            ``pytorch_model.bin``, read with ``weights_only=True``); or one ``.safetensors`` file written by mstudio's
            exporter, whose metadata holds ``{"format": "mstudio-policy", "config": <the same JSON as config.json>}``.

    Raises:
        FileNotFoundError: when the folder has no ``config.json`` or no weights file (nothing is ever downloaded).
        ValueError: for a ``.safetensors`` file without mstudio's metadata, a config this port does not support,
            or weights that do not fit the config (listing each offending key).
    """
    path = Path(path)
    if path.suffix == ".safetensors" and not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; from_pretrained reads local files and never downloads")
        state, metadata = read_safetensors(path)
        config, weights = _exported_config(path, metadata), path
    else:
        config = _hub_config(path)
        state, weights = _hub_weights(path)
    policy = cls(temperature=config.get("temperature", 1.0), **config["policy_kwargs"])
    check_state_dict(policy, state, str(weights))
    policy.load_state_dict(state, strict=True)
    return policy


def _check_config(config: object, source: str) -> dict:
    """Raise ``ValueError`` unless ``config`` is a MineStudio hub config this port supports; return it."""
    if not isinstance(config, dict) or "policy_kwargs" not in config:
        found = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{source} has no 'policy_kwargs' (keys: {found})")
    unknown = sorted(set(config) - {"policy_kwargs", "temperature", "action_space", "nucleus_prob"})
    if unknown:
        raise ValueError(f"{source}: unsupported entries {unknown}")
    if config.get("action_space") is not None or config.get("nucleus_prob") is not None:
        raise ValueError(f"{source}: only the default action space and no nucleus sampling are supported")
    if "temperature" in config:
        check_temperature(config["temperature"], f"{source}: 'temperature'")
    return config


def check_temperature(temperature: object, what: str = "temperature") -> float:
    """``temperature`` as a float; ``ValueError`` (naming ``what``) unless it is a finite number > 0 (it divides
    the action logits: 0 gives inf or NaN logits, a negative value inverts the policy)."""
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not (ok and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{what} must be a finite number > 0 (it divides the action logits), got {temperature!r}")
    return float(temperature)


def _hub_config(local_dir: Path) -> dict:
    config_path = local_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found; from_pretrained reads a local folder (config.json + model.safetensors) or an "
            "mstudio .safetensors export, and never downloads (for .weights or .ckpt files use load_vpt_weights)"
        )
    return _check_config(json.loads(config_path.read_text()), str(config_path))


def _hub_weights(local_dir: Path) -> tuple[dict[str, Tensor], Path]:
    """The tensors of ``local_dir``'s ``model.safetensors`` (preferred) or ``pytorch_model.bin``, and that path."""
    if (local_dir / "model.safetensors").is_file():
        return read_safetensors(local_dir / "model.safetensors")[0], local_dir / "model.safetensors"
    if (local_dir / "pytorch_model.bin").is_file():
        checkpoint = _torch_load(local_dir / "pytorch_model.bin")
        if not isinstance(checkpoint, Mapping):
            raise ValueError(f"{local_dir / 'pytorch_model.bin'} holds a {type(checkpoint).__name__}, not a state dict")
        return policy_state_dict(checkpoint), local_dir / "pytorch_model.bin"
    raise FileNotFoundError(f"{local_dir} has neither model.safetensors nor pytorch_model.bin")


def _exported_config(path: Path, metadata: Mapping[str, str]) -> dict:
    """The config in an mstudio export's safetensors metadata."""
    if metadata.get("format") != MSTUDIO_FORMAT or "config" not in metadata:
        raise ValueError(
            f"{path} holds weights but no config (its safetensors metadata keys are {sorted(metadata)}, "
            f"format {metadata.get('format')!r}; an mstudio export has format {MSTUDIO_FORMAT!r} and 'config'), so "
            "the architecture is unknown: put it in a folder as model.safetensors beside MineStudio's config.json, "
            "or build the policy with its config and load the tensors with "
            "policy.load_state_dict(safetensors.torch.load_file(path))"
        )
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: safetensors metadata 'config' is not JSON ({error})") from error
    return _check_config(config, f"{path} (metadata 'config')")
