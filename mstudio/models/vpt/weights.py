"""Loading VPT weights: OpenAI ``.weights`` files, MineStudio Lightning checkpoints, plain state dicts, and
MineStudio's Hugging Face layout (``config.json`` + ``model.safetensors``) from a local folder. Never downloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

#: Prefix of the policy's keys inside a MineStudio (``MineLightning``) checkpoint.
LIGHTNING_PREFIX = "mine_policy."


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
    """Raise ``ValueError`` listing missing keys, unexpected keys and shape mismatches (expected vs found)."""
    expected = policy.state_dict()
    problems = [f"missing {k} (expected {tuple(v.shape)})" for k, v in expected.items() if k not in state]
    problems += [f"unexpected {k} (found {tuple(v.shape)})" for k, v in state.items() if k not in expected]
    problems += [
        f"shape of {k}: expected {tuple(v.shape)}, found {tuple(state[k].shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if problems:
        shown = "\n  ".join(problems[:40]) + ("\n  ..." if len(problems) > 40 else "")
        raise ValueError(
            f"{source} does not fit this {type(policy).__name__} ({len(problems)} problem(s)); is the config the "
            f"one the weights were trained with?\n  {shown}"
        )


def load_vpt_weights(policy: nn.Module, path: str | Path) -> nn.Module:
    """Load a VPT checkpoint into ``policy`` in place (strictly) and return it.

    Args:
        policy: a :class:`~mstudio.models.VPTPolicy` built with the checkpoint's config.
        path: an OpenAI VPT ``.weights`` file, a MineStudio Lightning ``.ckpt`` (keys ``mine_policy.*``), or a
            ``torch.save``-d plain state dict; read with ``torch.load(weights_only=True)`` (no pickled code).

    Raises:
        ValueError: when keys or shapes differ, listing each offending key with expected and found shapes.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or a Lightning checkpoint")
    state = policy_state_dict(checkpoint)
    check_state_dict(policy, state, str(path))
    policy.load_state_dict(state, strict=True)
    return policy


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file (needs the optional ``safetensors`` package)."""
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs the 'safetensors' package (pip install safetensors); torch cannot read the format"
        ) from error
    return load_file(str(path))


def from_pretrained(cls: type, local_dir: str | Path) -> nn.Module:
    """Build ``cls(**config)`` from ``local_dir/config.json`` and load ``local_dir/model.safetensors``.

    ``config.json`` is MineStudio's ``PyTorchModelHubMixin`` layout: ``{"policy_kwargs": {...}, ...}`` with an
    optional ``temperature``. Falls back to ``pytorch_model.bin`` (read with ``weights_only=True``).
    """
    local_dir = Path(local_dir)
    config_path = local_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found; from_pretrained reads a local folder (config.json + model.safetensors) "
            "and never downloads"
        )
    config = json.loads(config_path.read_text())
    if "policy_kwargs" not in config:
        raise ValueError(f"{config_path} has no 'policy_kwargs' (keys: {sorted(config)})")
    unknown = sorted(set(config) - {"policy_kwargs", "temperature", "action_space", "nucleus_prob"})
    if unknown:
        raise ValueError(f"{config_path}: unsupported entries {unknown}")
    if config.get("action_space") is not None or config.get("nucleus_prob") is not None:
        raise ValueError(f"{config_path}: only the default action space and no nucleus sampling are supported")
    policy = cls(temperature=config.get("temperature", 1.0), **config["policy_kwargs"])
    weights = local_dir / "model.safetensors"
    if weights.is_file():
        state = read_safetensors(weights)
    elif (local_dir / "pytorch_model.bin").is_file():
        weights = local_dir / "pytorch_model.bin"
        state = policy_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        raise FileNotFoundError(f"{local_dir} has neither model.safetensors nor pytorch_model.bin")
    check_state_dict(policy, state, str(weights))
    policy.load_state_dict(state, strict=True)
    return policy
