"""The compile cache directory: the user's ``TORCHINDUCTOR_CACHE_DIR`` if set, else a persistent mstudio default."""

import os

import pytest

from mstudio.compile import CACHE_ENV, compile_cache_dir, configure_compile_cache


def test_the_users_directory_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert configure_compile_cache() == tmp_path / "mine"
    assert (tmp_path / "mine").is_dir() and os.environ[CACHE_ENV] == str(tmp_path / "mine")


def test_the_default_is_under_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "mstudio" / "inductor"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache_dir() == tmp_path / "home" / ".cache" / "mstudio" / "inductor"
    assert configure_compile_cache() == tmp_path / "home" / ".cache" / "mstudio" / "inductor"
    assert os.environ[CACHE_ENV] == str(tmp_path / "home" / ".cache" / "mstudio" / "inductor")


def test_an_unusable_directory_is_named(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file" / "cache"))
    with pytest.raises(OSError, match="cannot create the compile cache directory .*file/cache"):
        configure_compile_cache()


def test_torchs_own_default_in_the_variable_is_not_taken_for_a_choice(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its /tmp default into the variable on its first compile or torch._dynamo.reset()
    monkeypatch.setenv(CACHE_ENV, default_cache_dir())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert configure_compile_cache() == tmp_path / "mstudio" / "inductor"
