"""Hook capture backend: layer inputs and output gradients from the user's own forward and backward.

The capture contract
--------------------
Curvature statistics come **only from training passes**: forward passes of the model whose backward
accumulates into the ``.grad`` of the optimized parameters before ``step()`` (``loss.backward()``, also
several of them for gradient accumulation over micro-batches). Everything else run on the model leaves the
curvature, the random draws of ``fisher="mc"`` and the next update bit-for-bit unchanged:

* passes differentiated with ``torch.autograd.grad`` (or ``backward(inputs=...)`` that does not reach a
  layer's parameters): at each of curvlab's gradient hooks the autograd engine is asked whether the running
  backward will execute the ``AccumulateGrad`` node of the layer's trainable parameters
  (``torch._C._will_engine_execute_node``); if not, the hook does nothing -- no record, no hidden pass, no
  random draw;
* forward passes that are never back-propagated (evaluation with grad enabled, a forward after the last
  ``step()``): their records wait for a backward that never comes and are dropped at the next ``step()``;
* passes under ``torch.no_grad()``, inside :func:`paused`, and layers called outside a forward of the model
  the optimizer was built on (``model.head(x)``) are not recorded at all;
* ``optimizer.zero_grad()`` discards what earlier training passes recorded (their gradients are gone too);
  forwards not yet back-propagated are kept (``forward; zero_grad; backward`` works); inside :func:`paused` it
  discards nothing (an evaluation closure run between a training pass and ``step()``). ``model.zero_grad()``
  or ``p.grad = None`` by hand are not seen: use the optimizer's ``zero_grad``.

Several training passes between two steps are pooled as one batch: the objective is the MEAN over all their
examples, i.e. each micro-batch's mean loss times ``N_m / N_step`` (``1/k`` for k equal micro-batches: the
usual idiom, so that ``p.grad`` is the whole batch's mean gradient). Per-example output gradients are therefore read as
``N_step * dL/ds`` with ``N_step`` the number of examples of all training passes of the step (pitfall P0);
the optimizer checks this on the first statistics step where the loss makes it checkable
(:func:`curvlab.losses.check_output_gradients`).

A layer applied several times in one forward (weight sharing, a recurrent cell, a shared projection): its
uses are one example's contributions along a shared dimension, like sequence positions -- their rows are
concatenated per example (``(N, T_1 + T_2 + ..., d)``, ALGORITHMS.md section 11), so per-example gradients sum
over uses and K-FAC applies its expand/reduce approximation to them.

What other hook-based tools on the same model see: curvlab registers forward hooks on the model and on every
preconditioned layer, and tensor hooks on the layer outputs (a copy of each output goes downstream on
statistics steps, so that in-place activations cannot change the tensor whose gradient is read). Inside a
training backward on a statistics step with ``fisher="mc"``/``"type2"``, curvlab back-propagates its
sampled vectors from the model output to the layer outputs with a re-entrant ``torch.autograd.grad``; tensor
hooks and module backward hooks that another tool registered BETWEEN the model output and those layers see
these passes. During any other tool's own passes (``torch.autograd.grad``, e.g. curvlinops' operators)
curvlab does nothing. Another tool's extra ``.backward()`` into the parameters is, by the contract, a
training pass.

Mechanics (one statistics step): a forward pre-hook on the model opens a pass; every tracked layer's forward
hook appends a use (input ``x`` detached, output ``s``); the model's forward hook closes the pass and
registers, per needs, tensor hooks on each ``s`` (``real_grads``: ``dL/ds`` of the real loss; inputs only:
a mark that the training backward reached the layer) and on the model output ``f`` (``fisher_grads``: the
vectors of :func:`curvlab.losses.output_vectors` back-propagated to every use's ``s``; the loss check: ``dL/df``).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from .losses import loss_terms, output_vectors
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


def accumulates_into(params: list[torch.Tensor]) -> bool:
    """True when the backward running now accumulates into the ``.grad`` of any of ``params``.

    Called from gradient hooks. ``torch.autograd.grad`` executes no ``AccumulateGrad`` node (the engine refuses
    the question for a leaf that is one of its inputs, which answers it too); ``backward(inputs=...)`` executes
    only those of its inputs."""
    for p in params:
        if not p.requires_grad:
            continue
        try:
            if torch._C._will_engine_execute_node(get_gradient_edge(p).node):
                return True
        except RuntimeError:           # "... we are currently running autograd.grad()"
            return False
    return False


@dataclass
class Use:
    """One application of a layer in one forward pass."""

    inputs: torch.Tensor                       # layer input x (detached)
    output: torch.Tensor | None                # layer output s (graph kept until the backward used it)
    version: int
    real_grad: torch.Tensor | None = None      # dL/ds of the training loss (summed over training backwards)
    fisher_grads: list[tuple[torch.Tensor, float]] = field(default_factory=list)


@dataclass(eq=False)
class Pass:
    """One forward of the model: its batch size and, for the loss check, its output and ``dL/df``."""

    batch_size: int = 0
    terms: int = 0                             # loss terms of the pass: batch_size * loss terms per example
    trained: bool = False                      # a training backward reached one of its layers
    output: torch.Tensor | None = None         # model output f (detached), loss check only
    output_grad: torch.Tensor | None = None    # dL/df of the training loss, loss check only


@dataclass(eq=False)
class LayerRecord:
    """What one forward/backward of one layer left behind: its uses, in call order.

    ``real_grad`` (``dL/ds``) times ``real_scale`` is the gradient of each of the LAYER's examples' loss
    (``N_step`` for ``(N, C)`` outputs: pitfall P0; module docstring), times ``term_scale`` the gradient of one
    loss term (``N_terms`` of the step; :mod:`curvlab.losses`)."""

    uses: list[Use]
    params: list[nn.Parameter] = field(default_factory=list)
    run: Pass = field(default_factory=Pass)
    trained: bool = False
    real_scale: float = 1.0
    term_scale: float = 1.0

    @property
    def batch_size(self) -> int:
        """Examples of the layer in this pass (the leading dimension of its input)."""
        return self.uses[0].inputs.shape[0]

    @property
    def terms(self) -> int:
        """Loss terms of the pass this record belongs to."""
        return self.run.terms or self.batch_size


class HookCapture:
    """Registers the hooks on ``model`` and hands :class:`curvlab.stats.LayerStats` to the optimizer."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], *, loss: str, fisher: str,
                 mc_samples: int, want_inputs: bool, want_fisher_grads: bool, want_real_grads: bool,
                 is_stat_step, seed: int = 0, every_step: frozenset[str] = frozenset(),
                 loss_terms_per_example: int | None = None) -> None:
        self.model, self.layers = model, layers
        self.loss, self.fisher, self.mc_samples = loss, fisher, mc_samples
        self.loss_terms_per_example = loss_terms_per_example
        self.want_inputs = want_inputs or want_fisher_grads or want_real_grads or bool(every_step)
        self.stat_needs = ({"inputs"} | ({"fisher_grads"} if want_fisher_grads else set())
                           | ({"real_grads"} if want_real_grads else set()) | set(every_step))
        self.every_step = frozenset(every_step)   # needs recorded on every step (a rule's, e.g. FOP's)
        self.is_stat_step = is_stat_step
        #: record ``f`` and ``dL/df`` of training passes for :func:`curvlab.losses.check_output_gradients`
        self.check_loss = False
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._depth = 0                                       # nesting of the model's forward
        self._pending: dict[str, list[Use]] = {}
        self._records: dict[str, list[LayerRecord]] = {name: [] for name in layers}
        self._passes: list[Pass] = []
        # Hooks registered on a tensor that refer back to it form a cycle through autograd (C++) that Python's
        # garbage collector cannot see: every such reference goes through a holder emptied at the latest by
        # clear() (each step), so a step's graph is always freed (also for forwards never back-propagated).
        self._holders: list[list] = []
        self._busy = False
        self._handles = []
        if self.want_inputs:
            for name, module in layers.items():
                self._handles.append(module.register_forward_hook(self._layer_hook(name)))
            self._handles.append(model.register_forward_pre_hook(self._open_pass))
            self._handles.append(model.register_forward_hook(self._model_hook, always_call=True))

    # -- hooks -----------------------------------------------------------------------------------------
    def _needs_now(self) -> frozenset[str] | set[str]:
        """What this forward must record: everything on statistics steps, ``every_step`` otherwise."""
        if not torch.is_grad_enabled() or is_paused() or self._busy:
            return frozenset()
        return self.stat_needs if self.is_stat_step() else self.every_step

    def _open_pass(self, module, inputs):
        if module is not self.model:           # a structural copy that kept the pre-hooks (curvlab.exact)
            return
        if self._depth == 0:
            self._drop_pending()
        self._depth += 1

    def _layer_hook(self, name: str):
        def hook(module, inputs, output):
            if self._depth == 0:
                return None                    # called outside a forward of the model: not a training pass
            needs = self._needs_now()
            if not needs or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            if inputs[0].shape[0] == 0:
                raise ValueError(f"layer {name!r} got an empty batch (0 examples): curvature statistics need at "
                                 "least one example; skip empty batches in your data loader")
            self._pending.setdefault(name, []).append(Use(inputs[0].detach(), output, output._version))
            if not needs & {"real_grads", "fisher_grads"}:
                return None
            # Downstream gets a copy, so an in-place op after the layer (nn.ReLU(inplace=True)) cannot
            # modify the tensor whose gradient we read: one memcpy per layer and use, on statistics steps only.
            return output.clone()
        return hook

    def _model_hook(self, module, inputs, out):
        if module is not self.model:
            return
        self._depth = max(self._depth - 1, 0)
        if self._depth:
            return                                            # an inner call of the model: the outer one closes
        pending, self._pending = self._pending, {}
        needs = self._needs_now()
        if not pending or not needs or out is None:       # None: the forward raised (always_call hook)
            self._drop(pending)
            return
        if not isinstance(out, torch.Tensor):
            self._drop(pending)
            raise TypeError(
                f"curvlab needs the model to return one tensor (the input of the loss); got {type(out).__name__}"
            )
        run = Pass(batch_size=out.shape[0],
                   terms=out.shape[0] * loss_terms(out, self.loss_terms_per_example)[0] if out.dim() else 1)
        self._passes.append(run)
        records: list[tuple[str, LayerRecord]] = []
        for name, uses in pending.items():
            n = {u.inputs.shape[0] for u in uses}
            if len(n) > 1:
                self._drop(pending)
                raise ValueError(f"layer {name!r} was applied {len(uses)} times in one forward with different "
                                 f"leading (batch) sizes {sorted(n)}; curvlab reads the uses of a layer as one "
                                 "example's positions and needs the same batch dimension in every use")
            for u in uses:
                if needs & {"real_grads", "fisher_grads"} and u.output._version != u.version:
                    self._drop(pending)
                    raise RuntimeError(
                        f"the output of layer {name!r} was modified in place while the model ran; curvlab reads "
                        "the gradient with respect to it. Avoid in-place operations on the layer's own output tensor."
                    )
            params = [p for p in self.layers[name].parameters(recurse=False) if p.requires_grad]
            rec = LayerRecord(uses, params, run)
            self._records[name].append(rec)
            records.append((name, rec))
            for u in uses:
                if "real_grads" in needs:
                    u.output.register_hook(self._real_grad_hook(rec, u))
                elif "fisher_grads" not in needs:
                    u.output.register_hook(self._mark_hook(rec))
        if self.check_loss and out.requires_grad:
            run.output = out.detach()
            out.register_hook(self._loss_check_hook(run, records))
        if "fisher_grads" in needs:
            holder = [out]
            self._holders.append(holder)
            out.register_hook(self._fisher_hook(holder, records, keep="real_grads" in needs))
        elif "real_grads" not in needs:
            for _, rec in records:                 # inputs only: the mark hooks need no graph
                for u in rec.uses:
                    u.output = None

    def _confirm(self, rec: LayerRecord) -> bool:
        """Is the running backward a training pass for ``rec``'s layer? Marks the record (and its pass)."""
        if self._busy or not accumulates_into(rec.params):
            return False
        rec.trained = rec.run.trained = True
        return True

    def _mark_hook(self, rec: LayerRecord):
        def hook(grad):
            self._confirm(rec)
        return hook

    def _real_grad_hook(self, rec: LayerRecord, use: Use):
        def hook(grad):
            if self._confirm(rec):
                g = grad.detach()
                use.real_grad = g if use.real_grad is None else use.real_grad + g
        return hook

    def _loss_check_hook(self, run: Pass, records: list[tuple[str, LayerRecord]]):
        def hook(grad):
            if not self._busy and any(accumulates_into(rec.params) for _, rec in records):
                run.output_grad = grad.detach() if run.output_grad is None else run.output_grad + grad.detach()
        return hook

    def _fisher_hook(self, holder: list, named: list[tuple[str, LayerRecord]], keep: bool):
        def hook(grad):
            if self._busy or not holder:
                return None
            active = [rec for _, rec in named if self._confirm(rec)]
            if not active:                     # not a training pass: no hidden backward, no random draw
                return None
            out = holder.pop()
            uses = [u for rec in active for u in rec.uses]
            self._busy = True
            try:
                for vec, weight in output_vectors(self.loss, self.fisher, out, self.mc_samples,
                                                  self._generator(out.device), self.loss_terms_per_example):
                    grads = torch.autograd.grad(out, [u.output for u in uses], grad_outputs=vec,
                                                retain_graph=True, allow_unused=True)
                    for u, g in zip(uses, grads):
                        u.fisher_grads.append((torch.zeros_like(u.output) if g is None else g.detach(), weight))
            finally:
                self._busy = False
                if not keep:
                    for _, rec in named:
                        for u in rec.uses:
                            u.output = None
            return None
        return hook

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    # -- consumer side ---------------------------------------------------------------------------------
    def training_passes(self) -> list[Pass]:
        """The passes of this step that a training backward reached."""
        return [run for run in self._passes if run.trained]

    def pop(self, name: str) -> list[LayerRecord]:
        """Records of ``name`` that a training backward reached since the last call (possibly empty)."""
        records = self._records[name]
        self._records[name] = []
        done = [r for r in records if r.trained]
        n_terms = float(sum(run.terms for run in self._passes if run.trained))
        for r in done:
            r.term_scale = n_terms
            r.real_scale = n_terms * r.batch_size / r.terms
        for r in records:                      # also the untrained ones: breaks the hook cycle
            for u in r.uses:
                u.output = None
        return done

    def layer_stats(self, unit, dtype: torch.dtype, grad: torch.Tensor | None) -> LayerStats | None:
        """The :class:`curvlab.stats.LayerStats` of ``unit`` for this step, or ``None`` if nothing was captured."""
        records = self.pop(unit.name)
        if not records:
            return None
        return LayerStats(unit.name, unit.module, unit.adapter, dtype, records, grad)

    def discard(self) -> None:
        """Forget what training passes recorded (``optimizer.zero_grad()``); forwards not back-propagated stay."""
        for name, records in self._records.items():
            keep = []
            for rec in records:
                if rec.trained or rec.run.trained:
                    for u in rec.uses:
                        u.output = None
                else:
                    keep.append(rec)
            self._records[name] = keep
        self._passes = [run for run in self._passes if not run.trained]

    @staticmethod
    def _drop(pending: dict[str, list[Use]]) -> None:
        for uses in pending.values():
            for u in uses:
                u.output = None

    def _drop_pending(self) -> None:
        self._drop(self._pending)
        self._pending = {}

    def clear(self) -> None:
        self._drop_pending()
        self._depth = 0
        for name, records in self._records.items():
            for rec in records:
                for u in rec.uses:
                    u.output = None
            self._records[name] = []
        for holder in self._holders:
            holder.clear()
        self._holders = []
        self._passes = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict:
        return {"generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        for dev, gstate in state.get("generators", {}).items():
            self._generator(torch.device(dev)).set_state(gstate)
