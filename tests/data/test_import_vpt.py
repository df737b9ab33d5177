"""Synthetic contractor data -> import -> store: every frame and action as the generator's sidecar says."""

import json
import shutil

import numpy as np
import pytest

from mstudio.data import EpisodeStore
from mstudio.data.contractor_synth import read_barcode, synthesize_contractor
from mstudio.data.contractor_import import FLAG_NULL, FLAG_SEGMENT_START, import_vpt


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("contractor")
    return root, synthesize_contractor(root / "raw", episodes=2, frames=60, seed=0)


def check_episode(store, episode_id, raw):
    data, info = store.read(episode_id), store.info(episode_id)
    expected = sum((json.loads((raw / f"{r}.expected.json").read_text()) for r in info["segments"]), [])
    ends = info["segment_starts"][1:] + [len(expected)]
    frame_in_segment = np.concatenate([np.arange(e - s) for s, e in zip(info["segment_starts"], ends)])
    assert [read_barcode(f) for f in data["frames"]] == frame_in_segment.tolist()
    assert data["buttons"].tolist() == [x["buttons"] for x in expected]
    assert data["camera"].tolist() == [x["camera"] for x in expected]
    assert ((data["flags"] & FLAG_NULL) > 0).tolist() == [x["buttons"] == 0 for x in expected]
    assert [i for i, f in enumerate(data["flags"]) if f & FLAG_SEGMENT_START] == info["segment_starts"]


def test_import_matches_the_sidecar_and_resumes(synthetic, tmp_path):
    root, index = synthetic
    store = EpisodeStore.create(tmp_path / "store", image_size=(128, 128))
    summary = import_vpt(index, store, progress=False)
    assert summary.skipped == [] and summary.frames == 300
    # sessions of two segments 5 minutes apart (one across an hour boundary) join; a 30-minute gap splits
    assert [len(store.info(e)["segments"]) for e in store.episode_ids] == [2, 2, 1]
    for episode_id in store.episode_ids:
        check_episode(store, episode_id, root / "raw")
    again = import_vpt(root / "raw", EpisodeStore.open(tmp_path / "store"), progress=False)  # a directory works too
    assert again.imported == [] and again.already_present == store.episode_ids


def test_bad_segments_are_skipped_and_reported(synthetic, tmp_path):
    root, _ = synthetic
    raw = tmp_path / "raw"
    shutil.copytree(root / "raw", raw)
    segments = sorted(p.with_suffix("") for p in (raw / "10.0").glob("*.mp4"))
    truncated, bad_json, mismatch = segments[1], segments[2], segments[4]
    data = truncated.with_suffix(".mp4").read_bytes()
    truncated.with_suffix(".mp4").write_bytes(data[: len(data) // 3])
    with open(bad_json.with_suffix(".jsonl"), "a") as f:
        f.write("{not json\n")
    lines = mismatch.with_suffix(".jsonl").read_text().splitlines(keepends=True)
    mismatch.with_suffix(".jsonl").write_text("".join(lines[:50]))
    (raw / "10.0" / "orphan-0123456789ab-20220101-000000.jsonl").write_text("{}\n")

    store = EpisodeStore.create(tmp_path / "store", image_size=(64, 64))
    summary = import_vpt(raw, store, resolution=64, progress=False)
    reasons = {path.split("/")[-1]: reason for path, reason in summary.skipped}
    assert "line 61 is not valid JSON" in reasons[bad_json.name + ".mp4"]
    assert "60 video frames for 50 action lines" in reasons[mismatch.name + ".mp4"]
    assert truncated.name + ".mp4" in reasons  # decodes short or not at all: either way, reported
    assert "missing" in reasons["orphan-0123456789ab-20220101-000000.mp4"]
    imported = {s for e in store.episode_ids for s in store.info(e)["segments"]}
    assert imported == {f"10.0/{p.name}" for p in segments} - {f"10.0/{p.name}" for p in (truncated, bad_json, mismatch)}
    for episode_id in store.episode_ids:
        check_episode(store, episode_id, raw)


def test_resolution_must_match_the_store(synthetic, tmp_path):
    _, index = synthetic
    with pytest.raises(ValueError, match="resolution=128"):
        import_vpt(index, EpisodeStore.create(tmp_path / "s", image_size=(64, 64)), progress=False)


def test_cli_synth_then_import(tmp_path, capsys):
    from mstudio.cli import main

    assert main(["synth", str(tmp_path / "raw"), "--episodes", "1", "--frames", "30"]) == 0
    assert main(["import-vpt", str(tmp_path / "raw" / "index.json"), str(tmp_path / "store"), "--resolution", "64"]) == 0
    assert "imported 2 episodes (90 frames)" in capsys.readouterr().out
    assert main(["import-vpt", str(tmp_path / "raw"), str(tmp_path / "store"), "--resolution", "64"]) == 0
    assert "imported 0 episodes (0 frames); 2 already in the store" in capsys.readouterr().out
