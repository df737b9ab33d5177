"""Loading VPT weights: OpenAI ``.weights`` files, MineStudio Lightning checkpoints, plain state dicts,
MineStudio's Hugging Face layout (``config.json`` + ``model.safetensors``) from a local folder, and mstudio's
single-file ``.safetensors`` exports (config in the file's metadata). Never downloads.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from mstudio._names import unknown_names

__all__ = [
    "DIGEST_KEY", "LIGHTNING_PREFIX", "MSTUDIO_FORMAT", "check_state_dict", "check_state_values", "check_temperature",
    "from_pretrained", "load_vpt_weights", "policy_state_dict", "read_safetensors", "tensor_digest",
]

#: Prefix of the policy's keys inside a MineStudio (``MineLightning``) checkpoint.
LIGHTNING_PREFIX = "mine_policy."

#: ``metadata["format"]`` of mstudio's single-file ``.safetensors`` policy export (``mstudio.trainer``'s
#: ``export_policy``), whose ``metadata["config"]`` holds the JSON of MineStudio's ``config.json``.
MSTUDIO_FORMAT = "mstudio-policy"

#: safetensors metadata key holding :func:`tensor_digest` of the file's tensors (written by ``export_policy``;
#: :func:`read_safetensors` verifies it when present, and files without it load unverified).
DIGEST_KEY = "tensors_sha256"

# The entries of MineStudio's hub config.json.
_CONFIG_ENTRIES = ("policy_kwargs", "temperature", "action_space", "nucleus_prob")


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
    _raise_problems(policy, source, problems)


def check_state_values(policy: nn.Module, state: Mapping[str, object], source: str) -> None:
    """Raise ``ValueError`` listing the tensors of ``state`` that fit a tensor of ``policy`` by key and shape but
    hold NaN or inf, or are of another kind (an int, bool or complex tensor for a float parameter, which
    ``load_state_dict`` casts silently). Keys, shapes and float-to-float casts are left to ``load_state_dict``."""
    expected = policy.state_dict()
    problems = []
    for k, v in state.items():
        if k in expected and isinstance(v, Tensor) and v.shape == expected[k].shape:
            problems += _value_problems(k, expected[k], v, exact_dtype=False)
    _raise_problems(policy, source, problems)


def _raise_problems(policy: nn.Module, source: str, problems: list[str]) -> None:
    if problems:
        shown = "\n  ".join(problems[:40]) + ("\n  ..." if len(problems) > 40 else "")
        raise ValueError(
            f"{source} does not fit this {type(policy).__name__} ({len(problems)} problem(s)); is the config the "
            f"one the weights were trained with?\n  {shown}"
        )


def _describe(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else f"a {type(value).__name__}, not a tensor"


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "int"


def _tensor_problems(key: str, expected: Tensor, found: object) -> list[str]:
    """What is wrong with ``found`` as the value of ``key`` (``expected`` is the policy's own tensor)."""
    if not isinstance(found, Tensor):
        return [f"{key}: expected a tensor {expected.dtype} {tuple(expected.shape)}, found {_describe(found)}"]
    problems = []
    if tuple(found.shape) != tuple(expected.shape):
        problems.append(f"shape of {key}: expected {tuple(expected.shape)}, found {tuple(found.shape)}")
    return problems + _value_problems(key, expected, found, exact_dtype=True)


def _value_problems(key: str, expected: Tensor, found: Tensor, exact_dtype: bool) -> list[str]:
    """A dtype that differs (with ``exact_dtype``) or is of another kind, or values that are not finite."""
    if found.dtype != expected.dtype and (exact_dtype or _kind(found.dtype) != _kind(expected.dtype)):
        return [f"dtype of {key}: expected {expected.dtype}, found {found.dtype} (load_state_dict would cast "
                f"it silently; convert it explicitly, or build the policy in that dtype)"]
    if found.is_floating_point() or found.is_complex():
        bad = int((~torch.isfinite(found)).sum())
        if bad:
            return [f"{key} holds {bad} non-finite value(s) (NaN or inf) of {found.numel()}"]
    return []


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
    except OSError:
        raise  # a missing file or a directory: torch's own error names the path
    except Exception as error:  # arbitrary bytes make the unpickler fail in arbitrary ways (IndexError, KeyError, ...)
        kind = type(error).__name__
    raise ValueError(
        f"{path} is not a readable weights file: torch.load(weights_only=True) failed ({kind}); it is truncated, "
        "corrupt, not a torch checkpoint, or pickles Python objects besides tensors. mstudio never loads pickled "
        "code (it reads with weights_only=True only); re-save the tensors alone "
        "(torch.save(policy.state_dict(), path)) or as safetensors"
    )


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """The sha256 (hex) of every tensor's name, dtype, shape and bytes, in name order.

    It depends on the tensors alone, not on the file's layout or header, so it can be stored in that header
    (``metadata[DIGEST_KEY]``), and it covers the header's names, dtypes and shapes as well as the data.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        # The description fixes how many bytes follow, so the byte stream has one reading.
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _verify_digest(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """``ValueError`` when ``metadata`` records a digest of the tensors that they no longer have."""
    expected = metadata.get(DIGEST_KEY)
    if expected is None:
        return  # a file written elsewhere, without mstudio's checksum
    found = tensor_digest(tensors)
    if found != expected:
        raise ValueError(
            f"{path} is corrupt: the sha256 of its tensors is expected to be {expected} (its metadata "
            f"{DIGEST_KEY!r}) but found {found}; the file changed after it was written: export it again or restore "
            "a good copy"
        )


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the string metadata (``{}`` when none) of a ``.safetensors`` file, verified against the
    digest in its metadata when it has one (:data:`DIGEST_KEY`)."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs the 'safetensors' package (pip install safetensors); torch cannot read the format"
        ) from error
    try:
        with safe_open(str(path), "pt") as file:
            tensors, metadata = {name: file.get_tensor(name) for name in file.keys()}, dict(file.metadata() or {})
    except SafetensorError as error:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): {error}") from error
    _verify_digest(path, tensors, metadata)
    return tensors, metadata


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
        ValueError: for a ``.safetensors`` file without mstudio's metadata or whose tensors no longer match the
            sha256 its metadata records, a config this port does not support, or weights that do not fit the
            config (listing each offending key).
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
    if not isinstance(config["policy_kwargs"], dict):
        found = config["policy_kwargs"]
        raise ValueError(f"{source}: 'policy_kwargs' must be an object of MineStudio's MinecraftPolicy arguments, "
                         f"got {type(found).__name__} {found!r:.80}")
    unknown = sorted(set(config) - set(_CONFIG_ENTRIES))
    if unknown:
        raise ValueError(f"{source}: unknown entries {unknown_names(unknown, _CONFIG_ENTRIES)}; accepted: "
                         f"{list(_CONFIG_ENTRIES)}")
    for name in ("action_space", "nucleus_prob"):
        if config.get(name) is not None:
            raise ValueError(f"{source}: {name!r} must be null or absent (only the default action space and no "
                             f"nucleus sampling are supported), got {config[name]!r}")
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
    try:
        config = json.loads(config_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON (truncated or corrupt?): {error}") from None
    return _check_config(config, str(config_path))


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
