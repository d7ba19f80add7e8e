"""What a curvlab optimizer checkpoint holds beyond ``torch.optim.Optimizer.state_dict`` (the ``"curvlab"`` entry),
how it is checked against the optimizer it is loaded into, and how it is restored.

The entry holds the component names, the step counter and skipped steps, every preconditioned layer's curvature
state (factors, inverses / roots, EMA state), the capture backend's state (e.g. the MC sampler's random stream), the
adaptive dampings' histories and pending held-out records (:mod:`curvlab.damping`, :mod:`curvlab.factor_damping`)
and the parameter shapes per unit. Loading refuses, naming what differs, a checkpoint of other components, other
preconditioned layers or other parameter shapes, so a resumed run continues bit for bit or not at all.
"""
from __future__ import annotations

from typing import Any


def curvlab_entry(opt) -> dict[str, Any]:
    """The ``"curvlab"`` entry of ``opt.state_dict()``."""
    return {
        "names": dict(opt.names),
        "step": opt.step_count,
        "shapes": unit_shapes(opt),
        "skipped_steps": opt.skipped_steps,
        "curvature": {u.name: u.curvature.state_dict() for u in opt.units if u.preconditioned},
        "capture": opt.capture.state_dict() if opt.capture else {},
        "damping_history": list(opt.damping_history),
        "gamma_history": list(opt.gamma_history),
        "refresh_next": opt.refresh_next,
        **({"damping_pending": opt.lm.state_dict()} if opt.lm is not None and opt.lm.held_out else {}),
        **({"gamma_pending": opt.gamma.state_dict()} if opt.gamma is not None and opt.gamma.held_out else {}),
    }


def unit_shapes(opt) -> dict[str, list[tuple[int, ...]]]:
    """Every unit's parameter shapes (what a checkpoint must match)."""
    return {u.name: [tuple(p.shape) for p in u.params] for u in opt.units}


def check_entry(opt, extra: dict[str, Any] | None) -> None:
    """Raise ``ValueError`` naming the difference if ``extra`` was not written by an optimizer like ``opt``."""
    if extra is None:
        raise ValueError("not a curvlab optimizer checkpoint (no 'curvlab' entry)")
    if extra["names"] != opt.names:
        raise ValueError(f"checkpoint was written by {extra['names']}, this optimizer is {opt.names}")
    mine = {u.name for u in opt.units if u.preconditioned}
    if set(extra["curvature"]) != mine:
        raise ValueError(f"checkpoint layers {sorted(extra['curvature'])} do not match the model's {sorted(mine)}")
    mine_shapes = unit_shapes(opt)
    theirs = {k: [tuple(s) for s in v] for k, v in extra.get("shapes", mine_shapes).items()}
    wrong = sorted(k for k in set(theirs) | set(mine_shapes) if theirs.get(k) != mine_shapes.get(k))
    if wrong:
        raise ValueError(f"checkpoint parameter shapes do not match the model in {wrong[:4]}: checkpoint "
                         f"{[theirs.get(k) for k in wrong[:4]]}, model {[mine_shapes.get(k) for k in wrong[:4]]}; "
                         "load it into the model it was saved from")


def restore_entry(opt, extra: dict[str, Any]) -> None:
    """Put the checked entry's state into ``opt`` (after ``torch.optim.Optimizer.load_state_dict``)."""
    opt._t, opt.skipped_steps = extra["step"], extra["skipped_steps"]
    opt.damping_history[:] = extra.get("damping_history", [])
    opt.gamma_history[:] = extra.get("gamma_history", [])
    opt.refresh_next = bool(extra.get("refresh_next", False))
    if opt.lm is not None:
        opt.lm.load_state_dict(extra.get("damping_pending"))
    if opt.gamma is not None:
        opt.gamma.load_state_dict(extra.get("gamma_pending"))
    for unit in opt.units:
        if unit.preconditioned:
            unit.curvature.load_state_dict(extra["curvature"][unit.name])
    if opt.capture:
        opt.capture.load_state_dict(extra["capture"])
