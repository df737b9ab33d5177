"""Adversarial inputs to the VPT importer and its CLI: each bad segment is skipped and reported, never fatal."""

import json
import shutil
from pathlib import Path

import pytest

from mstudio.cli import main
from mstudio.data import EpisodeStore
from mstudio.data.contractor_import import check_lines, discover, import_vpt
from mstudio.data.contractor_synth import synthesize_contractor
from tests.support.media import write_audio_only


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Two sessions of two segments and a gapped fifth segment, 12 lines each."""
    root = tmp_path_factory.mktemp("hardening")
    synthesize_contractor(root / "raw", episodes=2, frames=12, seed=1)
    return root / "raw"


@pytest.fixture
def raw(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "raw"))


def stems(raw: Path) -> list[Path]:
    """The five segments without suffix, in import order: session 0 (a, b), session 1 (a, b, gapped c)."""
    return sorted(p.with_suffix("") for p in (raw / "10.0").glob("*.mp4"))


def edit_line(stem: Path, index: int, edit) -> None:
    """Apply ``edit`` to the parsed line ``index`` (0-based) of ``stem``'s jsonl and write it back."""
    path = stem.with_suffix(".jsonl")
    lines = [json.loads(t) for t in path.read_text().splitlines()]
    lines[index] = edit(lines[index])
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def segments_of(store: EpisodeStore) -> list[list[str]]:
    return [store.info(e)["segments"] for e in store.episode_ids]


def run(raw: Path, store_dir: Path):
    store = EpisodeStore.open(store_dir) if store_dir.exists() else EpisodeStore.create(store_dir, (32, 32))
    return import_vpt(raw, store, resolution=32, progress=False), store


def set_in(path: tuple[str, ...], value):
    """An edit setting ``line[path[0]]`` (or ``line[path[0]][path[1]]``, making the device a dict) to ``value``."""
    def edit(line):
        target = line
        if len(path) == 2:
            target = line[path[0]] = line.get(path[0]) or {}
        target[path[-1]] = value
        return line
    return edit


BAD_LINES = {
    "hotbar 12": (set_in(("hotbar",), 12), "'hotbar' must be an integer 0-8 or null, got 12"),
    "hotbar -1": (set_in(("hotbar",), -1), "'hotbar' must be an integer 0-8 or null, got -1"),
    "hotbar float": (set_in(("hotbar",), 2.5), "'hotbar' must be an integer 0-8 or null, got 2.5"),
    "nested buttons": (set_in(("mouse", "buttons"), [[0]]), "'mouse.buttons' must be a list of integers or null, got [[0]]"),
    "keys not a list": (set_in(("keyboard", "keys"), 5), "'keyboard.keys' must be a list of strings or null, got 5"),
    "dx NaN": (set_in(("mouse", "dx"), float("nan")), "'mouse.dx' must be a finite number at most 1e+06 in size or "
                                                      "null, got NaN"),
    "dy infinite": (set_in(("mouse", "dy"), float("-inf")), "'mouse.dy' must be a finite number at most 1e+06 in size "
                                                          "or null, got -Infinity"),
    "x a string": (set_in(("mouse", "x"), "left"), "'mouse.x' must be a finite number or null, got \"left\""),
    "gui a string": (set_in(("isGuiOpen",), "yes"), "'isGuiOpen' must be true or false or null, got \"yes\""),
    "mouse a list": (set_in(("mouse",), [1, 2]), "'mouse' must be an object or null, got [1, 2]"),
    "line a list": (lambda line: [line], "must be a JSON object, got [{"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_line_skips_its_segment_and_splits_the_session(raw, tmp_path, case):
    edit, message = BAD_LINES[case]
    s = stems(raw)
    edit_line(s[2], 4, edit)  # session 1, first segment, line 5
    summary, store = run(raw, tmp_path / "store")
    [(path, reason)] = summary.skipped
    assert path == f"{s[2]}.mp4" and reason.startswith(f"{s[2].name}.jsonl line 5: {message}")
    # the bad segment is never bridged: the rest of its session is an episode of its own
    assert segments_of(store) == [[f"10.0/{p.name}" for p in s[:2]], [f"10.0/{s[3].name}"], [f"10.0/{s[4].name}"]]
    again, _ = run(raw, tmp_path / "store")  # resuming skips the same segment again and imports nothing twice
    assert again.imported == [] and again.skipped == summary.skipped
    assert again.already_present == store.episode_ids


def test_check_lines_accepts_null_devices_and_missing_fields():
    check_lines([{}, {"mouse": None, "keyboard": None, "hotbar": None}, {"hotbar": 8, "mouse": {"dx": 3}}])
    with pytest.raises(ValueError, match=r"x.jsonl line 3: 'hotbar' must be an integer 0-8 or null, got true"):
        check_lines([{"hotbar": True}], "x.jsonl", first=3)


def break_not_utf8(stem: Path) -> str:
    stem.with_suffix(".jsonl").write_bytes(b'{"hotbar": 0}\n\xff\xfe\n')
    return "is not UTF-8 text"


def break_directory(stem: Path) -> str:
    stem.with_suffix(".jsonl").unlink()
    stem.with_suffix(".jsonl").mkdir()
    return "is not a file"


def break_no_video(stem: Path) -> str:
    write_audio_only(stem.with_suffix(".mp4"))
    return "has no video stream"


def break_not_json(stem: Path) -> str:
    stem.with_suffix(".jsonl").write_text("hello\n")
    return "line 1 is not valid JSON"


def break_empty(stem: Path) -> str:
    stem.with_suffix(".jsonl").write_text("\n\n")
    return "has no action lines"


@pytest.mark.parametrize("damage", [break_not_utf8, break_directory, break_no_video, break_not_json, break_empty])
def test_an_unreadable_segment_is_skipped_and_later_ones_imported(raw, tmp_path, damage):
    s = stems(raw)
    expected = damage(s[0])  # the very first segment: everything after it must still come in
    summary, store = run(raw, tmp_path / "store")
    assert len(summary.skipped) == 1 and s[0].name in summary.skipped[0][0] and expected in summary.skipped[0][1]
    assert segments_of(store) == [[f"10.0/{s[1].name}"], [f"10.0/{p.name}" for p in s[2:4]], [f"10.0/{s[4].name}"]]


def test_an_mp4_without_its_jsonl_is_reported(raw, tmp_path):
    s = stems(raw)
    s[4].with_suffix(".jsonl").unlink()
    summary, store = run(raw, tmp_path / "store")
    assert summary.skipped == [(str(s[4]) + ".jsonl", "missing (a segment needs both a .mp4 and a .jsonl file)")]
    assert len(store.episode_ids) == 2


def test_a_relpath_listed_twice_is_imported_once(raw, tmp_path):
    index = json.loads((raw / "index.json").read_text())
    index["relpaths"].insert(1, index["relpaths"][0])
    index["basedir"] = raw.as_uri() + "/"  # the copy, not the fixture's original
    (raw / "index.json").write_text(json.dumps(index))
    summary, store = run(raw / "index.json", tmp_path / "store")
    assert summary.skipped == [(str(raw / index["relpaths"][0]) + ".mp4", "listed 2 times in the index; imported once")]
    assert [len(x) for x in segments_of(store)] == [2, 2, 1]
    assert store.info(store.episode_ids[0])["segment_starts"] == [0, 12]


def test_resume_after_a_segment_is_repaired_imports_it_alone(raw, pristine, tmp_path):
    s = stems(raw)
    edit_line(s[2], 0, set_in(("hotbar",), 99))
    run(raw, tmp_path / "store")
    shutil.copy(pristine / "10.0" / f"{s[2].name}.jsonl", s[2].with_suffix(".jsonl"))
    summary, store = run(raw, tmp_path / "store")
    assert summary.imported == [f"10.0/{s[2].name}"] and summary.skipped == []
    everything = sum(segments_of(store), [])
    assert sorted(everything) == sorted(f"10.0/{p.name}" for p in s) and len(set(everything)) == len(everything)


def test_index_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(tmp_path / "nothing" / "index.json")
    (tmp_path / "bad.json").write_text(json.dumps({"basedir": "file:///x/"}))
    with pytest.raises(ValueError, match="'relpaths' must be a list of non-empty strings"):
        discover(tmp_path / "bad.json")


def assert_cli_error(capsys, argv: list[str], command: str, text: str) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"mstudio {command}: error: ") and text in err, err


def test_cli_import_errors_come_before_the_store_is_made(raw, tmp_path, capsys):
    store = tmp_path / "store"
    assert_cli_error(capsys, ["import-vpt", str(tmp_path / "does/not/exist/index.json"), str(store)],
                     "import-vpt", "does not exist")
    mp4 = next((raw / "10.0").glob("*.mp4"))
    assert_cli_error(capsys, ["import-vpt", str(mp4), str(store)], "import-vpt", "is not a VPT index JSON")
    assert_cli_error(capsys, ["import-vpt", str(raw), str(store), "--resolution", "0"],
                     "import-vpt", "--resolution must be an integer >= 1, got 0")
    assert not store.exists()
    EpisodeStore.create(store, (64, 64))
    assert_cli_error(capsys, ["import-vpt", str(raw), str(store), "--resolution", "32"], "import-vpt", "resolution=32")


def test_cli_reports_skipped_segments(raw, tmp_path, capsys):
    s = stems(raw)
    edit_line(s[0], 1, set_in(("hotbar",), 12))
    assert main(["import-vpt", str(raw), str(tmp_path / "store"), "--resolution", "32"]) == 3
    out = capsys.readouterr().out
    assert "imported 3 episodes" in out and "1 segments skipped" in out
    assert f"skipped {s[0]}.mp4: {s[0].name}.jsonl line 2: 'hotbar' must be an integer 0-8 or null, got 12" in out


@pytest.mark.parametrize("flag, text", [("--frames=0", "frames must be an integer in [1, "),
                                        ("--episodes=-1", "episodes must be an integer >= 0, got -1")])
def test_cli_synth_checks_its_arguments(tmp_path, capsys, flag, text):
    assert_cli_error(capsys, ["synth", str(tmp_path / "raw"), flag], "synth", text)
    assert not (tmp_path / "raw").exists()


def test_cli_round_trip_through_a_path_with_spaces(tmp_path, capsys):
    raw = tmp_path / "raw data"
    assert main(["synth", str(raw), "--episodes", "1", "--frames", "8"]) == 0
    assert "%20" in json.loads((raw / "index.json").read_text())["basedir"]
    assert main(["import-vpt", str(raw / "index.json"), str(tmp_path / "my store"), "--resolution", "32"]) == 0
    assert "imported 2 episodes (24 frames); 0 already in the store; 0 segments skipped" in capsys.readouterr().out
