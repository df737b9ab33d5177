"""The public API: every public module declares ``__all__``, every name in it exists, ``dir(package)`` shows
exactly ``__all__``, and renamed names still work under their old name with a ``DeprecationWarning``."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Public modules that do not declare ``__all__`` yet, with the reason; remove an entry once it does
#: (the test then passes unexpectedly and fails, as a reminder).
PENDING_ALL: dict[str, str] = {}


def _public(path: Path) -> str | None:
    """The dotted name of a module file, or ``None`` if it or a package above it starts with ``_``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return None if any(part.startswith("_") for part in parts) else ".".join(parts)


def _modules(packages_only: bool = False) -> list[str]:
    found = set()
    for top in ("mstudio", "losses"):
        for path in (ROOT / top).rglob("__init__.py" if packages_only else "*.py"):
            name = _public(path)
            if name is not None:
                found.add(name)
    return sorted(found)


PACKAGES = _modules(packages_only=True)
MODULES = _modules()


def test_the_public_packages_are_found():
    expected = {"mstudio", "mstudio.actions", "mstudio.data", "mstudio.models", "mstudio.optim", "mstudio.train",
                "mstudio.trainer", "losses"}
    assert expected <= set(PACKAGES)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(reason=PENDING_ALL[n], strict=True)) if n in PENDING_ALL else n
     for n in MODULES],
)
def test_every_public_module_declares_all(name):
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__ list"


@pytest.mark.parametrize("name", MODULES)
def test_every_name_in_all_exists(name):
    module = importlib.import_module(name)
    names = getattr(module, "__all__", None)
    if names is None:
        pytest.skip(f"{name} has no __all__ (see test_every_public_module_declares_all)")
    assert len(set(names)) == len(names), f"{name}.__all__ repeats {sorted({n for n in names if names.count(n) > 1})}"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists {missing}, which {name} does not define"


@pytest.mark.parametrize("name", PACKAGES)
def test_dir_of_a_package_is_its_all(name):
    package = importlib.import_module(name)
    assert [n for n in dir(package) if not n.startswith("_")] == sorted(package.__all__)


@pytest.mark.parametrize(
    "module, old, new",
    [
        ("mstudio.distributions", "kl_divergence", "per_head_kl"),
        ("mstudio.distributions", "gaussian_kl", "diagonal_gaussian_kl"),
    ],
)
def test_renamed_functions_keep_their_old_name_with_a_warning(module, old, new):
    module = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: it is now {new}"):
        assert getattr(module, old) is getattr(module, new)
    assert old not in module.__all__ and new in module.__all__


def test_unknown_attributes_still_raise():
    from mstudio import distributions
    from mstudio.models.vpt import impala

    for module in (distributions, impala):
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            module.nope  # noqa: B018
