"""MineStudio LMDB datasets -> import -> store: frames by barcode, actions, masks and the reference windows of the real
MineStudio reader (``tests/fixtures/minestudio_lmdb``); refused pickles, bad chunks, resume."""

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from mstudio.actions.mapping import BUTTONS
from mstudio.data import EpisodeStore
from mstudio.data.contractor_import import ENV_BUTTON_BITS, FLAG_NULL, FLAG_SEGMENT_START
from mstudio.data.contractor_synth import read_barcode
from mstudio.data.minestudio_import import decode_action_chunk, import_minestudio, list_environments
from mstudio.data.minestudio_synth import (
    barcode_frames, encode_action_chunk, encode_video_chunk, synthesize_minestudio, synthetic_actions, write_lmdb)
from mstudio.data.safe_pickle import UnsafePickleError, load_pickle
from mstudio.data.windows import WindowDataset

FIXTURES = Path(__file__).parents[1] / "fixtures" / "minestudio_lmdb"
WIN = 40  # the fixtures' RawDataset win_len: windows straddle chunks and end in padding


def expected_episodes(root: Path) -> list[dict]:
    import json
    return json.loads((root / "expected.json").read_text())["episodes"]


def run(root: Path, store_dir: Path, resolution: int = 64):
    store = (EpisodeStore.open(store_dir) if store_dir.exists()
             else EpisodeStore.create(store_dir, (resolution, resolution)))
    return import_minestudio(root, store, resolution=resolution, progress=False), store


def barcodes(frames: np.ndarray) -> list[int]:
    return [read_barcode(f) for f in frames]


@pytest.fixture(scope="module", params=["drop", "keep"])
def synthetic(request, tmp_path_factory):
    """The fixture's synthetic dataset (2 episodes of 45 and 82 frames + one of 17), imported at 128x128."""
    root = tmp_path_factory.mktemp(f"synth-{request.param}")
    synthesize_minestudio(root / "raw", episodes=2, frames=45, seed=0, tail=request.param)
    summary, store = run(root / "raw", root / "store", resolution=128)
    return request.param, root / "raw", summary, store


def test_synthetic_frames_actions_and_lengths(synthetic):
    tail, raw, summary, store = synthetic
    expected = expected_episodes(raw)
    assert [e["source_frames"] % 32 != 0 for e in expected] == [True] * 3
    written = [e for e in expected if e["frames"] > 0]
    assert [e["frames"] for e in expected] == ([32, 64, 0] if tail == "drop" else [45, 82, 17])
    assert summary.skipped == [] and summary.already_present == []
    assert summary.imported == store.episode_ids == sorted(e["name"] for e in written)  # name order
    assert summary.frames == sum(e["frames"] for e in written)
    for e in written:
        data = store.read(e["name"])
        assert barcodes(data["frames"]) == list(range(e["frames"]))
        assert data["buttons"].tolist() == e["buttons"] and data["camera"].tolist() == e["camera"]
        assert np.array_equal(data["env_camera"], np.array(e["env"]["camera"], dtype=np.float32))
        bits = sum(np.array(e["env"][b], dtype=np.uint32) << ENV_BUTTON_BITS[b] for b in BUTTONS)
        assert np.array_equal(data["env_buttons"], bits)
        assert ((data["flags"] & FLAG_NULL) > 0).tolist() == [b == 0 for b in e["buttons"]]
        assert np.flatnonzero(data["flags"] & FLAG_SEGMENT_START).tolist() == [0]
        assert store.info(e["name"])["frames"] == [0, e["frames"]]


def test_windows_match_minestudio_reader_on_synthetic_data(synthetic):
    """mstudio's windows over the import = MineStudio's RawDataset windows over the same dataset (made by hand)."""
    tail, _, _, store = synthetic
    ref = np.load(FIXTURES / "synth_windows.npz", allow_pickle=False)
    dataset = WindowDataset(store, window=WIN)
    ours = [(dataset.episodes[i], k * WIN) for i, k in dataset.items]
    assert ours == list(zip(ref[f"{tail}_episode"].tolist(), ref[f"{tail}_start"].tolist()))
    for w in range(len(dataset)):
        item = dataset[w]
        mask = item["mask"].numpy()
        assert np.array_equal(mask, ref[f"{tail}_mask"][w])
        codes = [read_barcode(f) if m else -1 for f, m in zip(item["image"].numpy(), mask)]
        assert codes == ref[f"{tail}_barcode"][w].tolist()
        assert np.array_equal(item["agent_action"]["buttons"][:, 0].numpy(), ref[f"{tail}_agent_buttons"][w])
        assert np.array_equal(item["agent_action"]["camera"][:, 0].numpy(), ref[f"{tail}_agent_camera"][w])
        assert np.array_equal(item["timestamp"].numpy(), ref[f"{tail}_timestamp"][w])


def test_matches_minestudio_reference(tmp_path):
    """Chunks written by MineStudio's own converters, read by MineStudio's RawDataset (fixture) and by the importer."""
    ref = np.load(FIXTURES / "reference.npz", allow_pickle=False)
    names = ref["names"].tolist()
    for modality in ("video", "action"):
        offsets, data = ref[f"{modality}_offsets"], ref[f"{modality}_data"].tobytes()
        chunks = {name: {} for name in names}
        for i, (e, start) in enumerate(zip(ref[f"{modality}_episode"], ref[f"{modality}_start"])):
            chunks[names[e]][int(start)] = data[offsets[i]:offsets[i + 1]]
        write_lmdb(tmp_path / "raw" / modality / "part-2",
                   [(n, int(f), chunks[n]) for n, f in zip(names, ref["num_frames"])], int(ref["chunk_size"]))
    summary, store = run(tmp_path / "raw", tmp_path / "store", resolution=128)
    assert summary.skipped == [] and store.episode_ids == names
    assert [store.length(n) for n in names] == ref["num_frames"].tolist()  # 75 -> 64, 40 -> 32 frames
    dataset = WindowDataset(store, window=WIN)
    assert [(dataset.episodes[i], k * WIN) for i, k in dataset.items] == list(zip(ref["win_episode"], ref["win_start"]))
    for w in range(len(dataset)):
        item = dataset[w]
        diff = np.abs(item["image"].numpy().astype(int) - ref["image"][w].astype(int))
        assert diff.max() <= 1, f"window {w}: frames differ from MineStudio's by up to {diff.max()} levels"
        assert np.array_equal(item["mask"].numpy(), ref["mask"][w])
        assert np.array_equal(item["agent_action"]["buttons"][:, 0].numpy(), ref["agent_buttons"][w])
        assert np.array_equal(item["agent_action"]["camera"][:, 0].numpy(), ref["agent_camera"][w])
        episode = dataset.episodes[dataset.items[w][0]]
        start, real = int(ref["win_start"][w]), int(ref["mask"][w].sum())
        data = store.read(episode, start, start + real)
        assert np.array_equal(data["env_camera"], ref["env_camera"][w][:real].astype(np.float32))
        bits = [(data["env_buttons"] >> ENV_BUTTON_BITS[b]) & 1 for b in BUTTONS]
        assert np.array_equal(np.stack(bits, -1), ref["env_buttons"][w][:real])


# --- damaged datasets ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """One episode of 96 frames in three chunks (100 source frames), plus the short one the converter drops."""
    root = tmp_path_factory.mktemp("pristine") / "raw"
    return synthesize_minestudio(root, episodes=1, frames=100, seed=3)


@pytest.fixture
def raw(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "raw"))


def put_chunk(raw: Path, modality: str, start: int, value: bytes | None) -> str:
    """Replace (``None``: delete) the chunk at ``start`` of the dataset's first episode; returns its name."""
    import lmdb
    (path,) = (raw / modality).iterdir()
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        infos = load_pickle(txn.get(b"__chunk_infos__"))
        key = str((infos[0]["episode_idx"], start)).encode()
        txn.put(key, value) if value is not None else txn.delete(key)
    env.close()
    return infos[0]["episode"]


class Touch:
    """Pickles to a call that would create ``path``: ``__reduce__`` is what a hostile dataset would use."""

    def __init__(self, call, path: Path):
        self.call, self.path = call, path

    def __reduce__(self):
        if self.call == "system":
            return os.system, (f"touch {self.path}",)
        if self.call == "exec":
            return exec, (f"open({str(self.path)!r}, 'w').close()",)
        return open, (str(self.path), "w")


@pytest.mark.parametrize("call", ["system", "exec", "open"])
@pytest.mark.parametrize("nested", [False, True])
def test_code_executing_pickle_is_refused_and_nothing_runs(raw, tmp_path, call, nested):
    marker = tmp_path / "pwned"
    payload = Touch(call, marker)
    chunk = {"camera": np.zeros((32, 2)), "attack": payload} if nested else payload
    data = pickle.dumps(chunk)
    refused = r"refused to unpickle the global (posix.system|builtins.exec|io.open): .*\(nothing was run\)"
    with pytest.raises(UnsafePickleError, match=refused):
        decode_action_chunk(data, "action chunk")
    name = put_chunk(raw, "action", 32, data)
    summary, store = run(raw, tmp_path / "store")
    assert not marker.exists()
    ((where, reason),) = summary.skipped
    assert where.startswith("action/") and "(0, 32)" in where and name in where
    assert "refused to unpickle the global" in reason and "could run code" in reason
    assert store.episode_ids == [name, f"{name}@64"]  # split cleanly around the refused chunk
    assert barcodes(store.read(f"{name}@64")["frames"]) == list(range(64, 96))


def test_the_hostile_payload_is_real(tmp_path):
    """Plain ``pickle.loads`` of the test payloads does create the file: the refusal tests are not vacuous."""
    for i, call in enumerate(["system", "exec", "open"]):
        pickle.loads(pickle.dumps(Touch(call, tmp_path / f"made-{i}")))
        assert (tmp_path / f"made-{i}").exists()


def broken_video(kind: str) -> bytes | None:
    good = encode_video_chunk(barcode_frames(range(32, 64)))
    return {"garbage": b"\x00\x00\x01 not an mp4 " * 50, "truncated": good[: len(good) // 2], "missing": None,
            "too_few_frames": encode_video_chunk(barcode_frames(range(32, 52)))}[kind]


@pytest.mark.parametrize("kind", ["garbage", "truncated", "missing", "too_few_frames"])
def test_bad_video_chunk_is_skipped_and_the_episode_splits(raw, tmp_path, kind):
    name = put_chunk(raw, "video", 32, broken_video(kind))
    summary, store = run(raw, tmp_path / "store")
    ((where, reason),) = summary.skipped
    assert where.startswith("video/") and f"{name} frames 32-63" in where
    assert {"garbage": "cannot be decoded", "truncated": "cannot be decoded", "missing": "missing",
            "too_few_frames": "holds 20 frames; expected 32"}[kind] in reason
    assert store.episode_ids == [name, f"{name}@64"] and summary.frames == 64
    assert barcodes(store.read(name)["frames"]) == list(range(32))
    assert barcodes(store.read(f"{name}@64")["frames"]) == list(range(64, 96))
    assert store.info(f"{name}@64")["frames"] == [64, 96]
    expected = expected_episodes(raw)[0]
    assert store.read(f"{name}@64")["buttons"].tolist() == expected["buttons"][64:96]
    assert store.read(f"{name}@64")["flags"][0] & FLAG_SEGMENT_START


def test_resume_imports_nothing_twice(raw, tmp_path, monkeypatch):
    name = put_chunk(raw, "video", 32, b"junk")
    calls = []
    append = EpisodeStore.append

    def crash_on_second(self, *args, **kwargs):  # the run dies after the first part is stored
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return append(self, *args, **kwargs)

    monkeypatch.setattr(EpisodeStore, "append", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(raw, tmp_path / "store")
    monkeypatch.setattr(EpisodeStore, "append", append)
    summary, store = run(raw, tmp_path / "store")
    assert summary.already_present == [name] and summary.imported == [f"{name}@64"] and summary.frames == 32
    again, store = run(raw, tmp_path / "store")
    assert again.imported == [] and again.already_present == [name, f"{name}@64"] and again.frames == 0
    assert [s for s, _ in again.skipped] == [s for s, _ in summary.skipped]  # the bad chunk, reported again
    assert store.episode_ids == [name, f"{name}@64"] and store.verify() == []


def test_last_chunk_rules(tmp_path):
    """Frames past num_frames in a last chunk are dropped (the reader never yields them); too few is a bad chunk."""
    frames, actions = barcode_frames(range(64)), synthetic_actions(64, __import__("random").Random(0))
    video = {s: encode_video_chunk(frames[s:s + 32]) for s in (0, 32)}
    action = {s: encode_action_chunk({k: v[s:s + 32] for k, v in actions.items()}) for s in (0, 32)}
    half = {s: encode_action_chunk({k: v[s:s + 16] for k, v in actions.items()}) for s in range(0, 64, 16)}
    write_lmdb(tmp_path / "raw/video/video-1", [("a", 50, video), ("b", 64, {0: video[0], 32: video[0]})])
    write_lmdb(tmp_path / "raw/action/action-1", [("a", 50, action)])
    write_lmdb(tmp_path / "raw/action/action-2", [("b", 64, half)], chunk_size=16)  # chunk sizes may differ
    summary, store = run(tmp_path / "raw", tmp_path / "store")
    assert summary.skipped == [] and store.episode_ids == ["a", "b"]
    assert barcodes(store.read("a")["frames"]) == list(range(50))
    assert barcodes(store.read("b")["frames"]) == list(range(32)) * 2
    assert np.array_equal(store.read("b")["env_camera"], actions["camera"].astype(np.float32))
    write_lmdb(tmp_path / "short/video/video-1", [("a", 50, {0: video[0], 32: encode_video_chunk(frames[32:40])})])
    write_lmdb(tmp_path / "short/action/action-1", [("a", 50, action)])
    summary, store = run(tmp_path / "short", tmp_path / "store2")
    assert store.episode_ids == ["a"] and store.length("a") == 32
    assert "holds 8 frames; expected at least 18 (the episode's last chunk)" in summary.skipped[0][1]


def test_episode_and_environment_problems_are_reported(raw, tmp_path):
    (path,) = (raw / "action").iterdir()
    shutil.copytree(path, raw / "action" / "action-9")  # every episode twice
    (raw / "video" / "notes.txt").write_text("not an environment")
    bad = raw / "video" / "video-7"
    write_lmdb(bad, [])
    import lmdb
    env = lmdb.open(str(bad))
    with env.begin(write=True) as txn:
        txn.put(b"__chunk_infos__", pickle.dumps(Touch("system", tmp_path / "pwned")))
    env.close()
    write_lmdb(raw / "video" / "video-8", [("only-video", 32, {0: b""}), ("zz-mismatch", 32, {0: b""})])
    write_lmdb(raw / "action" / "action-8", [("zz-mismatch", 64, {})])
    summary, store = run(raw, tmp_path / "store")
    reasons = dict(summary.skipped)
    assert len(store) == 0 and not (tmp_path / "pwned").exists()
    assert "refused to unpickle the global" in reasons["video/video-7"]
    assert "not an LMDB environment" in reasons["video/notes.txt"]
    assert "only in video" in reasons["only-video"]
    assert "video has 32 frames and action 64" in reasons["zz-mismatch"]
    name = expected_episodes(raw)[0]["name"]
    assert f"stored more than once in action (action/{path.name}, action/action-9)" in reasons[name]


def test_arguments_are_checked_first(raw, tmp_path):
    store = EpisodeStore.create(tmp_path / "store", (64, 64))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        import_minestudio(tmp_path / "nowhere", store, resolution=64)
    shutil.rmtree(raw / "action")
    with pytest.raises(ValueError, match="no action folder"):
        list_environments(raw)
    with pytest.raises(ValueError, match=r"holds \(64, 64\) frames but resolution=128"):
        import_minestudio(raw, store, resolution=128)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_pickles_of_every_protocol_load(protocol):
    actions = synthetic_actions(8, __import__("random").Random(1))
    data = pickle.dumps(actions, protocol=protocol)
    if protocol <= 2:  # as numpy 1 wrote them
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    chunk = decode_action_chunk(data)
    assert np.array_equal(chunk["camera"], actions["camera"])
    assert all(np.array_equal(chunk[b], actions[b]) for b in BUTTONS)


@pytest.mark.parametrize("chunk, message", [
    ([1, 2], "must be a dict with 'camera'"),
    ({"attack": np.zeros(4)}, "must be a dict with 'camera'"),
    ({"camera": np.full((4, 2), np.nan)}, "non-finite"),
    ({"camera": np.zeros(4)}, "shape \\(n, 2\\)"),
    ({"camera": np.zeros((4, 2)), "attack": np.zeros(3)}, "'attack' must have shape \\(4,\\)"),
    ({"camera": np.zeros((4, 2)), "use": np.array(["a"] * 4)}, "'use' must hold numbers"),
])
def test_invalid_action_chunks(chunk, message):
    with pytest.raises(ValueError, match=message):
        decode_action_chunk(pickle.dumps(chunk), "here")
    with pytest.raises(ValueError, match="not a valid pickle"):
        decode_action_chunk(b"\x80\x04junk", "here")


def test_the_cli_writes_a_minestudio_dataset_and_imports_it_resumably(tmp_path, capsys):
    from mstudio.cli import main
    from mstudio.data import EpisodeStore

    src, store = tmp_path / "ms", tmp_path / "store"
    assert main(["synth", str(src), "--format", "minestudio", "--episodes", "2", "--frames", "40"]) == 0
    assert main(["import-minestudio", str(src), str(store), "--resolution", "16"]) == 0
    imported = EpisodeStore.open(store)
    assert len(imported) >= 2 and imported.image_size == (16, 16)
    assert main(["import-minestudio", str(src), str(store), "--resolution", "16"]) == 0
    assert "imported 0 episodes" in capsys.readouterr().out
    assert len(EpisodeStore.open(store)) == len(imported)


def test_the_cli_refuses_a_missing_source_before_creating_a_store(tmp_path, capsys):
    from mstudio.cli import main

    assert main(["import-minestudio", str(tmp_path / "nope"), str(tmp_path / "store")]) == 2
    assert not (tmp_path / "store").exists()
    assert capsys.readouterr().err.count("\n") == 1
