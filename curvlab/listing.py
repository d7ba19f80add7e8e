"""What ``curvlab list`` prints: every registered component with its options, their defaults and suggestions.

``curvlab list`` prints the common options (:data:`curvlab.hyper.COMMON`, accepted by every optimizer) once at
the top, then per kind (estimators, rules, scalings, adapters, datasets, models) each component's one-line
summary, its options with their defaults (the :class:`curvlab.hyper.Option` table a component declares as its
``options`` class attribute; for datasets and models, the keyword arguments of the registered function, which a
run config's ``[data]`` / ``[model]`` table sets) and, for estimators and rules, the ``defaults`` they set for
options you do not pass (README "Defaults"; :func:`curvlab.hyper.declared_defaults`) and their ``suggested``
settings.
``curvlab list NAME ...`` prints just those components (any kind; ``common`` for the common options, or a kind
such as ``estimators``) with each option's meaning. An unknown name is an error that lists the names.
"""
from __future__ import annotations

import difflib
import inspect
import textwrap
from typing import Any

from .hyper import COMMON, Option
from .registry import ADAPTERS, DATASETS, ESTIMATORS, MODELS, RULES, SCALINGS, Registry, plugin_errors

__all__ = ["listing", "UnknownComponent", "KINDS"]

KINDS: tuple[Registry, ...] = (ESTIMATORS, RULES, SCALINGS, ADAPTERS, DATASETS, MODELS)
WIDTH = 110
PAD = 17


class UnknownComponent(LookupError):
    """``curvlab list NAME`` with a name that is registered nowhere; the message lists the names."""


def _summary(obj: Any) -> str:
    """The docstring's first paragraph on one line."""
    doc = inspect.cleandoc(obj.__doc__ or "")
    return " ".join(doc.split("\n\n", 1)[0].split())


def _value(value: Any) -> str:
    return value.__name__ if isinstance(value, type) else repr(value)


def _options(kind: str, obj: Any) -> dict[str, Option]:
    """A component's option table; for a dataset/model function, its keyword arguments as options."""
    if isinstance(obj, type):
        return dict(getattr(obj, "options", {}) or {})
    section = "data" if kind == "dataset" else "model"
    out = {}
    for name, par in inspect.signature(obj).parameters.items():
        if par.default is not inspect.Parameter.empty and par.kind is not inspect.Parameter.VAR_KEYWORD:
            note = par.annotation if isinstance(par.annotation, str) else getattr(par.annotation, "__name__", "")
            out[name] = Option(par.default, lambda n, v: v,
                               (f"{note}; " if note else "") + f"{section}.{name} in a run config")
    return out


def _wrap(text: str, indent: int, first: str = "") -> list[str]:
    lines = textwrap.wrap(text, WIDTH, initial_indent=" " * indent + first, subsequent_indent=" " * (indent + 2),
                          break_on_hyphens=False)
    return lines or [" " * indent + first]


def _pairs(table: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in table.items())


def _extras(kind: str, obj: Any) -> dict[str, str]:
    """Kind-specific facts shown with a single component."""
    if kind == "estimator":
        return {"fisher types": ", ".join(obj.fisher_types), "provides": ", ".join(sorted(obj.provides))}
    if kind == "rule":
        return {"requires": ", ".join(sorted(obj.requires)) or "-",
                **({"every step": ", ".join(sorted(obj.every_step))} if obj.every_step else {})}
    if kind == "adapter":
        return {"layers": ", ".join(t.__name__ for t in obj.module_types) or "-"}
    return {}


def _declared(kind: str, obj: Any) -> list[tuple[str, str]]:
    """``(label, text)`` of the defaults a component declares over the common ones (README "Defaults")."""
    if kind == "scaling" and isinstance(obj, type):
        config = {k: o.default for k, o in (getattr(obj, "options", {}) or {}).items()}
        return [(f"defaults with estimator {est}: ", _pairs(extra)) for est in ESTIMATORS.names()
                if (extra := obj.defaults_for(est, "natural", config))]
    if kind not in ("estimator", "rule") or not isinstance(obj, type):
        return []
    out = []
    table = dict(getattr(obj, "defaults", {}) or {})
    if kind == "estimator" and "kl_clip" in table:
        table["kl_clip"] = f"{_value(table['kl_clip'])} (with rules that apply it)"
    if table:
        out.append(("defaults: ", ", ".join(f"{k}={v if isinstance(v, str) else _value(v)}" for k, v in table.items())))
    for rule, extra in (getattr(obj, "rule_defaults", {}) or {}).items():
        out.append((f"defaults with rule {rule}: ", _pairs(extra)))
    if kind == "rule" and getattr(obj, "trust_region", False):
        out.append(("trust region: ", "applies kl_clip (an estimator's default kl_clip reaches it)"))
    return out


def _brief(kind: str, name: str, obj: Any) -> list[str]:
    """The lines of one component in the full listing: summary, options=defaults, suggested."""
    lines = _wrap(_summary(obj), PAD, "")
    lines[0] = f"  {name:<{PAD - 3}} " + lines[0].lstrip()
    opts = _options(kind, obj)
    label = "arguments" if kind in ("dataset", "model") else "options"
    if opts:
        lines += _wrap(_pairs({k: o.default for k, o in opts.items()}), PAD, f"{label}: ")
    if kind == "adapter":
        lines += _wrap(_extras(kind, obj)["layers"], PAD, "layers: ")
    for label, text in _declared(kind, obj):
        lines += _wrap(text, PAD, label)
    if kind in ("estimator", "rule") and getattr(obj, "suggested", None):
        lines += _wrap(_pairs(obj.suggested), PAD, "suggested: ")
    return lines


def _option_lines(opts: dict[str, Option], indent: int) -> list[str]:
    width = max(len(k) for k in opts)
    out = []
    for key, opt in opts.items():
        head = f"{key:<{width}} = {_value(opt.default)}" + (" (per param group)" if opt.per_group else "")
        out.append(" " * indent + head)
        if opt.doc:
            out += _wrap(opt.doc, indent + 4)
    return out


def _detail(kind: str, name: str, obj: Any) -> list[str]:
    """One component with every option's meaning (``curvlab list NAME``)."""
    where = f"{obj.__module__}.{obj.__qualname__}"
    lines = [f"{kind} {name}  ({where})", *_wrap(_summary(obj), 2)]
    lines += [f"  {k}: {v}" for k, v in _extras(kind, obj).items()]
    opts = _options(kind, obj)
    label = "arguments" if kind in ("dataset", "model") else "options"
    if opts:
        lines += [f"  {label}:", *_option_lines(opts, 4)]
    else:
        lines.append(f"  {label}: none of its own")
    for head, text in _declared(kind, obj):
        lines += _wrap(text, 2, head)
    if kind in ("estimator", "rule"):
        sug = getattr(obj, "suggested", None) or {}
        text = _pairs(sug) if sug else "-"
        if kind == "rule":
            text += " (overrides of the estimator's suggested settings)"
        lines += _wrap(text, 2, "suggested: ")
    if kind in ("estimator", "rule", "scaling"):
        lines.append("  plus the common options (curvlab list common)")
    return lines


def _common(detail: bool) -> list[str]:
    head = ("common options (every optimizer accepts them; curvlab.hyper.COMMON; estimators, rules and scalings "
            "may set other defaults, listed with them):")
    if detail:
        return [head, *_option_lines(COMMON, 2)]
    return [head, *_wrap(_pairs({k: o.default for k, o in COMMON.items()}), 2)]


def _all_names() -> dict[str, list[str]]:
    return {reg.kind + "s": reg.names() for reg in KINDS}


def listing(names: list[str] | None = None) -> str:
    """The text of ``curvlab list [NAME ...]``.

    Raises:
        UnknownComponent: a name that is no registered component, kind or ``common``; the message lists them.
    """
    if not names:
        lines = [*_common(False), ""]
        for reg in KINDS:
            items = list(reg.items())
            if items:
                lines.append(f"{reg.kind}s:")
                for name, obj in items:
                    lines += _brief(reg.kind, name, obj)
        lines += ["", "curvlab list NAME: one component with the meaning of each option"]
        if plugin_errors:
            lines.append("plugins that failed to load:")
            lines.extend(f"  {name}: {err}" for name, err in sorted(plugin_errors.items()))
        return "\n".join(lines)
    blocks = []
    for raw in names:
        key = raw.lower()
        if key == "common":
            blocks.append(_common(True))
            continue
        kinds = {reg.kind + "s": reg for reg in KINDS} | {reg.kind: reg for reg in KINDS}
        if key in kinds:
            reg = kinds[key]
            blocks.append([f"{reg.kind}s:", *(line for n, o in reg.items() for line in _brief(reg.kind, n, o))])
            continue
        found = [_detail(reg.kind, key, reg.get(key)) for reg in KINDS if key in reg]
        if not found:
            every = _all_names()
            pool = [n for ns in every.values() for n in ns] + ["common"]
            close = difflib.get_close_matches(key, pool, n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            listed = "; ".join(f"{kind}: {', '.join(ns)}" for kind, ns in every.items())
            raise UnknownComponent(f"no component named {raw!r}.{hint} Registered: {listed}; or 'common' (the options "
                                   "every optimizer accepts) or a kind (estimators, rules, ...)")
        blocks += found
    return "\n\n".join("\n".join(block) for block in blocks)
