"""The example plugins in ``plugins/``: installed through the ``curvlab.plugins`` entry-point group, listed by
``curvlab list``, and their own test suites (``plugins/<name>/tests``) run as part of the main suite.

Each plugin test module is imported from its file and its ``test_*`` functions re-exported here under
``test_<package>__<name>`` (marks and parametrizations travel with the functions), so ``pytest`` with the
project's ``testpaths = ["tests"]`` runs them. The registry-parametrized suites (``test_every_estimator.py``,
``test_grid.py``, ``test_faults.py``, ``test_fuzz.py``) pick the plugins up by themselves."""
from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

import curvlab
from curvlab.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = {"ekfac": ("curvlab-ekfac", "estimator"), "lars": ("curvlab-lars", "rule")}
REMEDY = "install it with `make setup` or `.venv/bin/pip install --no-deps --no-build-isolation -e plugins/{}`"


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_plugin_is_installed_and_registered(name):
    dist, kind = PLUGINS[name]
    assert _installed(dist), f"plugin distribution {dist!r} is not installed: " + REMEDY.format(dist)
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=curvlab.registry.ENTRY_POINT_GROUP)}
    assert eps.get(name) == dist.replace("-", "_"), eps
    registry = {"estimator": curvlab.ESTIMATORS, "rule": curvlab.RULES}[kind]
    assert name in registry.names() and not curvlab.registry.plugin_errors, curvlab.registry.plugin_errors


def test_curvlab_list_shows_the_plugins(capsys):
    cli_main(["list"])
    out = capsys.readouterr().out
    for name in PLUGINS:
        assert f"  {name} " in out, out


def test_registry_parametrized_suites_include_the_plugins():
    import test_every_estimator, test_grid  # noqa: E401  (collected from tests/, importable by name)

    assert "ekfac" in test_every_estimator.ESTIMATORS
    assert any(t[0] == "ekfac" for t in test_grid.TRIPLES) and any(t[1] == "lars" for t in test_grid.TRIPLES)


def _export(dist: str) -> None:
    for path in sorted((ROOT / "plugins" / dist / "tests").glob("test_*.py")):
        mod_name = f"_plugin_tests_{dist.replace('-', '_')}_{path.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for attr, obj in vars(module).items():
            if attr.startswith("test_") and callable(obj):
                globals()[f"test_{dist.replace('-', '_')}__{attr[5:]}"] = obj


for _dist, _ in PLUGINS.values():
    if _installed(_dist):
        _export(_dist)
