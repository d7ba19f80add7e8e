"""Run configurations: files (TOML, YAML, JSON), command-line overrides, resolution and run ids.

A configuration has five parts (every one optional; :data:`DEFAULTS` fills the rest)::

    name = "kfac on digits"          # a label (not part of the run id)
    imports = ["my_package.plugin"]  # modules imported first (they may register components)

    [data]                           # a registered data set and its loader's keyword arguments
    name = "digits"
    [model]                          # a registered model builder and its keyword arguments
    name = "mlp"
    width = 64
    [optimizer]                      # curvlab.optimizer(estimator, rule, scaling, **hyper-parameters)
    estimator = "kfac"
    rule = "natural"
    suggested = true                 # start from ESTIMATORS.get(estimator).suggested (given keys win)
    lr = 0.1
    [train]                          # the loop: see TRAIN_KEYS
    epochs = 10

Every key can be overridden on the command line as ``--set optimizer.lr=0.1`` or ``--optimizer.lr 0.1``;
values are parsed as TOML values (``0.1``, ``true``, ``[1, 2]``, ``"text"``), a bare word is a string,
and ``null`` is None (``none`` stays a string: ``data.normalize=none``). :func:`resolve_config` validates everything (unknown keys get a "did you
mean") and completes the data and model arguments from their builders' signatures and the optimizer's
from the estimator's ``suggested`` values. :func:`run_id` hashes the resolved configuration (minus the
keys in :data:`NOT_HASHED`, which do not change results) into the run's directory name.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import inspect
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFAULTS", "TRAIN_KEYS", "NOT_HASHED", "ConfigError", "load_config", "parse_value", "set_dotted",
           "apply_overrides", "flatten", "resolve_config", "run_id", "canonical_json"]


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the accepted values."""


#: ``[train]`` keys: default and meaning.
TRAIN_KEYS: dict[str, tuple[Any, str]] = {
    "seed": (0, "model init, batch order and MC-sampling seed"),
    "epochs": (10, "passes over the training set"),
    "batch_size": (64, "minibatch size; 'full' (or any size >= the data set) = full batch"),
    "task": ("auto", "'auto' (the data set's), 'classification', 'regression' or 'autoencoder' (targets = inputs)"),
    "dtype": ("float32", "'float32' or 'float64' (model and data)"),
    "device": ("cpu", "torch device, e.g. 'cpu' or 'cuda'"),
    "threads": (1, "torch.set_num_threads for the run (0 = leave torch's setting); part of the run id"),
    "schedule": ("constant", "learning-rate schedule over all steps: 'constant', 'cosine' or 'linear' decay"),
    "warmup_epochs": (0.0, "linear learning-rate warm-up length in epochs"),
    "target_accuracy": (0.95, "test accuracy whose first epoch is reported as epochs_to_target"),
    "eval_train_examples": (10000, "train loss is evaluated on the first this many examples (0 = skip)"),
    "eval_batch_size": (4096, "batch size of evaluation passes"),
    "checkpoint": (True, "save a checkpoint after every epoch, so a killed run resumes where it stopped"),
    "damping_every": (0, "record the damping diagnostic (curvlab.diagnostics) every this many steps (0 = never)"),
}

DEFAULTS: dict[str, Any] = {
    "name": "",
    "imports": [],
    "data": {"name": "digits"},
    "model": {"name": "mlp"},
    "optimizer": {"estimator": "kfac", "rule": "natural", "scaling": "standard", "suggested": True},
    "train": {key: default for key, (default, _) in TRAIN_KEYS.items()},
}

#: Dotted keys left out of the run id: they do not change any result.
NOT_HASHED = ("name", "train.checkpoint", "data.cache_dir", "train.damping_every")

_SECTIONS = ("data", "model", "optimizer", "train")
_NAMES = {"estimator", "rule", "scaling"}


def _did_you_mean(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a configuration file: ``.toml`` (tomllib), ``.yaml``/``.yml`` (PyYAML, if installed), ``.json``.

    Raises:
        ConfigError: missing file, unknown suffix, a parse error (with the parser's location), YAML
            without PyYAML, or a top level that is not a table.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{path}: YAML configs need PyYAML (`pip install pyyaml`); or write the "
                                  "config as TOML, which Python reads without extra packages") from None
            data = yaml.safe_load(path.read_text())
        elif suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; use .toml, .yaml/.yml or .json")
    except ConfigError:
        raise
    except Exception as err:  # parser errors carry line/column
        raise ConfigError(f"{path}: cannot parse: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of keys, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """A command-line value: a TOML value if it parses as one, None for ``null`` (TOML has no null; the
    word ``none`` stays a string because options such as ``normalize`` take it), else the text."""
    if text.strip() == "null":
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    """``cfg[a][b][c] = value`` for ``key = "a.b.c"`` (creating tables on the way)."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"bad key {key!r}: expected dotted names like 'optimizer.lr'")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[:i + 1])!r} is a value, not a table")
        node = child
    node[parts[-1]] = value


def apply_overrides(cfg: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` with ``["a.b=value", ...]`` (values parsed by :func:`parse_value`) or
    ``{"a.b": value}`` applied."""
    out = copy.deepcopy(dict(cfg))
    items = overrides.items() if isinstance(overrides, Mapping) else [_split_assignment(o) for o in overrides]
    for key, value in items:
        set_dotted(out, key, value)
    return out


def _split_assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optimizer.lr=0.1")
    return key.strip(), parse_value(value.strip())


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` for every non-table leaf (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def _complete_call(section: str, fn: Any, given: dict[str, Any], reserved: set[str]) -> dict[str, Any]:
    """``given`` checked against ``fn``'s signature and completed with its JSON-able defaults."""
    params = inspect.signature(fn).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if n not in reserved and p.kind in
                (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key in given:
        if key in reserved or (key not in accepted and not takes_kwargs):
            raise ConfigError(f"{section}: unknown argument {key!r} for {section} {fn.registry_name!r}."
                              f"{_did_you_mean(key, accepted)} Accepted: {', '.join(accepted)}")
    out = dict(given)
    for name in accepted:
        default = params[name].default
        if name not in out and default is not inspect.Parameter.empty and _jsonable(default):
            out[name] = default
    return out


def _check_train(train: dict[str, Any]) -> None:
    def bad(key: str, what: str) -> ConfigError:
        return ConfigError(f"train.{key} must be {what}, got {train[key]!r}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key in train:
        if key not in TRAIN_KEYS:
            raise ConfigError(f"unknown key train.{key}.{_did_you_mean(key, list(TRAIN_KEYS))} "
                              f"Accepted: {', '.join(TRAIN_KEYS)}")
    for key in ("epochs", "eval_batch_size"):
        if not is_int(train[key]) or train[key] < 1:
            raise bad(key, "an integer >= 1")
    for key in ("seed", "threads", "eval_train_examples", "damping_every"):
        if not is_int(train[key]) or train[key] < 0:
            raise bad(key, "an integer >= 0")
    if train["batch_size"] != "full" and (not is_int(train["batch_size"]) or train["batch_size"] < 1):
        raise bad("batch_size", "an integer >= 1 or 'full'")
    choices = {"task": ("auto", "classification", "regression", "autoencoder"), "dtype": ("float32", "float64"),
               "schedule": ("constant", "cosine", "linear")}
    for key, allowed in choices.items():
        if train[key] not in allowed:
            raise bad(key, "one of " + ", ".join(map(repr, allowed)))
    w = train["warmup_epochs"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
        raise bad("warmup_epochs", "a number >= 0")
    t = train["target_accuracy"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
        raise bad("target_accuracy", "a number in (0, 1]")
    if not isinstance(train["checkpoint"], bool):
        raise bad("checkpoint", "true or false")
    if not isinstance(train["device"], str):
        raise bad("device", "a device name such as 'cpu' or 'cuda'")


def _resolve_optimizer(given: dict[str, Any]) -> dict[str, Any]:
    """Registry names normalized, ``suggested`` expanded, each hyper-parameter validated (not defaulted)."""
    import curvlab
    from curvlab.hyper import COMMON, merge_options

    out = dict(given)
    suggested = out.pop("suggested", True)
    if not isinstance(suggested, bool):
        raise ConfigError(f"optimizer.suggested must be true or false, got {suggested!r}")
    try:
        est = curvlab.ESTIMATORS.get(out["estimator"])
        rule = curvlab.RULES.get(out["rule"])
        scaling = curvlab.SCALINGS.get(out["scaling"])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"optimizer: {err}") from None
    out.update(estimator=est.registry_name, rule=rule.registry_name, scaling=scaling.registry_name)
    if suggested:
        for key, value in est.suggested.items():
            out.setdefault(key, value)
    if "seed" in out:
        raise ConfigError("optimizer.seed: the optimizer is seeded from train.seed; remove optimizer.seed")
    options = merge_options(COMMON, est.options, rule.options, scaling.options)
    for key in list(out):
        if key in _NAMES:
            continue
        if key not in options:
            raise ConfigError(f"optimizer: unknown hyper-parameter {key!r} for estimator {est.registry_name!r}, "
                              f"rule {rule.registry_name!r}, scaling {scaling.registry_name!r}."
                              f"{_did_you_mean(key, list(options))} Accepted: {', '.join(sorted(options))}")
        try:
            value = options[key].check(key, out[key])
        except (ValueError, TypeError) as err:
            raise ConfigError(f"optimizer: {err}") from None
        out[key] = list(value) if isinstance(value, tuple) else value
    out["suggested"] = False  # expanded above: the resolved config is explicit (and resolving is idempotent)
    return out


def resolve_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``cfg`` and complete it (see the module docstring). Idempotent.

    Raises:
        ConfigError: naming the offending key (unknown keys, unknown component names, invalid values).
    """
    import curvlab
    from curvlab import data as _data, models as _models  # noqa: F401  (register the built-ins)
    from curvlab.validation import pop_val_keys

    unknown = [k for k in cfg if k not in DEFAULTS]
    if unknown:
        hint = " (a [sweep] table is read by `curvlab sweep`, not `curvlab run`)" if "sweep" in unknown else \
            _did_you_mean(unknown[0], list(DEFAULTS))
        raise ConfigError(f"unknown top-level key {unknown[0]!r}.{hint} Accepted: {', '.join(DEFAULTS)}")
    out: dict[str, Any] = {"name": cfg.get("name", "") or "", "imports": list(cfg.get("imports", []) or [])}
    if not isinstance(out["name"], str):
        raise ConfigError(f"name must be a string, got {out['name']!r}")
    for module in out["imports"]:
        try:
            importlib.import_module(module)
        except Exception as err:
            raise ConfigError(f"imports: cannot import {module!r}: {type(err).__name__}: {err}") from None
    for section in _SECTIONS:
        given = cfg.get(section, {}) or {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"[{section}] must be a table of keys, got {given!r}")
        out[section] = {**DEFAULTS[section], **copy.deepcopy(dict(given))}
    _check_train(out["train"])
    for section, registry, reserved in (("data", curvlab.DATASETS, {"dtype"}),
                                        ("model", curvlab.MODELS, {"input_shape", "num_outputs"})):
        args = dict(out[section])
        try:
            fn = registry.get(args.pop("name"))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{section}.name: {err}") from None
        try:
            val = pop_val_keys(args) if section == "data" else {}  # every data set takes them
        except ValueError as err:
            raise ConfigError(str(err)) from None
        out[section] = {"name": fn.registry_name, **_complete_call(section, fn, args, reserved), **val}
    out["optimizer"] = _resolve_optimizer(out["optimizer"])
    bad = [k for k, v in flatten(out).items() if not _jsonable(v)]
    if bad:
        raise ConfigError(f"{bad[0]}: values must be numbers, strings, booleans, lists or tables")
    return out


def canonical_json(obj: Any) -> str:
    """Sorted, compact JSON: the same configuration always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def run_id(resolved: Mapping[str, Any]) -> str:
    """12 hex digits of the SHA-256 of the resolved configuration without :data:`NOT_HASHED` keys."""
    flat = {k: v for k, v in flatten(resolved).items() if k not in NOT_HASHED}
    return hashlib.sha256(canonical_json(flat).encode()).hexdigest()[:12]
