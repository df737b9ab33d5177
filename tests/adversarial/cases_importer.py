"""Adversarial cases for the VPT contractor importer, ``contractor_to_env``, and ``mstudio synth``/``import-vpt``.

The data is mstudio's own synthetic contractor set, as small as it goes: one session of two segments (s0, s1,
five minutes apart) and a third segment (s2) 30 minutes later, 4 lines each; frames are resized to 16x16. An
import with one bad input is a job: it must finish, import every good segment, and report the bad one in
``summary.skipped`` with a reason naming the file, line and key, what was expected and what came.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import multiprocessing
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable

import av
import numpy as np

from mstudio.actions import contractor_to_env
from mstudio.cli import main
from mstudio.data import EpisodeStore
from mstudio.data.contractor_import import ImportSummary, import_vpt
from mstudio.data.contractor_synth import synthesize_contractor
from tests.adversarial.harness import Case, Handled, Refused
from tests.support.media import write_audio_only

RES = 16
FRAMES = 4
SKIPPED = 3  # exit status of an import-vpt that finished but skipped some inputs


class CliError(Exception):
    """The ``mstudio`` command exited non-zero; the message is its exit status and output."""


def cli(*argv: Any) -> str:
    """Run ``mstudio argv``; its stdout, or :class:`CliError` with stderr if it fails.

    Exit status 3 (``import-vpt`` finished but skipped some inputs) is a finished job: its stdout ends with
    ``[exit status 3]``. A traceback on stderr is never a clear error, so it raises ``RuntimeError`` instead.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse refusing an argument
            code = exit_.code
    if "Traceback" in err.getvalue():
        raise RuntimeError(f"mstudio printed a traceback: {err.getvalue()}")
    if code not in (0, SKIPPED):
        raise CliError(f"exit {code}: {err.getvalue()}{out.getvalue()}")
    return out.getvalue() + (f"[exit status {code}]" if code else "")


_PRISTINE: list[Path] = []  # the synthetic data, written once per process and copied into each case


def synth(tmp: Path, name: str = "raw") -> Path:
    """The three synthetic segments under ``tmp / name`` (its index.json's basedir pointing there); returns it."""
    if not _PRISTINE:
        cache = Path(tempfile.mkdtemp(prefix="mstudio-adversarial-"))
        atexit.register(shutil.rmtree, cache, True)
        synthesize_contractor(cache / "raw", episodes=1, frames=FRAMES, seed=0)
        _PRISTINE.append(cache / "raw")
    shutil.copytree(_PRISTINE[0], tmp / name)
    index = json.loads((tmp / name / "index.json").read_text())
    (tmp / name / "index.json").write_text(json.dumps({**index, "basedir": (tmp / name).resolve().as_uri() + "/"}))
    return tmp / name


def stems(raw: Path) -> list[Path]:
    """s0, s1, s2: the segments' paths without suffix, in time order (from the sidecars, which no case touches)."""
    return sorted(p.parent / p.name.removesuffix(".expected.json") for p in (raw / "10.0").glob("*.expected.json"))


def relpath(raw: Path, i: int) -> str:
    return f"10.0/{stems(raw)[i].name}"


def importing(tmp: Path, src: Path | None = None, **options: Any) -> ImportSummary:
    """Import ``src`` (default ``tmp / "raw"``) into a new store ``tmp / "store"`` of 16x16 frames."""
    store = EpisodeStore.create(tmp / "store", (RES, RES))
    return import_vpt(src or tmp / "raw", store, resolution=RES, progress=False, **options)


def expected_actions(raw: Path, relpaths: Iterable[str]) -> tuple[list[int], list[int]]:
    """The sidecar's joint buttons and camera of ``relpaths`` concatenated."""
    rows = sum((json.loads((raw / f"{r}.expected.json").read_text()) for r in relpaths), [])
    return [r["buttons"] for r in rows], [r["camera"] for r in rows]


def imported(groups: list[list[int]], skipped: list[tuple[int, tuple[str, ...]]] = (),
             raw: str = "raw", exact: bool = True) -> Callable[[ImportSummary, Path], None]:
    """A check: the store holds one episode per group of segment numbers, in order (with the sidecar's actions
    when ``exact``), and ``summary.skipped`` names exactly the segments in ``skipped``, each reason holding its
    fragments."""
    def check(summary, tmp):
        base = tmp / raw
        store = EpisodeStore.open(tmp / "store")
        want = [[relpath(base, i) for i in group] for group in groups]
        got = [store.info(e)["segments"] for e in store.episode_ids]
        assert got == want, f"episodes {got}, expected {want}"
        for episode_id, segments in zip(store.episode_ids, want):
            buttons, camera = expected_actions(base, segments)
            data = store.read(episode_id)
            if exact:
                assert data["buttons"].tolist() == buttons and data["camera"].tolist() == camera, episode_id
        assert len(summary.skipped) == len(skipped), summary.skipped
        for (path, reason), (i, fragments) in zip(summary.skipped, skipped):
            assert stems(base)[i].name in path, (path, i)
            missing = [f for f in fragments if f.lower() not in reason.lower()]
            assert not missing, f"reason {reason!r} lacks {missing}"
        assert store.verify() == []
    return check


def edit_lines(path: Path, edit: Callable[[list], list]) -> None:
    lines = [json.loads(t) for t in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(line) + "\n" for line in edit(lines)))


def set_value(line: Any, key: str, value: Any) -> Any:
    """``line`` with ``key`` (``"hotbar"`` or ``"mouse.dx"``; ``""`` for the line itself) set to ``value``."""
    if not key:
        return value
    *device, name = key.split(".")
    target = line
    if device:
        target = line[device[0]] = line.get(device[0]) or {}
    target[name] = value
    return line


def bad_values(values: dict[str, Any], segment: int = 1, line: int = 1) -> Callable[[Path], ImportSummary]:
    """Set the keys of ``values`` in one line of one segment to their values, then import."""
    def edit(lines):
        for key, value in values.items():
            lines[line] = set_value(lines[line], key, value)
        return lines

    def attack(tmp):
        edit_lines(stems(synth(tmp))[segment].with_suffix(".jsonl"), edit)
        return importing(tmp)
    return attack


def bad_value(key: str, value: Any, segment: int = 1, line: int = 1) -> Callable[[Path], ImportSummary]:
    """Set ``key`` of one line of one segment to ``value``, then import."""
    return bad_values({key: value}, segment, line)


def skips(segment: int, *fragments: str) -> Handled:
    """The job imports the other segments (split at ``segment``) and reports ``segment`` with ``fragments``."""
    groups = {0: [[1], [2]], 1: [[0], [2]], 2: [[0, 1]]}[segment]
    return Handled(imported(groups, [(segment, fragments)]), job=True)


ALL = Handled(imported([[0, 1], [2]]), job=True)


def value_case(key: str, value: Any, found: str, allowed: str, name: str | None = None) -> Case:
    label = name or f"{key or 'line'}-{json.dumps(value)}".replace(" ", "")
    where = f"'{key}'" if key else "line 2"
    return Case("importer", f"jsonl-{label}", bad_value(key, value),
                skips(1, ".jsonl line 2", where, allowed, f"got {found}"))


def extended(device: str, key: str, extra: list) -> Callable[[Path], ImportSummary]:
    """Add ``extra`` to ``line[device][key]`` of every line of s1 (values the converter ignores)."""
    def attack(tmp):
        def edit(lines):
            for line in lines:
                line[device][key] = line[device][key] + extra
            return lines
        edit_lines(stems(synth(tmp))[1].with_suffix(".jsonl"), edit)
        return importing(tmp)
    return attack


def renamed(name: Callable[[str], str]) -> Callable[[Path], None]:
    """Rename a segment's ``.mp4`` and ``.jsonl`` (given its ``.mp4``) to the stem ``name(stem)``."""
    def edit(mp4):
        for suffix in (".mp4", ".jsonl"):
            shutil.move(mp4.with_suffix(suffix), mp4.parent / f"{name(mp4.stem)}{suffix}")
    return edit


def directory(name: str, *files: str) -> Callable[[Path], Path]:
    """Makes ``tmp / name`` (if needed) holding the small files ``files``; returns it."""
    def make(tmp):
        (tmp / name).mkdir(exist_ok=True)
        for file in files:
            (tmp / name / file).write_text("x")
        return tmp / name
    return make


def damage_file(segment: int, suffix: str, edit: Callable[[Path], None]) -> Callable[[Path], ImportSummary]:
    def attack(tmp):
        edit(stems(synth(tmp))[segment].with_suffix(suffix))
        return importing(tmp)
    return attack


def write(content: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content)


def rewrite(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(edit(path.read_bytes()))


def replace_with_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


def video(count: int, width: int = 640, height: int = 360) -> Callable[[Path], None]:
    """Replace an mp4 with ``count`` grey frames of ``width`` x ``height``."""
    def edit(path):
        path.unlink()
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=20)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for _ in range(count):
                frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 128, np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return edit


def audio_only(path: Path) -> None:
    path.unlink()
    write_audio_only(path)


def with_index(edit: Callable[[dict, Path], dict], where: str = "raw/index.json") -> Callable[[Path], ImportSummary]:
    """Rewrite the synthetic index (``edit(index, tmp)``), save it at ``tmp / where`` and import from it."""
    def attack(tmp):
        raw = synth(tmp)
        index = edit(json.loads((raw / "index.json").read_text()), tmp)
        (tmp / where).parent.mkdir(parents=True, exist_ok=True)
        (tmp / where).write_text(json.dumps(index))
        return importing(tmp, tmp / where)
    return attack


def relpaths(edit: Callable[[list[str]], list[str]]) -> Callable[[dict, Path], dict]:
    return lambda index, tmp: {**index, "relpaths": edit(index["relpaths"])}


def moved_outside(index: dict, tmp: Path) -> dict:
    """s2's files moved next to (not under) basedir, and listed as ``../elsewhere/...``."""
    raw = tmp / "raw"
    s2 = stems(raw)[2]
    (tmp / "elsewhere" / "10.0").mkdir(parents=True)
    for suffix in (".mp4", ".jsonl"):
        shutil.move(s2.with_suffix(suffix), tmp / "elsewhere" / "10.0" / s2.with_suffix(suffix).name)
    return {**index, "relpaths": index["relpaths"][:2] + [f"../elsewhere/10.0/{s2.name}"]}


def absolute_relpath(index: dict, tmp: Path) -> dict:
    s2 = stems(tmp / "raw")[2]
    return {**index, "relpaths": index["relpaths"][:2] + [str(s2)]}


def src_case(name: str, make: Callable[[Path], Path], expect: Refused) -> Case:
    """Import from ``make(tmp)``; the refusal counts only if nothing was written to the store."""
    def attack(tmp):
        store = EpisodeStore.create(tmp / "store", (RES, RES))
        try:
            return import_vpt(make(tmp), store, resolution=RES, progress=False)
        finally:
            if EpisodeStore.open(tmp / "store").episode_ids:
                raise AssertionError("the import wrote episodes before refusing")
    return Case("importer", name, attack, expect)


def file_at(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(tmp):
        synth(tmp)
        (tmp / name).write_bytes(content)
        return tmp / name
    return make


def duplicate_version(tmp: Path) -> ImportSummary:
    """s0 copied into a second recorder-version folder: the same recording under two relpaths."""
    raw = synth(tmp)
    (raw / "9.0").mkdir()
    for suffix in (".mp4", ".jsonl"):
        shutil.copy(stems(raw)[0].with_suffix(suffix), raw / "9.0")
    return importing(tmp)


def check_duplicate_version(summary: ImportSummary, tmp: Path) -> None:
    imported([[0, 1], [2]], [])(ImportSummary(summary.imported, summary.already_present, []), tmp)
    [(path, reason)] = summary.skipped
    assert "9.0" in path and "same session and start" in reason, summary.skipped


def resumed(tmp: Path) -> ImportSummary:
    synth(tmp)
    importing(tmp)
    store = EpisodeStore.open(tmp / "store")
    return import_vpt(tmp / "raw", store, resolution=RES, progress=False)


def check_resumed(summary: ImportSummary, tmp: Path) -> None:
    assert summary.imported == [] and summary.skipped == [], summary
    assert summary.already_present == [relpath(tmp / "raw", 0), relpath(tmp / "raw", 2)], summary
    imported([[0, 1], [2]])(ImportSummary(), tmp)


def stale_store_race(tmp: Path) -> ImportSummary:
    """Two store objects of one store opened before two imports of the same data run one after the other
    (as two concurrent ``import-vpt`` runs see it): the second finds every episode added meanwhile."""
    synth(tmp)
    first = EpisodeStore.create(tmp / "store", (RES, RES))
    second = EpisodeStore.open(tmp / "store")
    import_vpt(tmp / "raw", first, resolution=RES, progress=False)
    return import_vpt(tmp / "raw", second, resolution=RES, progress=False)


def _cli_child(argv: list[str], codes) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        codes.put((main(argv), err.getvalue()))


def concurrent_imports(tmp: Path) -> list:
    """Two ``mstudio import-vpt`` processes started at once on the same data into one new store."""
    synth(tmp)
    context = multiprocessing.get_context("spawn")  # not fork: torch's thread pool would hang a forked child
    codes = context.Queue()
    argv = ["import-vpt", str(tmp / "raw"), str(tmp / "store"), "--resolution", str(RES)]
    workers = [context.Process(target=_cli_child, args=(argv, codes)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    return [codes.get(timeout=5) for _ in workers]


def check_concurrent_imports(results: list, tmp: Path) -> None:
    assert [code for code, _ in results] == [0, 0], results
    imported([[0, 1], [2]])(ImportSummary(), tmp)


def foreign_episode(tmp: Path) -> ImportSummary:
    """The store already holds an episode named like s0 but written by someone else (no segment list)."""
    raw = synth(tmp)
    store = EpisodeStore.create(tmp / "store", (RES, RES))
    n = 3
    store.append(relpath(raw, 0), {"frames": np.zeros((n, RES, RES, 3), np.uint8), "buttons": np.zeros(n, np.int16),
                                   "camera": np.full(n, 60, np.uint8), "env_buttons": np.zeros(n, np.uint32),
                                   "env_camera": np.zeros((n, 2), np.float32), "flags": np.zeros(n, np.uint8)},
                 {"source": "hand-made"})
    return import_vpt(raw, store, resolution=RES, progress=False)


def check_foreign(summary: ImportSummary, tmp: Path) -> None:
    store = EpisodeStore.open(tmp / "store")
    raw = tmp / "raw"
    assert summary.already_present == [relpath(raw, 0)], summary
    assert store.info(relpath(raw, 0)) == {"source": "hand-made"}
    assert [store.info(e).get("segments") for e in store.episode_ids[1:]] == [[relpath(raw, 1)], [relpath(raw, 2)]]


def arguments(store: Callable[[Path], Any] = lambda tmp: EpisodeStore.create(tmp / "store", (RES, RES)),
              **options: Any) -> Callable[[Path], ImportSummary]:
    """Import the synthetic data into ``store(tmp)`` with ``options`` over the defaults."""
    def attack(tmp):
        synth(tmp)
        return import_vpt(tmp / "raw", store(tmp), **{"resolution": RES, "progress": False, **options})
    return attack


def cli_import(*extra: Any, src: Callable[[Path], Any] = lambda tmp: tmp / "raw", store: str = "store",
               prepare: Callable[[Path], None] = lambda tmp: None, store_made: bool = True) -> Callable[[Path], str]:
    """``mstudio import-vpt SRC STORE --resolution 16 extra`` on the synthetic data after ``prepare(tmp)``;
    with ``store_made=False`` a refusal counts only if it created no store."""
    def attack(tmp):
        synth(tmp)
        prepare(tmp)
        try:
            return cli("import-vpt", src(tmp), tmp / store, "--resolution", RES, *extra)
        finally:
            if not store_made and (tmp / store).exists():
                raise AssertionError(f"a refused import-vpt created {tmp / store}")
    return attack


def cli_skips_one(tmp: Path) -> str:
    jsonl = stems(synth(tmp))[1].with_suffix(".jsonl")
    edit_lines(jsonl, lambda lines: [set_value(lines[0], "hotbar", 12), *lines[1:]])
    return cli("import-vpt", tmp / "raw", tmp / "store", "--resolution", RES)


def check_cli_skips_one(out: str, tmp: Path) -> None:
    s1 = stems(tmp / "raw")[1]
    assert "imported 2 episodes" in out and "1 segments skipped" in out and out.endswith("[exit status 3]"), out
    assert f"skipped {s1}.mp4: {s1.name}.jsonl line 1: 'hotbar' must be an integer 0-8 or null, got 12" in out, out
    imported([[0], [2]], [])(ImportSummary(), tmp)


def cli_all_bad(tmp: Path) -> str:
    for stem in stems(synth(tmp)):
        stem.with_suffix(".jsonl").write_text("not json\n")
    return cli("import-vpt", tmp / "raw", tmp / "store", "--resolution", RES)


def cli_twice(tmp: Path) -> str:
    synth(tmp)
    cli("import-vpt", tmp / "raw", tmp / "store", "--resolution", RES)
    return cli("import-vpt", tmp / "raw", tmp / "store", "--resolution", RES)


def round_trip(name: str, *synth_flags: Any) -> Callable[[Path], str]:
    """``mstudio synth`` into ``tmp / name`` then ``import-vpt`` of its index.json."""
    def attack(tmp):
        cli("synth", tmp / name, "--episodes", 1, "--frames", FRAMES, *synth_flags)
        return cli("import-vpt", tmp / name / "index.json", tmp / "store", "--resolution", RES)
    return attack


def check_round_trip(out: str, tmp: Path) -> None:
    assert f"imported 2 episodes ({3 * FRAMES} frames); 0 already in the store; 0 segments skipped" in out, out


def synth_cli(*argv: Any, dest: str = "raw", made: bool = False) -> Callable[[Path], str]:
    """``mstudio synth tmp/dest argv``; a refusal counts only if ``dest`` was not created (unless ``made``)."""
    def attack(tmp):
        existed = (tmp / dest).exists()
        try:
            return cli("synth", tmp / dest, *argv)
        finally:
            if not made and not existed and (tmp / dest).exists():
                raise AssertionError(f"a refused synth created {tmp / dest}")
    return attack


def synth_library(**options: Any) -> Callable[[Path], Path]:
    return lambda tmp: synthesize_contractor(tmp / "raw", **{"episodes": 1, "frames": FRAMES, **options})


def to_env(lines: Any, **options: Any) -> Callable[[Path], Any]:
    return lambda tmp: contractor_to_env(lines, **options)


def good_line(**changes: Any) -> dict:
    line = {"mouse": {"x": 640.0, "y": 360.0, "dx": 3.0, "dy": 0.0, "buttons": [], "newButtons": []},
            "keyboard": {"keys": ["key.keyboard.w"]}, "isGuiOpen": False, "hotbar": 0}
    for key, value in changes.items():
        line = set_value(line, key.replace("__", "."), value)
    return line


def check_numpy_line(actions: Any, tmp: Path) -> None:
    assert actions.env["hotbar.3"].tolist() == [0, 1] and actions.env["camera"][1].tolist() == [0.0, 3 * 0.15]


def assert_in(text: str, *parts: str) -> None:
    assert all(p in text for p in parts), text


def assert_skipped(summary: ImportSummary, count: int) -> None:
    assert len(summary.skipped) == count, summary.skipped


def assert_episodes(tmp: Path, lengths: list[int]) -> None:
    store = EpisodeStore.open(tmp / "store")
    assert [store.length(e) for e in store.episode_ids] == lengths


def assert_skipped_names(summary: ImportSummary, names: list[str], reason: str) -> None:
    assert [any(n in path for n in names) and reason in why for path, why in summary.skipped] == [True], summary.skipped
    assert len(summary.imported) == 1


def _i(name: str, run: Callable[[Path], Any], expect: Refused | Handled) -> Case:
    return Case("importer", name, run, expect)


def _synth(name: str, run: Callable[[Path], Any], expect: Refused | Handled) -> Case:
    return Case("synth", name, run, expect)


_INT = "an integer 0-8"
_NUMBER = "a finite number"
_INTS = "a list of integers"
_STRS = "a list of strings"
_BOOL = "true or false"
_OBJECT = "an object or null"

CASES = [
    # one bad value in one jsonl line: that segment is skipped and reported, everything else imported
    value_case("hotbar", 12, "12", _INT), value_case("hotbar", 9, "9", _INT), value_case("hotbar", -1, "-1", _INT),
    value_case("hotbar", 2.5, "2.5", _INT), value_case("hotbar", "3", '"3"', _INT),
    value_case("hotbar", True, "true", _INT), value_case("hotbar", [1], "[1]", _INT),
    value_case("hotbar", {}, "{}", _INT),
    value_case("mouse.dx", float("nan"), "NaN", _NUMBER), value_case("mouse.dx", float("inf"), "Infinity", _NUMBER),
    value_case("mouse.dx", -float("inf"), "-Infinity", _NUMBER), value_case("mouse.dx", "3", '"3"', _NUMBER),
    value_case("mouse.dx", True, "true", _NUMBER), value_case("mouse.dx", [1], "[1]", _NUMBER),
    value_case("mouse.dx", 1e300, "1e+300", "at most"),
    value_case("mouse.dy", float("nan"), "NaN", _NUMBER), value_case("mouse.dy", "up", '"up"', _NUMBER),
    value_case("mouse.dy", -1e40, "-1e+40", "at most"),
    value_case("mouse.x", "left", '"left"', _NUMBER), value_case("mouse.x", float("inf"), "Infinity", _NUMBER),
    value_case("mouse.y", True, "true", _NUMBER), value_case("mouse.y", {"a": 1}, '{"a": 1}', _NUMBER),
    value_case("mouse.buttons", [[0]], "[[0]]", _INTS), value_case("mouse.buttons", "0", '"0"', _INTS),
    value_case("mouse.buttons", 0, "0", _INTS), value_case("mouse.buttons", [0.5], "[0.5]", _INTS),
    value_case("mouse.buttons", [True], "[true]", _INTS), value_case("mouse.buttons", {"0": 1}, '{"0": 1}', _INTS),
    value_case("mouse.newButtons", [[0]], "[[0]]", _INTS), value_case("mouse.newButtons", "x", '"x"', _INTS),
    value_case("keyboard.keys", 5, "5", _STRS), value_case("keyboard.keys", [5], "[5]", _STRS),
    value_case("keyboard.keys", "key.keyboard.w", '"key.keyboard.w"', _STRS),
    value_case("keyboard.keys", [None], "[null]", _STRS), value_case("keyboard.keys", {"w": 1}, '{"w": 1}', _STRS),
    value_case("isGuiOpen", "yes", '"yes"', _BOOL), value_case("isGuiOpen", 1, "1", _BOOL),
    value_case("isGuiOpen", [], "[]", _BOOL),
    value_case("mouse", [1, 2], "[1, 2]", _OBJECT), value_case("mouse", 5, "5", _OBJECT),
    value_case("mouse", "m", '"m"', _OBJECT), value_case("keyboard", [], "[]", _OBJECT),
    value_case("keyboard", "k", '"k"', _OBJECT),
    value_case("", [1, 2], "[1, 2]", "a JSON object"), value_case("", 5, "5", "a JSON object"),
    value_case("", "text", '"text"', "a JSON object"), value_case("", None, "null", "a JSON object"),
    # values the recorder writes that the converter ignores or accepts: nothing is skipped
    _i("jsonl-unmapped-keys-ignored", extended("keyboard", "keys", ["key.keyboard.f24", "key.keyboard.f3"]), ALL),
    _i("jsonl-unknown-mouse-buttons-ignored", extended("mouse", "buttons", [7, 12]), ALL),
    _i("jsonl-null-hotbar", bad_value("hotbar", None, line=0), ALL),
    _i("jsonl-null-devices", bad_values({"mouse": None, "keyboard": None}),
       Handled(imported([[0, 1], [2]], exact=False), job=True)),
    _i("jsonl-extra-fields-ignored", bad_value("inventory", "not a list"), ALL),

    # whole jsonl files unreadable, empty, truncated or of the wrong length
    _i("jsonl-empty-file", damage_file(1, ".jsonl", write(b"")), skips(1, ".jsonl", "no action lines")),
    _i("jsonl-blank-lines", damage_file(1, ".jsonl", write(b"\n \n\n")), skips(1, ".jsonl", "no action lines")),
    _i("jsonl-binary", damage_file(1, ".jsonl", write(bytes(range(128, 256)))), skips(1, ".jsonl", "not UTF-8")),
    _i("jsonl-nul-bytes", damage_file(1, ".jsonl", write(b"\0" * 50)), skips(1, ".jsonl", "line 1", "not valid JSON")),
    _i("jsonl-cut-mid-line", damage_file(1, ".jsonl", rewrite(lambda d: d[:-30])),
       skips(1, ".jsonl line 4", "not valid JSON")),
    _i("jsonl-last-line-missing", damage_file(1, ".jsonl", rewrite(lambda d: b"".join(d.splitlines(True)[:-1]))),
       Handled(imported([[0, 1], [2]], exact=False), job=True)),  # as the recorder's extra trailing frame
    _i("jsonl-two-lines-missing", damage_file(1, ".jsonl", rewrite(lambda d: b"".join(d.splitlines(True)[:-2]))),
       skips(1, ".mp4", "4 video frames", "2 action lines")),
    _i("jsonl-lines-doubled", damage_file(1, ".jsonl", rewrite(lambda d: d + d)),
       skips(1, ".mp4", "4 video frames", "8 action lines")),
    _i("jsonl-a-directory", damage_file(1, ".jsonl", replace_with_dir), skips(1, ".jsonl", "is not a file")),
    _i("jsonl-missing", damage_file(1, ".jsonl", Path.unlink), skips(1, ".jsonl", "missing")),
    _i("jsonl-utf8-bom", damage_file(1, ".jsonl", rewrite(lambda d: b"\xef\xbb\xbf" + d)), ALL),
    _i("jsonl-crlf", damage_file(1, ".jsonl", rewrite(lambda d: d.replace(b"\n", b"\r\n"))), ALL),

    # videos without a video stream, undecodable, of the wrong frame count or size
    _i("mp4-audio-only", damage_file(1, ".mp4", audio_only), skips(1, ".mp4", "no video stream")),
    _i("mp4-garbage", damage_file(1, ".mp4", write(b"not a video" * 100)), skips(1, ".mp4", "cannot be decoded")),
    _i("mp4-empty-file", damage_file(1, ".mp4", write(b"")), skips(1, ".mp4", "cannot be decoded")),
    _i("mp4-cut-in-half", damage_file(1, ".mp4", rewrite(lambda d: d[:len(d) // 2])), skips(1, ".mp4")),
    _i("mp4-too-few-frames", damage_file(1, ".mp4", video(2)), skips(1, ".mp4", "2 video frames", "4 action lines")),
    _i("mp4-too-many-frames", damage_file(1, ".mp4", video(7)), skips(1, ".mp4", "7 video frames", "4 action lines")),
    _i("mp4-one-extra-frame", damage_file(0, ".mp4", video(FRAMES + 1)),
       Handled(lambda s, tmp: (assert_skipped(s, 0), assert_episodes(tmp, [4 + 4, 4])), job=True)),
    _i("mp4-wrong-size", damage_file(1, ".mp4", video(FRAMES, 320, 176)), skips(1, ".mp4", "320x176", "640x360")),
    _i("mp4-a-directory", damage_file(1, ".mp4", replace_with_dir), skips(1, ".mp4", "is not a file")),
    _i("mp4-missing", damage_file(1, ".mp4", Path.unlink), skips(1, ".mp4", "missing")),
    _i("first-segment-bad", damage_file(0, ".jsonl", write(b"{")), skips(0, ".jsonl line 1", "not valid JSON")),
    _i("last-segment-bad", damage_file(2, ".mp4", write(b"")), skips(2, ".mp4", "cannot be decoded")),

    # the VPT index: duplicates, hostile relpaths, basedirs
    _i("index-relpath-twice", with_index(relpaths(lambda r: [r[0], *r])),
       Handled(imported([[0, 1], [2]], [(0, ("listed 2 times", "imported once"))]), job=True)),
    _i("index-relpath-twice-spelled-differently", with_index(relpaths(lambda r: [*r, r[0].replace("/", "/./")])),
       Handled(imported([[0, 1], [2]], [(0, ("listed 2 times", "imported once"))]), job=True)),
    _i("index-relpath-leaves-basedir", with_index(moved_outside),
       Handled(imported([[0, 1]], [(2, ("relpath", "inside basedir", "../elsewhere"))]), job=True)),
    _i("index-relpath-absolute", with_index(absolute_relpath),
       Handled(imported([[0, 1]], [(2, ("relpath", "inside basedir"))]), job=True)),
    _i("index-basedir-relative", with_index(lambda index, tmp: {**index, "basedir": "raw/"}, "index.json"), ALL),
    _i("index-basedir-https", with_index(lambda index, tmp: {**index, "basedir": "https://openaipublic.blob.core."
                                                                                "windows.net/minecraft-rl/"}), ALL),
    _i("index-basedir-missing-key", with_index(lambda index, tmp: {"relpaths": index["relpaths"]}), ALL),
    _i("index-basedir-nowhere", with_index(lambda index, tmp: {**index, "basedir": "file:///nonexistent/data/"}),
       Handled(imported([], [(0, ("missing",)), (1, ("missing",)), (2, ("missing",))]), job=True)),
    _i("index-basedir-an-int", with_index(lambda index, tmp: {**index, "basedir": 5}),
       Refused(ValueError, "index.json", "'basedir'", "string", "int")),
    _i("index-relpaths-a-string", with_index(lambda index, tmp: {**index, "relpaths": "10.0/x"}),
       Refused(ValueError, "index.json", "'relpaths'", "list of non-empty strings", "str")),
    _i("index-relpaths-missing", with_index(lambda index, tmp: {"basedir": index["basedir"]}),
       Refused(ValueError, "index.json", "'relpaths'", "list of non-empty strings")),
    _i("index-relpaths-numbers", with_index(relpaths(lambda r: [1, 2])),
       Refused(ValueError, "index.json", "'relpaths'", "list of non-empty strings")),
    _i("index-relpaths-empty", with_index(relpaths(lambda r: [])),
       Refused(ValueError, "index.json", "no segments")),
    _i("index-a-list", with_index(lambda index, tmp: [index]), Refused(ValueError, "index.json", "'relpaths'")),
    src_case("index-truncated", file_at("index.json", b'{"basedir": "file:///x/", "relp'),
             Refused(ValueError, "index.json", "not a VPT index JSON")),
    src_case("index-binary", file_at("index.json", bytes(range(256))),
             Refused(ValueError, "index.json", "not a VPT index")),
    src_case("index-is-an-mp4", lambda tmp: stems(synth(tmp))[0].with_suffix(".mp4"),
             Refused(ValueError, ".mp4", "not a VPT index JSON")),
    src_case("src-nonexistent", lambda tmp: tmp / "does" / "not" / "exist" / "index.json",
             Refused(FileNotFoundError, "does/not/exist/index.json", "does not exist")),
    src_case("src-empty-directory", directory("empty"), Refused(ValueError, "empty", "no contractor segments")),
    src_case("src-unrelated-directory", directory("docs", "a.txt", "b.json"),
             Refused(ValueError, "docs", "no contractor segments")),

    # file names and duplicates across recorder versions
    _i("stem-not-contractor-name", damage_file(2, ".mp4", renamed(lambda stem: "clip")),
       Handled(lambda s, tmp: assert_skipped_names(s, ["clip"], "not <alias>-<session>-<YYYYMMDD>-<HHMMSS>"),
               job=True)),
    _i("stem-impossible-time", damage_file(2, ".mp4", renamed(lambda stem: f"{stem[:-6]}256100")),
       Handled(lambda s, tmp: assert_skipped_names(s, ["256100"], "not <alias>"), job=True)),
    _i("same-recording-in-two-versions", duplicate_version, Handled(check_duplicate_version, job=True)),

    # arguments, resume, and races with another import
    _i("store-of-other-size", arguments(store=lambda tmp: EpisodeStore.create(tmp / "store", (32, 32))),
       Refused(ValueError, "(32, 32)", "resolution=16")),
    _i("store-a-path", arguments(store=lambda tmp: str(tmp / "store")),
       Refused(TypeError, "store", "EpisodeStore", "str")),
    _i("resolution-zero", arguments(resolution=0), Refused(ValueError, "resolution", ">= 1", "0")),
    _i("resolution-float", arguments(resolution=16.0), Refused(ValueError, "resolution", "integer", "16.0")),
    _i("resolution-bool", arguments(resolution=True), Refused(ValueError, "resolution", "True")),
    _i("camera-unknown", arguments(camera="int"), Refused(ValueError, "camera", "'float'", "'int'")),
    _i("max-gap-an-int", arguments(max_gap=60), Refused(TypeError, "max_gap", "timedelta", "int")),
    _i("max-gap-negative", arguments(max_gap=timedelta(seconds=-1)), Refused(ValueError, "max_gap", ">= 0", "-1")),
    _i("resume-imports-nothing-twice", resumed, Handled(check_resumed, job=True)),
    _i("second-import-with-a-stale-store", stale_store_race, Handled(check_resumed, job=True)),
    _i("store-holds-a-foreign-episode-of-that-id", foreign_episode, Handled(check_foreign, job=True)),
    _i("two-imports-at-once-into-a-new-store", concurrent_imports, Handled(check_concurrent_imports, job=True)),

    # contractor_to_env called directly: errors name the line, key and value
    _i("to-env-hotbar-12", to_env([good_line(), good_line(hotbar=12)]),
       Refused(ValueError, "lines[1]", "'hotbar'", _INT, "12")),
    _i("to-env-hotbar-negative", to_env([good_line(hotbar=-1)]), Refused(ValueError, "lines[0]", "'hotbar'", "-1")),
    _i("to-env-buttons-nested", to_env([good_line(mouse__buttons=[[0]])]),
       Refused(ValueError, "lines[0]", "'mouse.buttons'", _INTS, "[[0]]")),
    _i("to-env-keys-an-int", to_env([good_line(keyboard__keys=5)]),
       Refused(ValueError, "lines[0]", "'keyboard.keys'", _STRS, "5")),
    _i("to-env-dx-nan", to_env([good_line(mouse__dx=float("nan"))]),
       Refused(ValueError, "lines[0]", "'mouse.dx'", _NUMBER, "NaN")),
    _i("to-env-dx-a-string", to_env([good_line(mouse__dx="3")]), Refused(ValueError, "'mouse.dx'", '"3"')),
    _i("to-env-gui-a-string", to_env([good_line(isGuiOpen="no")]), Refused(ValueError, "'isGuiOpen'", '"no"')),
    _i("to-env-line-none", to_env([good_line(), None]), Refused(ValueError, "lines[1]", "JSON object", "null")),
    _i("to-env-line-a-list", to_env([[1, 2]]), Refused(ValueError, "lines[0]", "JSON object", "[1, 2]")),
    _i("to-env-lines-a-string", to_env("{}"), Refused(TypeError, "lines", "sequence", "str")),
    _i("to-env-lines-a-dict", to_env(good_line()), Refused(TypeError, "lines", "sequence", "dict")),
    _i("to-env-camera-unknown", to_env([good_line()], camera="int"), Refused(ValueError, "camera", "'int'")),
    _i("to-env-numpy-values", to_env([good_line(), good_line(hotbar=np.int64(2), mouse__dx=np.float32(3))]),
       Handled(check_numpy_line)),
    _i("to-env-numpy-hotbar-out-of-range", to_env([good_line(hotbar=np.int64(11))]),
       Refused(ValueError, "lines[0]", "'hotbar'", "11")),
    _i("to-env-a-generator", to_env(good_line(hotbar=h) for h in (0, 2)), Handled(check_numpy_line)),

    # mstudio import-vpt: one-line errors before any store is made; a job reports what it skipped
    _i("cli-src-nonexistent", cli_import(src=lambda tmp: tmp / "nope" / "index.json", store_made=False),
       Refused(CliError, "import-vpt", "nope/index.json", "does not exist")),
    _i("cli-src-an-mp4", cli_import(src=lambda tmp: stems(tmp / "raw")[0].with_suffix(".mp4"), store_made=False),
       Refused(CliError, "import-vpt", ".mp4", "not a VPT index JSON")),
    _i("cli-src-empty-dir", cli_import(src=directory("e"), store_made=False),
       Refused(CliError, "import-vpt", "no contractor segments")),
    _i("cli-resolution-zero", cli_import("--resolution", "0", store_made=False),
       Refused(CliError, "--resolution", ">= 1", "0")),
    _i("cli-resolution-negative", cli_import("--resolution", "-8", store_made=False),
       Refused(CliError, "--resolution", "-8")),
    _i("cli-resolution-text", cli_import("--resolution", "big", store_made=False),
       Refused(CliError, "--resolution", "invalid int value: 'big'")),
    _i("cli-camera-unknown", cli_import("--camera", "int", store_made=False),
       Refused(CliError, "--camera", "invalid choice: 'int'")),
    _i("cli-store-a-file", cli_import(prepare=lambda tmp: (tmp / "store").write_text("x")),
       Refused(CliError, "store", "(a file)")),
    _i("cli-store-a-foreign-dir", cli_import(prepare=directory("store", "notes.txt")),
       Refused(CliError, "store", "not empty", "notes.txt")),
    _i("cli-store-of-other-size", cli_import(prepare=lambda tmp: EpisodeStore.create(tmp / "store", (32, 32))),
       Refused(CliError, "(32, 32)", "resolution=16")),
    _i("cli-store-corrupt-index", cli_import(prepare=lambda tmp: (EpisodeStore.create(tmp / "store", (RES, RES)),
                                                                  (tmp / "store" / "index.json").write_text("{"))),
       Refused(CliError, "index.json", "not valid JSON")),
    _i("cli-one-bad-segment", cli_skips_one, Handled(check_cli_skips_one, job=True)),
    _i("cli-every-segment-bad", cli_all_bad, Refused(CliError, "import-vpt", "none of the 3 segments", "skipped")),
    _i("cli-resume", cli_twice,
       Handled(lambda out, tmp: (assert_in(out, "imported 0 episodes", "2 already in the store"),
                                                          imported([[0, 1], [2]])(ImportSummary(), tmp)), job=True)),

    # mstudio synth: arguments checked before anything is written; round trips through awkward paths
    _synth("frames-zero", synth_cli("--frames", "0"), Refused(CliError, "synth", "frames", "[1, 65534]", "got 0")),
    _synth("frames-negative", synth_cli("--frames", "-3"), Refused(CliError, "frames", "-3")),
    _synth("frames-too-many", synth_cli("--frames", "70000"), Refused(CliError, "frames", "65534", "70000")),
    _synth("frames-text", synth_cli("--frames", "many"), Refused(CliError, "--frames", "invalid int value: 'many'")),
    _synth("episodes-negative", synth_cli("--episodes", "-1"), Refused(CliError, "episodes", ">= 0", "-1")),
    _synth("episodes-text", synth_cli("--episodes", "two"), Refused(CliError, "--episodes", "invalid int value")),
    _synth("seed-text", synth_cli("--seed", "x"), Refused(CliError, "--seed", "invalid int value")),
    _synth("dest-a-file", lambda tmp: (directory(".", "raw")(tmp), synth_cli(made=True)(tmp)),
           Refused(CliError, "synth", "raw", "a file")),
    _synth("dest-inside-a-file", lambda tmp: (directory(".", "f")(tmp), synth_cli(dest="f/raw", made=True)(tmp)),
           Refused(CliError, "synth", "f/raw", "not a directory")),
    _synth("library-frames-float", synth_library(frames=2.5), Refused(ValueError, "frames", "2.5")),
    _synth("library-episodes-bool", synth_library(episodes=True), Refused(ValueError, "episodes", "True")),
    _synth("library-frames-none", synth_library(frames=None), Refused(ValueError, "frames", "None")),
    _synth("round-trip-space", round_trip("raw data"), Handled(check_round_trip)),
    _synth("round-trip-percent", round_trip("raw%20data"), Handled(check_round_trip)),
    _synth("round-trip-hash", round_trip("raw#1"), Handled(check_round_trip)),
    _synth("round-trip-question-mark", round_trip("raw?x=1"), Handled(check_round_trip)),
    _synth("round-trip-unicode", round_trip("données é"), Handled(check_round_trip)),
    _synth("round-trip-negative-seed", round_trip("raw", "--seed", "-5"), Handled(check_round_trip)),
    _synth("round-trip-zero-episodes", lambda tmp: (cli("synth", tmp / "raw", "--episodes", 0, "--frames", FRAMES),
                                                    cli("import-vpt", tmp / "raw" / "index.json", tmp / "store",
                                                        "--resolution", RES))[1],
           Handled(lambda out, tmp: assert_in(out, f"imported 1 episodes ({FRAMES} frames)"))),
    _synth("twice-into-one-dest", lambda tmp: (cli("synth", tmp / "raw", "--episodes", 1, "--frames", FRAMES),
                                               round_trip("raw")(tmp))[1], Handled(check_round_trip)),
]

