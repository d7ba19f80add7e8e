"""Hook capture backend: layer inputs and output gradients from the user's own forward and backward.

The user's loop stays the plain one (forward, ``loss.backward()``, ``opt.step()``) for every Fisher type:

* a forward hook on every tracked layer keeps its input ``x`` (detached) and its output ``s``, and passes
  a copy of ``s`` downstream so that in-place activations cannot change the tensor whose gradient is read;
* a forward hook on the model keeps the output ``f`` and, on statistics steps, registers
  - for ``fisher="empirical"`` (and rules that need real per-example gradients): a tensor hook on each
    ``s`` that stores ``N * grad_output`` (pitfall P0: the gradient of a MEAN loss carries ``1/N``);
  - for ``fisher="mc"``/``"type2"``: a tensor hook on ``f``. It fires inside ``loss.backward()`` before the
    graph below ``f`` is freed and back-propagates the vectors of :func:`curvlab.losses.output_vectors`
    with a re-entrant ``torch.autograd.grad(f, s, v, retain_graph=True)``; the real gradient is untouched.

Only forward passes that are back-propagated count: a record left without gradients (an evaluation
forward with grad enabled, say) is dropped at the next step. Several back-propagated forwards between
two steps (gradient accumulation) are pooled.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from .losses import output_vectors
from .stats import LayerStats

_state = threading.local()


def is_paused() -> bool:
    """True while inside :func:`paused`: curvlab hooks then record nothing."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def paused():
    """Suspend every curvlab capture hook in this thread (used by :mod:`curvlab.exact`, evaluation code)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


@dataclass
class LayerRecord:
    """What one forward/backward of one layer left behind."""

    inputs: torch.Tensor                       # layer input x (detached)
    output: torch.Tensor | None                # layer output s (graph kept until the backward used it)
    version: int
    batch_size: int = 0                        # N of the loss this forward fed
    real_grad: torch.Tensor | None = None      # N * dL/ds, per-example scale
    backpropagated: bool = False               # the backward reached this layer (inputs-only needs)
    fisher_grads: list[tuple[torch.Tensor, float]] = field(default_factory=list)


class HookCapture:
    """Registers the hooks on ``model`` and hands :class:`curvlab.stats.LayerStats` to the optimizer."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], *, loss: str, fisher: str,
                 mc_samples: int, want_inputs: bool, want_fisher_grads: bool, want_real_grads: bool,
                 is_stat_step, seed: int = 0, every_step: frozenset[str] = frozenset()) -> None:
        self.model, self.layers = model, layers
        self.loss, self.fisher, self.mc_samples = loss, fisher, mc_samples
        self.want_inputs = want_inputs or want_fisher_grads or want_real_grads or bool(every_step)
        self.stat_needs = ({"inputs"} | ({"fisher_grads"} if want_fisher_grads else set())
                           | ({"real_grads"} if want_real_grads else set()) | set(every_step))
        self.every_step = frozenset(every_step)   # needs recorded on every step (a rule's, e.g. FOP's)
        self.is_stat_step = is_stat_step
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pending: dict[str, LayerRecord] = {}
        self._records: dict[str, list[LayerRecord]] = {name: [] for name in layers}
        # Hooks registered on a tensor that refer back to it form a cycle through autograd (C++) that Python's
        # garbage collector cannot see: every such reference goes through a holder emptied at the latest by
        # clear() (each step), so a step's graph is always freed (also for forwards never back-propagated).
        self._holders: list[list] = []
        self._busy = False
        self._handles = []
        if self.want_inputs:
            for name, module in layers.items():
                self._handles.append(module.register_forward_hook(self._layer_hook(name)))
            self._handles.append(model.register_forward_hook(self._model_hook))

    # -- hooks -----------------------------------------------------------------------------------------
    def _needs_now(self) -> frozenset[str] | set[str]:
        """What this forward must record: everything on statistics steps, ``every_step`` otherwise."""
        if not torch.is_grad_enabled() or is_paused() or self._busy:
            return frozenset()
        return self.stat_needs if self.is_stat_step() else self.every_step

    def _layer_hook(self, name: str):
        def hook(module, inputs, output):
            if not self._needs_now() or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            if inputs[0].shape[0] == 0:
                raise ValueError(f"layer {name!r} got an empty batch (0 examples): curvature statistics need at "
                                 "least one example; skip empty batches in your data loader")
            needs = self._needs_now()
            self._pending[name] = LayerRecord(inputs[0].detach(), output, output._version)
            if not needs & {"real_grads", "fisher_grads"}:
                return None
            # Downstream gets a copy, so an in-place op after the layer (nn.ReLU(inplace=True)) cannot
            # modify the tensor whose gradient we read: one memcpy per layer, on statistics steps only.
            return output.clone()
        return hook

    def _model_hook(self, module, inputs, out):
        pending, self._pending = self._pending, {}
        needs = self._needs_now()
        if not pending or not needs:
            return
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"curvlab needs the model to return one tensor (the input of the loss); got {type(out).__name__}"
            )
        for name, rec in pending.items():
            if needs & {"real_grads", "fisher_grads"} and rec.output._version != rec.version:
                raise RuntimeError(
                    f"the output of layer {name!r} was modified in place while the model ran; curvlab reads the "
                    "gradient with respect to it. Avoid in-place operations on the layer's own output tensor."
                )
            rec.batch_size = out.shape[0]
            self._records[name].append(rec)
            if "real_grads" in needs:
                rec.output.register_hook(self._real_grad_hook(rec))
        if "fisher_grads" in needs:
            holder = [out]
            self._holders.append(holder)
            out.register_hook(self._fisher_hook(holder, list(pending.items()), keep="real_grads" in needs))
        elif "real_grads" not in needs:
            for rec in pending.values():           # inputs only: just note that the backward ran
                rec.output.register_hook(self._mark_hook(rec))
                rec.output = None

    def _mark_hook(self, rec: LayerRecord):
        def hook(grad):
            if not self._busy:
                rec.backpropagated = True
        return hook

    def _real_grad_hook(self, rec: LayerRecord):
        def hook(grad):
            if not self._busy:
                rec.real_grad = grad.detach() * rec.batch_size
        return hook

    def _fisher_hook(self, holder: list, named: list[tuple[str, LayerRecord]], keep: bool):
        def hook(grad):
            if self._busy or not holder:
                return None
            out = holder.pop()
            outputs = [rec.output for _, rec in named]
            self._busy = True
            try:
                for vec, weight in output_vectors(self.loss, self.fisher, out, self.mc_samples,
                                                  self._generator(out.device)):
                    grads = torch.autograd.grad(out, outputs, grad_outputs=vec, retain_graph=True,
                                                allow_unused=True)
                    for (_, rec), g in zip(named, grads):
                        if g is not None:
                            rec.fisher_grads.append((g.detach(), weight))
            finally:
                self._busy = False
                if not keep:
                    for _, rec in named:
                        rec.output = None
            return None
        return hook

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    # -- consumer side ---------------------------------------------------------------------------------
    def pop(self, name: str) -> list[LayerRecord]:
        """Records of ``name`` whose backward ran since the last call (possibly empty)."""
        records = self._records[name]
        self._records[name] = []
        done = [r for r in records if r.real_grad is not None or r.fisher_grads or r.backpropagated]
        for r in records:                      # also the never back-propagated ones: breaks the hook cycle
            r.output = None
        return done

    def layer_stats(self, unit, dtype: torch.dtype, grad: torch.Tensor | None) -> LayerStats | None:
        """The :class:`curvlab.stats.LayerStats` of ``unit`` for this step, or ``None`` if nothing was captured."""
        records = self.pop(unit.name)
        if not records:
            return None
        return LayerStats(unit.name, unit.module, unit.adapter, dtype, records, grad)

    def clear(self) -> None:
        for rec in self._pending.values():
            rec.output = None
        self._pending = {}
        for name, records in self._records.items():
            for rec in records:
                rec.output = None
            self._records[name] = []
        for holder in self._holders:
            holder.clear()
        self._holders = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict:
        return {"generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        for dev, gstate in state.get("generators", {}).items():
            self._generator(torch.device(dev)).set_state(gstate)
