"""Adversarial cases: loading VPT weights and architectures (exports, hub folders, ``.weights`` files, configs).

Every attack builds its files from the ``tiny`` VPT preset in the case's own directory. Helpers that corrupt
safetensors files (:func:`zero_bytes`, :func:`rewrite_header`) and the code-running pickle
(:class:`RunsCode`) are shared with ``cases_checkpoint``.
"""

from __future__ import annotations

import functools
import json
import math
import random
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from mstudio.models import VPTConfig, VPTPolicy, load_vpt_weights, vpt_configs
from mstudio.trainer.build import policy_config
from mstudio.trainer.checkpoint import export_policy
from tests.adversarial.harness import Case, Handled, Refused

KEY = "pi_head.camera.linear_layer.bias"
FILE = "policy.safetensors"
# torch's advice for a file weights_only=True cannot read: following it would run the file's pickled code.
_UNSAFE_HINTS = ("weights_only` set to `False`", "will likely succeed")


class RunsCode:
    """Pickles to ``exec(<create marker>)``: unpickling it runs code (the marker file shows that it did)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def tiny() -> VPTPolicy:
    """The ``tiny`` VPT, always the same initial weights."""
    torch.manual_seed(0)
    return VPTPolicy.from_preset("tiny")


def export(tmp: Path, edit: Callable[[dict], None] | None = None, config: dict | None = None) -> Path:
    """``tmp/policy.safetensors``: the tiny policy exported as the Trainer exports it, after ``edit(state)``."""
    policy = tiny()
    state = policy.state_dict()
    if edit is not None:
        edit(state)
    return export_policy(tmp / FILE, state, policy_config(policy) if config is None else config)


def data_start(path: Path) -> int:
    """Offset of a safetensors file's tensor data (after the 8-byte length and the JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def zero_bytes(path: Path, fraction: float, count: int = 64) -> None:
    """Zero ``count`` bytes of the tensor data at ``fraction`` of it (moved to the nearest non-zero run, so
    the file really changes: biases start at zero, and zeroing zeros is no corruption)."""
    raw = bytearray(path.read_bytes())
    start = data_start(path)
    offset = start + int(fraction * (len(raw) - start - count))
    while not any(raw[offset:offset + count]):
        offset = offset - count if offset + 2 * count > len(raw) else offset + count
    raw[offset:offset + count] = bytes(count)
    path.write_bytes(bytes(raw))


def flip_bit(path: Path, fraction: float) -> None:
    """Flip the lowest bit of the tensor-data byte at ``fraction`` of the data."""
    raw = bytearray(path.read_bytes())
    start = data_start(path)
    raw[start + int(fraction * (len(raw) - start - 1))] ^= 1
    path.write_bytes(bytes(raw))


def truncate(path: Path, keep: float) -> None:
    """Keep the first ``keep`` fraction of ``path``'s bytes."""
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Apply ``edit`` to a safetensors file's JSON header, keeping its tensor data."""
    raw = path.read_bytes()
    start = data_start(path)
    header = json.loads(raw[8:start])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[start:])


def _error_chain(error: BaseException) -> str:
    texts = []
    while error is not None:
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def safely(load: Callable[[], Any], marker: Path) -> Any:
    """``load()``; an ``AssertionError`` instead (an unclear outcome) when a pickle ran code, or when the error
    (or one it chains) passes on torch's hint to retry with ``weights_only=False``."""
    try:
        result = load()
    except Exception as error:
        assert not marker.exists(), "the pickled code ran"
        chain = _error_chain(error)
        assert not any(hint in chain for hint in _UNSAFE_HINTS), f"the error passes on torch's unsafe hint: {chain}"
        raise
    assert not marker.exists(), "the pickled code ran"
    return result


def same_weights(policy: VPTPolicy, tmp: Path) -> None:
    """A ``Handled`` check: ``policy`` holds the tiny policy's weights."""
    del tmp
    expected = tiny().state_dict()
    for name, tensor in policy.state_dict().items():
        assert torch.equal(tensor, expected[name]), f"{name} differs from the exported weights"


# ---- exported policy files -------------------------------------------------------------------------------------

def _load_export(tmp: Path, corrupt: Callable[[Path], None] = lambda path: None, **export_args: Any) -> VPTPolicy:
    path = export(tmp, **export_args)
    corrupt(path)
    return VPTPolicy.from_pretrained(path)


def _with(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        state[key] = make(state[key])
    return edit


def _set(index: int, value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor.view(-1)[index] = value
        return tensor
    return make


def _drop(key: str) -> Callable[[dict], None]:
    return lambda state: state.pop(key)


def _add(key: str) -> Callable[[dict], None]:
    return lambda state: state.update({key: torch.zeros(3)})


def _write_random(path: Path, seed: int = 0) -> None:
    path.write_bytes(random.Random(seed).randbytes(4096))


def _claim_more_bytes(header: dict) -> None:
    header[KEY]["data_offsets"][1] += 4096


def _reshape_key(header: dict) -> None:
    header[KEY]["shape"] = [11, 11]


def _retype_key(header: dict) -> None:
    header[KEY]["dtype"] = "I32"


def _huge_header_length(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes((10**12).to_bytes(8, "little") + raw[8:])


def _foreign_export(tmp: Path) -> VPTPolicy:
    """A safetensors export written by another tool: mstudio's metadata but no checksum."""
    from safetensors.torch import save_file

    policy = tiny()
    metadata = {"format": "mstudio-policy", "config": json.dumps(policy_config(policy))}
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, str(tmp / FILE), metadata=metadata)
    return VPTPolicy.from_pretrained(tmp / FILE)


def _set_metadata(**entries: str) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        rewrite_header(path, lambda header: header["__metadata__"].update(entries))
    return corrupt


def _drop_metadata(key: str) -> Callable[[Path], None]:
    return lambda path: rewrite_header(path, lambda header: header["__metadata__"].pop(key))


def _config_with(**entries: Any) -> dict:
    return {**policy_config(tiny()), **entries}


EXPORTS = [
    Case("weights", "export/round-trip", _load_export, Handled(same_weights)),
    Case("weights", "export/foreign-without-checksum-loads", _foreign_export, Handled(same_weights)),
    Case("weights", "export/random-bytes", functools.partial(_load_export, corrupt=_write_random),
         Refused(ValueError, FILE, "not a valid safetensors")),
    Case("weights", "export/empty", functools.partial(_load_export, corrupt=lambda p: p.write_bytes(b"")),
         Refused(ValueError, FILE, "not a valid safetensors")),
    Case("weights", "export/truncated-in-header", functools.partial(_load_export, corrupt=lambda p: truncate(p, 0.001)),
         Refused(ValueError, FILE, "not a valid safetensors")),
    Case("weights", "export/truncated-half", functools.partial(_load_export, corrupt=lambda p: truncate(p, 0.5)),
         Refused(ValueError, FILE, "truncated")),
    Case("weights", "export/header-length-huge", functools.partial(_load_export, corrupt=_huge_header_length),
         Refused(ValueError, FILE, "not a valid safetensors")),
    Case("weights", "export/header-claims-more-bytes",
         functools.partial(_load_export, corrupt=lambda p: rewrite_header(p, _claim_more_bytes)),
         Refused(ValueError, FILE, "not a valid safetensors")),
    Case("weights", "export/header-reshapes-a-tensor",
         functools.partial(_load_export, corrupt=lambda p: rewrite_header(p, _reshape_key)),
         Refused(ValueError, FILE, "expected", "found")),
    Case("weights", "export/header-retypes-a-tensor",
         functools.partial(_load_export, corrupt=lambda p: rewrite_header(p, _retype_key)),
         Refused(ValueError, FILE, "expected", "found")),
    Case("weights", "export/checksum-not-hex",
         functools.partial(_load_export, corrupt=_set_metadata(tensors_sha256="xyz")),
         Refused(ValueError, FILE, "sha256", "xyz")),
    Case("weights", "export/metadata-config-not-json",
         functools.partial(_load_export, corrupt=_set_metadata(config="{policy_kwargs")),
         Refused(ValueError, FILE, "config", "not JSON")),
    Case("weights", "export/metadata-without-config",
         functools.partial(_load_export, corrupt=_drop_metadata("config")),
         Refused(ValueError, FILE, "no config")),
    Case("weights", "export/config-temperature-0", functools.partial(_load_export, config=_config_with(temperature=0)),
         Refused(ValueError, FILE, "temperature", "> 0", "got 0")),
    Case("weights", "export/config-action-space", functools.partial(_load_export, config=_config_with(action_space={})),
         Refused(ValueError, FILE, "action_space")),
    *[Case("weights", f"export/zeroed-64-bytes-at-{int(f * 100)}%",
           functools.partial(_load_export, corrupt=functools.partial(zero_bytes, fraction=f)),
           Refused(ValueError, FILE, "sha256", "expected")) for f in (0.0, 0.37, 0.5, 1.0)],
    Case("weights", "export/one-bit-flipped", functools.partial(_load_export, corrupt=lambda p: flip_bit(p, 0.61)),
         Refused(ValueError, FILE, "sha256", "expected")),
    *[Case("weights", f"export/{name}", functools.partial(_load_export, edit=_with(KEY, make)),
           Refused(ValueError, FILE, KEY, *fragments))
      for name, make, fragments in [
          ("nan", _set(3, math.nan), ("non-finite", "nan")),
          ("inf", _set(0, math.inf), ("non-finite",)),
          ("minus-inf", _set(120, -math.inf), ("non-finite",)),
          ("int64", lambda t: t.long(), ("expected torch.float32", "found torch.int64")),
          ("bool", lambda t: t.bool(), ("expected torch.float32", "found torch.bool")),
          ("complex", lambda t: t.to(torch.complex64), ("expected torch.float32", "found torch.complex64")),
          ("float64", lambda t: t.double(), ("expected torch.float32", "found torch.float64")),
          ("misshaped", lambda t: t[:120], ("expected (121,)", "found (120,)")),
      ]],
    Case("weights", "export/missing-key", functools.partial(_load_export, edit=_drop(KEY)),
         Refused(ValueError, FILE, f"missing {KEY}", "expected (121,)")),
    Case("weights", "export/extra-key", functools.partial(_load_export, edit=_add("net.extra")),
         Refused(ValueError, FILE, "unexpected net.extra", "(3,)")),
]


# ---- MineStudio hub folders (config.json + model.safetensors / pytorch_model.bin) ------------------------------

def hub(tmp: Path, config: Any = None, weights: str = "model.safetensors",
        write: Callable[[Path], None] | None = None) -> Path:
    """A hub folder ``tmp/hub``: ``config.json`` (the tiny policy's, or ``config``; a ``str`` is written as is)
    and the tiny weights as ``weights`` (or whatever ``write(path)`` writes there)."""
    folder = tmp / "hub"
    folder.mkdir()
    config = policy_config(tiny()) if config is None else config
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    path = folder / weights
    if write is not None:
        write(path)
    elif weights.endswith(".bin"):
        torch.save(tiny().state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(tiny().state_dict(), str(path))
    return folder


def _hub_load(tmp: Path, **hub_args: Any) -> VPTPolicy:
    folder = hub(tmp, **hub_args)
    return safely(lambda: VPTPolicy.from_pretrained(folder), tmp / "ran")


def _pickle_code(tmp: Path) -> Callable[[Path], None]:
    return lambda path: torch.save({"state_dict": RunsCode(tmp / "ran")}, path)


def _code_bin(tmp: Path) -> VPTPolicy:
    return _hub_load(tmp, weights="pytorch_model.bin", write=_pickle_code(tmp))


def _kwargs(**changes: Any) -> dict:
    """The tiny preset's ``config.json`` with ``policy_kwargs`` entries changed (``None`` removes one)."""
    kwargs = {**VPTConfig.preset("tiny").to_policy_kwargs(), **changes}
    return {"policy_kwargs": {k: v for k, v in kwargs.items() if v is not None}, "temperature": 1.0}


def _config_json(**entries: Any) -> Callable[[Path], VPTPolicy]:
    return functools.partial(_hub_load, config={**policy_config(tiny()), **entries})


def _policy_kwargs(**changes: Any) -> Callable[[Path], VPTPolicy]:
    return functools.partial(_hub_load, config=_kwargs(**changes))


def _no_weights(tmp: Path) -> VPTPolicy:
    folder = hub(tmp)
    (folder / "model.safetensors").unlink()
    return VPTPolicy.from_pretrained(folder)


def _config_is_dir(tmp: Path) -> VPTPolicy:
    folder = hub(tmp)
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    return VPTPolicy.from_pretrained(folder)


def _other_size(tmp: Path) -> VPTPolicy:
    small = {"policy_kwargs": VPTConfig.preset("small").to_policy_kwargs(), "temperature": 1.0}
    return _hub_load(tmp, config=small)


HUB = [
    Case("weights", "hub/round-trip-safetensors", _hub_load, Handled(same_weights)),
    Case("weights", "hub/round-trip-bin", functools.partial(_hub_load, weights="pytorch_model.bin"),
         Handled(same_weights)),
    Case("weights", "hub/pickle-runs-code", _code_bin,
         Refused(ValueError, "pytorch_model.bin", "not a readable weights")),
    Case("weights", "hub/random-bytes-bin",
         functools.partial(_hub_load, weights="pytorch_model.bin", write=_write_random),
         Refused(ValueError, "pytorch_model.bin", "not a readable weights")),
    Case("weights", "hub/truncated-bin", functools.partial(
        _hub_load, weights="pytorch_model.bin",
        write=lambda p: (torch.save(tiny().state_dict(), p), truncate(p, 0.5))),
        Refused(ValueError, "pytorch_model.bin", "not a readable weights")),
    Case("weights", "hub/random-bytes-safetensors", functools.partial(_hub_load, write=_write_random),
         Refused(ValueError, "model.safetensors", "not a valid safetensors")),
    Case("weights", "hub/no-weights-file", _no_weights,
         Refused(FileNotFoundError, "hub", "model.safetensors", "pytorch_model.bin")),
    Case("weights", "hub/config-json-is-a-directory", _config_is_dir, Refused(OSError, "config.json")),
    Case("weights", "hub/weights-of-another-size", _other_size,
         Refused(ValueError, "model.safetensors", "expected (1, 256)", "found (1, 64)")),
    Case("weights", "hub/config-json-not-json", functools.partial(_hub_load, config="{policy_kwargs"),
         Refused(ValueError, "config.json", "not valid JSON")),
    Case("weights", "hub/config-json-a-list", functools.partial(_hub_load, config=[1, 2]),
         Refused(ValueError, "config.json", "policy_kwargs", "list")),
    Case("weights", "hub/config-json-unknown-entry", _config_json(temprature=1.0),
         Refused(ValueError, "config.json", "temprature", "temperature")),
    *[Case("weights", f"hub/temperature-{name}", _config_json(temperature=value),
           Refused(ValueError, "config.json", "temperature", "> 0", f"got {value!r}"))
      for name, value in [("0", 0), ("minus-1", -1), ("nan", math.nan), ("inf", math.inf), ("str", "1.0"),
                          ("bool", True), ("null", None)]],
    Case("weights", "hub/policy-kwargs-typo", _policy_kwargs(hidsze=64),
         Refused(ValueError, "hidsze", "did you mean 'hidsize'")),
    Case("weights", "hub/hidsize-str", _policy_kwargs(hidsize="64"), Refused(ValueError, "hidsize", "int", "'64'")),
    Case("weights", "hub/hidsize-fraction", _policy_kwargs(hidsize=64.5),
         Refused(ValueError, "hidsize", "int", "64.5")),
    Case("weights", "hub/hidsize-bool", _policy_kwargs(hidsize=True), Refused(ValueError, "hidsize", "int", "True")),
    Case("weights", "hub/bool-flag-as-str", _policy_kwargs(use_pre_lstm_ln="false"),
         Refused(ValueError, "use_pre_lstm_ln", "bool", "'false'")),
    Case("weights", "hub/img-shape-missing", _policy_kwargs(img_shape=None),
         Refused(ValueError, "img_shape", "required")),
    Case("weights", "hub/img-shape-str", _policy_kwargs(img_shape="abc"), Refused(ValueError, "img_shape", "'abc'")),
    Case("weights", "hub/img-shape-2d", _policy_kwargs(img_shape=[64, 64]),
         Refused(ValueError, "img_shape", "(height, width, 3)", "(64, 64)")),
    Case("weights", "hub/img-shape-fraction", _policy_kwargs(img_shape=[64, 64, 3.5]),
         Refused(ValueError, "img_shape", "3.5")),
    Case("weights", "hub/timesteps-missing", _policy_kwargs(timesteps=None),
         Refused(ValueError, "timesteps", "required")),
    Case("weights", "hub/attention-heads-0", _policy_kwargs(attention_heads=0),
         Refused(ValueError, "attention_heads", ">= 1", "0")),
    Case("weights", "hub/impala-chans-empty", _policy_kwargs(impala_chans=[]),
         Refused(ValueError, "impala_chans", "non-empty", "()")),
    Case("weights", "hub/impala-width-0", _policy_kwargs(impala_width=0),
         Refused(ValueError, "impala_width", "> 0", "0")),
    Case("weights", "hub/group-norm-groups-3", _policy_kwargs(init_norm_kwargs={"group_norm_groups": 3}),
         Refused(ValueError, "conv_groups", "3", "(8, 16, 16)")),
]


# ---- load_vpt_weights (OpenAI .weights, Lightning .ckpt) and policy.load_state_dict -----------------------------

def _weights_file(tmp: Path, write: Callable[[Path], None]) -> VPTPolicy:
    path = tmp / "model.weights"
    write(path)
    return safely(lambda: load_vpt_weights(tiny(), path), tmp / "ran")


def _saved(value_of: Callable[[dict], Any]) -> Callable[[Path], None]:
    return lambda path: torch.save(value_of(tiny().state_dict()), path)


def _state_with(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], dict]:
    return lambda state: {**state, key: make(state[key])}


def _load_state_dict(edit: Callable[[dict], dict]) -> Callable[[Path], VPTPolicy]:
    def run(tmp: Path) -> VPTPolicy:
        del tmp
        policy = tiny()
        policy.load_state_dict(edit(tiny().state_dict()))
        return policy
    return run


LOAD = [
    Case("weights", "load-weights/round-trip", functools.partial(_weights_file, write=_saved(lambda s: s)),
         Handled(same_weights)),
    Case("weights", "load-weights/lightning-round-trip", functools.partial(
        _weights_file, write=_saved(lambda s: {"state_dict": {f"mine_policy.{k}": v for k, v in s.items()}})),
        Handled(same_weights)),
    Case("weights", "load-weights/pickle-runs-code", lambda tmp: _weights_file(tmp, _pickle_code(tmp)),
         Refused(ValueError, "model.weights", "not a readable weights")),
    *[Case("weights", f"load-weights/random-bytes-{seed}",
           functools.partial(_weights_file, write=functools.partial(_write_random, seed=seed)),
           Refused(ValueError, "model.weights", "not a readable weights")) for seed in range(8)],
    Case("weights", "load-weights/truncated", functools.partial(
        _weights_file, write=lambda p: (_saved(lambda s: s)(p), truncate(p, 0.3))),
        Refused(ValueError, "model.weights", "not a readable weights")),
    Case("weights", "load-weights/missing-file", functools.partial(_weights_file, write=lambda p: None),
         Refused(FileNotFoundError, "model.weights")),
    Case("weights", "load-weights/a-directory", functools.partial(_weights_file, write=lambda p: p.mkdir()),
         Refused(OSError, "model.weights", "directory")),
    Case("weights", "load-weights/a-bare-tensor", functools.partial(_weights_file, write=_saved(lambda s: s[KEY])),
         Refused(ValueError, "model.weights", "Tensor", "state dict")),
    Case("weights", "load-weights/state-dict-a-list", functools.partial(
        _weights_file, write=_saved(lambda s: {"state_dict": list(s.values())})),
        Refused(ValueError, "state_dict", "list", "mapping")),
    Case("weights", "load-weights/nan", functools.partial(
        _weights_file, write=_saved(_state_with(KEY, _set(7, math.nan)))),
        Refused(ValueError, "model.weights", KEY, "non-finite")),
    Case("weights", "load-weights/int64", functools.partial(
        _weights_file, write=_saved(_state_with(KEY, lambda t: t.long()))),
        Refused(ValueError, "model.weights", KEY, "torch.int64")),
    Case("weights", "load-state-dict/nan", _load_state_dict(_state_with(KEY, _set(1, math.nan))),
         Refused(ValueError, KEY, "non-finite")),
    Case("weights", "load-state-dict/inf", _load_state_dict(_state_with(KEY, _set(1, math.inf))),
         Refused(ValueError, KEY, "non-finite")),
    Case("weights", "load-state-dict/int64", _load_state_dict(_state_with(KEY, lambda t: t.long())),
         Refused(ValueError, KEY, "torch.int64", "torch.float32")),
    Case("weights", "load-state-dict/bool", _load_state_dict(_state_with(KEY, lambda t: t.bool())),
         Refused(ValueError, KEY, "torch.bool", "torch.float32")),
    Case("weights", "load-state-dict/complex", _load_state_dict(_state_with(KEY, lambda t: t.to(torch.complex64))),
         Refused(ValueError, KEY, "torch.complex64", "torch.float32")),
    Case("weights", "load-state-dict/float64-is-cast-as-torch-does", _load_state_dict(
        lambda s: {k: v.double() if v.is_floating_point() else v for k, v in s.items()}), Handled(same_weights)),
    Case("weights", "load-state-dict/missing-key", _load_state_dict(lambda s: {k: v for k, v in s.items() if k != KEY}),
         Refused(RuntimeError, "missing key", KEY)),
]


# ---- architectures: presets, VPTConfig, VPTPolicy(...) ----------------------------------------------------------

def _preset_4x(tmp: Path) -> VPTConfig:
    del tmp
    return VPTConfig.preset("4x")


def _vpt_configs_4x(tmp: Path) -> dict:
    del tmp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return vpt_configs["4x"]


def _build(*args: Any, **kwargs: Any) -> Callable[[Path], Any]:
    """A case that calls ``VPTPolicy(*args, **kwargs)``."""
    return lambda tmp: VPTPolicy(*args, **kwargs)


def _config(**fields: Any) -> Callable[[Path], Any]:
    """A case that builds a policy of the tiny preset with ``fields`` changed."""
    return lambda tmp: VPTPolicy(VPTConfig(**{**_tiny_fields(), **fields}))


def _tiny_fields() -> dict:
    preset = VPTConfig.preset("tiny")
    return {name: getattr(preset, name) for name in preset.__dataclass_fields__}


ARCHITECTURES = [
    Case("weights", "preset/4x", _preset_4x, Refused(ValueError, "4x", "tiny", "small", "1x", "2x", "3x")),
    Case("weights", "preset/vpt-configs-4x", _vpt_configs_4x,
         Refused(KeyError, "4x", "tiny", "small", "1x", "2x", "3x")),
    Case("weights", "policy/hidsize-only", _build(hidsize=64),
         Refused(ValueError, "img_shape", "timesteps", "required")),
    Case("weights", "policy/no-img-shape", _build(hidsize=64, timesteps=4),
         Refused(ValueError, "img_shape", "required")),
    Case("weights", "policy/config-as-str", _build("tiny"), Refused(TypeError, "VPTConfig", "str")),
    Case("weights", "policy/temperature-minus-1", lambda tmp: VPTPolicy.from_preset("tiny", temperature=-1),
         Refused(ValueError, "temperature", "> 0", "-1")),
    Case("weights", "config/img-shape-4-channels", _config(img_shape=(64, 64, 4)),
         Refused(ValueError, "img_shape", "(height, width, 3)", "(64, 64, 4)")),
    Case("weights", "config/img-shape-zero-height", _config(img_shape=(0, 64, 3)),
         Refused(ValueError, "img_shape", ">= 1", "(0, 64, 3)")),
    Case("weights", "config/img-shape-negative", _config(img_shape=(64, -64, 3)),
         Refused(ValueError, "img_shape", ">= 1", "(64, -64, 3)")),
    Case("weights", "config/img-shape-none", _config(img_shape=None), Refused(ValueError, "img_shape", "None")),
    Case("weights", "config/hidsize-0", _config(hidsize=0), Refused(ValueError, "hidsize", ">= 1", "0")),
    Case("weights", "config/hidsize-float", _config(hidsize=64.0), Refused(ValueError, "hidsize", "int", "64.0")),
    Case("weights", "config/attention-heads-0", _config(attention_heads=0),
         Refused(ValueError, "attention_heads", ">= 1", "0")),
    Case("weights", "config/heads-do-not-divide", _config(attention_heads=5),
         Refused(ValueError, "hidsize 64", "attention_heads 5")),
    Case("weights", "config/memory-not-above-timesteps", _config(attention_memory_size=4),
         Refused(ValueError, "attention_memory_size", "timesteps")),
    Case("weights", "config/layers-0", _config(n_recurrence_layers=0),
         Refused(ValueError, "n_recurrence_layers", ">= 1", "0")),
    Case("weights", "config/pointwise-ratio-0", _config(pointwise_ratio=0),
         Refused(ValueError, "pointwise_ratio", ">= 1", "0")),
    Case("weights", "config/conv-groups-0", _config(conv_groups=0), Refused(ValueError, "conv_groups", "0")),
    Case("weights", "config/post-pool-groups-3", _config(post_pool_groups=3),
         Refused(ValueError, "post_pool_groups", "3", "(8, 16, 16)")),
    Case("weights", "config/flag-as-str", _config(scale_input_img="no"),
         Refused(ValueError, "scale_input_img", "bool", "'no'")),
]

CASES = EXPORTS + HUB + LOAD + ARCHITECTURES
