"""BackPACK capture backend (``capture="backpack"``): a reference / cross-check for the hooks backend.

BackPACK (Dangel, Kunstner & Hennig, ICLR 2020) computes K-FAC factors (KFAC: MC-sampled; KFLR: exact
loss-Hessian square root; Martens & Grosse 2015, Botev et al. 2017) and per-example gradients (BatchGrad)
with its own Jacobian-transpose products, independently of autograd's backward.
:class:`~curvlab.backpack_stats.BackpackLayerStats` hands them to curvlab's estimators, so every statistic of the
hooks backend (:mod:`curvlab.capture`, the default) can be cross-checked. The user's loop stays the plain one
(forward, ``loss.backward()`` on their own ``F.cross_entropy``/``F.mse_loss``, ``opt.step()``):

* when recording (statistics steps; every step if the rule has ``every_step`` needs, FOP), a forward hook
  on the user's model keeps the model input (detached, not copied) and a tensor hook on its output ``f``
  keeps ``dL/df`` from the user's backward; ``N dL/df_n`` is the real per-example output gradient (P0),
  the only place the real labels enter;
* the first :meth:`BackpackCapture.layer_stats` call of a step copies the CURRENT parameters, buffers and
  train/eval flags into a private, hook-free, BackPACK-extended deep copy (the user's model is never
  extended, its ``p.grad`` and global RNG never touched). Replays on the copy then run lazily, one extra
  forward + backward each, only for the views an estimator reads:

  ``fisher``      KFLR (``fisher="type2"``) or KFAC with ``mc_samples`` (``"mc"``) through an extended
                  ``CrossEntropyLoss``/``MSELoss`` (mean). Dummy targets: these extensions use only the
                  predictive distribution (tested);
  ``real``        [choice] BackPACK's K-FAC machinery with the stored gradients as the square root: a
                  surrogate loss ``<f, dL/df>`` whose module extension back-propagates ``sqrt(N) dL/df_n``,
                  so the empirical ``G`` also comes from BackPACK's own backward (tensor hooks on the replay
                  would only repeat the hooks backend);
  ``batch_grad``  BatchGrad through the same surrogate; it returns ``(1/N) grad l_n`` for a mean loss,
                  so per-example gradients are ``N * grad_batch``;
  ``forward``     a no-grad forward, for estimators that read only layer inputs.

BackPACK's conventions (v1.7; checked in ``tests/test_backpack_backend.py``) against curvlab's
``A = (1/N) sum_{n,t} abar abar^T``, ``G = (1/(N T)) sum_{n,t} w g g^T`` (K-FAC eq. K.3, KFC eq. C.4):

* the back-propagated square root ``S`` (per layer ``(M, N, d_out[, H, W])``) carries ``1/sqrt(N)`` (mean
  reduction) and ``1/sqrt(M)`` (MC samples). For type2 its vectors are exactly curvlab's
  (:func:`curvlab.losses.output_vectors`), so output rows are ``sqrt(N) S`` (weight 1), or
  ``sqrt(N M) S`` with weight ``1/M`` for mc, as in the hooks backend;
* ``nn.Linear``: ``weight.kflr = [sum_{m,n} S S^T, (1/N) sum_n a a^T]``: curvlab's ``G`` and the bias-free
  block of ``A``. BackPACK needs 2-D Linear inputs;
* ``nn.Conv2d``: the input factor is ``(1/N) sum_{n,t} a a^T`` (curvlab's), but the output factor sums
  ``S`` over locations BEFORE the outer product, ``sum_{m,n} (sum_t S_t)(sum_t S_t)^T``: the GGN of the
  bias, not KFC's ``T Gamma`` as its docstring says (they differ by the cross-location terms). This
  backend overrides BackPACK's Conv2d module extension to return ``sum_{m,n,t} S_t S_t^T = T Gamma`` from
  the same square root, and divides by ``T``;
* curvlab's homogeneous ``A`` (bias last): ``[[A_bp, s], [s^T, T]]``, ``s = (1/N) sum_{n,t} a_{n,t}`` from the
  replay's layer inputs (BackPACK gives no bias row; its bias factors are skipped);
* gradient accumulation (several back-propagated forwards per step) is pooled as in the hooks backend:
  one replay per forward, factors weighted by batch size, rows concatenated.

Cost: one extra forward + backward per view read on a recording step, a second copy of the weights, and
BackPACK's square roots in memory: 1.3-2.8x the step time of the hooks backend for K-FAC on a small
MLP (CPU, 64-128-128-10, batch 128; 1.3-1.4x for 784-512-512-10, batch 256). A cross-check backend.
The CUDA branch of the RNG fork is untested here (CPU-only machine).

Unsupported (clear errors naming the module, remedy ``capture="hooks"``): tracked layers other than
``nn.Linear``/``nn.Conv2d``; for backward replays, models that are not an ``nn.Sequential`` tree of the
modules in :data:`HBP_MODULES` (BackPACK cannot see custom ``forward`` code); Linear layers on non-2-D
inputs; ``loss="mse"`` on non-2-D outputs; Dropout in training mode (the replay cannot redraw the user's
mask). ``fisher="mc"`` agrees with the hooks backend only statistically: BackPACK samples from the global
torch RNG, which the backend forks and seeds from its own generator (``seed``; saved in
:meth:`BackpackCapture.state_dict`): reproducible, the user's stream untouched, but not the hooks
backend's draws. A non-finite output cannot be sampled: the replay then uses KFLR, whose NaN statistics
make the optimizer skip the step.
"""
from __future__ import annotations

import contextlib
import copy
import re
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .backpack_extensions import (HBP_MODULES, KFAC, KFLR, BatchGrad, Conv2dFactors as _Conv2dFactors,
                                  HBPBaseModule, LinearFactors as _LinearFactors,
                                  StoredGradientLoss as _StoredGradientLoss,
                                  StoredGradientSqrt as _StoredGradientSqrt, _backpack_ctx, _EXTRA_HBP, extend)
from .adapters import UnsupportedLayer
from .backpack_stats import BackpackLayerStats, ForwardRecord, LayerRecord, input_tensors
from .capture import is_paused
from .losses import check_output
from .stats import LayerStats

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_hooks", "_backward_pre_hooks")
_SAVEFIELDS = ("kflr", "kfac", "grad_batch")


# -- the replays -------------------------------------------------------------------------------------
class Replay:
    """One step's statistics: replays on the private copy, each run on first use and cached."""

    def __init__(self, capture: "BackpackCapture", forwards: list[ForwardRecord], generation: int, seed: int):
        self.capture, self.forwards, self.generation, self.seed = capture, forwards, generation, seed
        self.popped: set[str] = set()
        self.results: dict[str, list[dict[str, dict[str, Any]]]] = {}

    def run(self, kind: str) -> list[dict[str, dict[str, Any]]]:
        if kind not in self.results:
            if self.generation != self.capture._generation:
                raise RuntimeError("these BackPACK statistics belong to an earlier step whose replay is gone; "
                                   "read every view before the next optimizer step")
            self.results[kind] = [self.capture._run(kind, fw, self.seed + i) for i, fw in enumerate(self.forwards)]
        return self.results[kind]


# -- the backend --------------------------------------------------------------------------------------
class BackpackCapture:
    """Statistics from BackPACK replays on a private copy of the model; the constructor and consumer API of
    :class:`curvlab.capture.HookCapture` (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], *, loss: str, fisher: str,
                 mc_samples: int, want_inputs: bool, want_fisher_grads: bool, want_real_grads: bool,
                 is_stat_step, seed: int = 0, every_step: frozenset[str] = frozenset()) -> None:
        self.model, self.layers = model, layers
        self.loss, self.fisher, self.mc_samples, self.seed = loss, fisher, mc_samples, seed
        self.is_stat_step = is_stat_step
        self.check_loss = False                   # set by the optimizer: keep f for the loss check
        self.every_step = frozenset(every_step)   # replays are lazy: recording every forward is all it takes
        backward = want_fisher_grads or want_real_grads or bool(self.every_step & {"fisher_grads", "real_grads"})
        _check_model(model, layers, backward)
        self._net = extend(_private_copy(model))
        mine = dict(zip(map(id, model.modules()), self._net.modules()))
        self._copies = {name: mine[id(m)] for name, m in layers.items()}
        self._stash: dict[int, Tensor] = {}
        self._inputs: dict[str, Tensor] | None = None
        for name, m in self._copies.items():
            m.register_forward_hook(self._input_hook(name))
        self._ce, self._mse = extend(nn.CrossEntropyLoss()), extend(nn.MSELoss())
        self._surrogate = extend(_StoredGradientLoss())
        self._seeds = torch.Generator().manual_seed(seed)
        self._generation = 0
        self._pending: list[ForwardRecord] = []
        self._replay: Replay | None = None
        self._handles = [model.register_forward_hook(self._model_hook, with_kwargs=True)] if layers else []

    # -- recording -----------------------------------------------------------------------------------------
    def _model_hook(self, module, args, kwargs, out):
        if not torch.is_grad_enabled() or is_paused() or not (self.every_step or self.is_stat_step()):
            return
        if not isinstance(out, Tensor):
            raise TypeError(f"curvlab needs the model to return one tensor (the input of the loss); "
                            f"got {type(out).__name__}")
        if out.requires_grad and not torch._C._functorch.is_functorch_wrapped_tensor(out):
            params = [p for m in self.layers.values() for p in m.parameters(recurse=False) if p.requires_grad]
            fw = ForwardRecord(_detach(args), _detach(kwargs), out.shape[0], params)
            fw.output = out.detach()
            out.register_hook(fw.set_grad)
            self._pending.append(fw)

    def _input_hook(self, name: str):
        def hook(module, inputs, output):
            if self._inputs is not None:
                self._inputs[name] = inputs[0].detach()
        return hook

    # -- replays -----------------------------------------------------------------------------------------
    def _sync(self) -> None:
        """Copy the current parameters, buffers and train/eval flags of the user's model into the copy."""
        src = [*self.model.parameters(), *self.model.buffers()]
        dst = [*self._net.parameters(), *self._net.buffers()]
        if [t.shape for t in src] != [t.shape for t in dst]:
            raise RuntimeError("the model's parameters or buffers changed since the optimizer was built; "
                               "capture='backpack' replays on a copy made then: build a new optimizer")
        with torch.no_grad():
            for s, d in zip(src, dst):
                if d.dtype == s.dtype and d.device == s.device:
                    d.copy_(s)
                else:
                    d.data = s.detach().clone()
        for s, d in zip(self.model.parameters(), self._net.parameters()):
            d.requires_grad_(s.requires_grad)
        for s, d in zip(self.model.modules(), self._net.modules()):
            d.training = s.training

    def _run(self, kind: str, fw: ForwardRecord, seed: int) -> dict[str, dict[str, Any]]:
        """One replay of ``fw`` on the copy; ``kind`` is forward, fisher, real or batch_grad."""
        if any(t._version != v for t, v in zip(input_tensors(fw.args, fw.kwargs), fw.versions)):
            raise RuntimeError("a model input was modified in place after the forward pass; the BackPACK "
                               "backend replays the forward from it. Do not modify inputs in place.")
        for name, m in self._net.named_modules():
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
                raise UnsupportedLayer(f"capture='backpack': dropout {name!r} is in training mode; the replay "
                                       "cannot reproduce your mask. Use capture='hooks' (or p=0 / eval mode)")
        self._inputs, exts = {}, []
        try:
            with _forked_rng(next(self._net.parameters()).device, seed), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                with torch.set_grad_enabled(kind != "forward"):
                    out = self._net(*fw.args, **fw.kwargs)
                    if kind != "forward":
                        self._check_replay(out, fw, kind)
                        terminal = self._terminal(kind, out, fw)
                        exts = self._extensions(kind, finite=bool(torch.isfinite(out).all()))
                        with _backpack_ctx(*exts):
                            terminal.backward()
            return self._collect(kind, exts)
        finally:
            self._inputs = None
            self._stash.clear()
            for p in self._net.parameters():
                p.grad = None
                for field in _SAVEFIELDS:
                    p.__dict__.pop(field, None)

    def _extensions(self, kind: str, finite: bool) -> list:
        """The BackPACK extension of a replay (KFLR also for mc when the output is not finite: see above)."""
        if kind == "batch_grad":
            return [BatchGrad()]
        ext = KFLR() if kind == "fisher" and (self.fisher == "type2" or not finite) else \
            KFAC(mc_samples=self.mc_samples if kind == "fisher" else 1)
        ext.set_module_extension(nn.Linear, _LinearFactors(self._stash), overwrite=True)
        ext.set_module_extension(nn.Conv2d, _Conv2dFactors(self._stash), overwrite=True)
        for cls, derivatives in _EXTRA_HBP.items():
            ext.set_module_extension(cls, HBPBaseModule(derivatives()), overwrite=True)
        if kind == "real":
            ext.set_module_extension(_StoredGradientLoss, _StoredGradientSqrt())
        return [ext]

    def _check_replay(self, out: Tensor, fw: ForwardRecord, kind: str) -> None:
        if fw.out_grad is None or out.shape != fw.out_grad.shape:
            raise RuntimeError(f"the replayed model output has shape {tuple(out.shape)}, the stored output "
                               "gradient does not match; is the model deterministic?")
        if kind == "fisher":
            check_output(self.loss, out)
            if self.loss == "mse" and out.dim() != 2:
                raise UnsupportedLayer(f"capture='backpack' with loss='mse' needs outputs of shape (N, D), got "
                                       f"{tuple(out.shape)}; flatten in the model or use capture='hooks'")
        for name, x in self._inputs.items():
            if kind != "batch_grad" and isinstance(self._copies[name], nn.Linear) and x.dim() != 2:
                raise UnsupportedLayer(f"capture='backpack': Linear layer {name!r} got an input of shape "
                                       f"{tuple(x.shape)}; BackPACK's K-FAC needs (N, d_in). Use capture='hooks'")

    def _terminal(self, kind: str, out: Tensor, fw: ForwardRecord) -> Tensor:
        if kind != "fisher":
            return self._surrogate(out, fw.out_grad.to(out.dtype))
        if self.loss == "cross_entropy":       # dummy targets: KFLR/KFAC read only the predictive distribution
            return self._ce(out, torch.zeros(out.shape[0], dtype=torch.long, device=out.device))
        return self._mse(out, torch.zeros_like(out))

    def _collect(self, kind: str, exts: list) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        for name, m in self._copies.items():
            res = results[name] = {"input": self._inputs[name]}
            if kind in ("fisher", "real"):
                res["sqrt"] = self._stash.get(id(m))
                if (factors := getattr(m.weight, exts[0].savefield, None)) is not None:
                    res["G"], res["A"] = factors
            elif kind == "batch_grad":
                res["gw"] = getattr(m.weight, "grad_batch", None)
                res["gb"] = getattr(m.bias, "grad_batch", None) if m.bias is not None else None
        return results

    # -- consumer side -----------------------------------------------------------------------------------
    def pop(self, name: str) -> list[LayerRecord]:
        """Records of ``name`` whose backward ran since the last call (possibly empty)."""
        if self._replay is None or name in self._replay.popped:
            done = [fw for fw in self._pending if fw.out_grad is not None]
            self._pending = []
            if done:
                self._sync()
            self._generation += 1
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=self._seeds))
            self._replay = Replay(self, done, self._generation, seed)
        self._replay.popped.add(name)
        return [LayerRecord(self._replay, i, name) for i in range(len(self._replay.forwards))]

    def layer_stats(self, unit, dtype: torch.dtype, grad: Tensor | None) -> LayerStats | None:
        """The :class:`BackpackLayerStats` of ``unit`` for this step, or ``None`` if nothing was captured."""
        records = self.pop(unit.name)
        return BackpackLayerStats(unit.name, unit.module, unit.adapter, dtype, records, grad) if records else None

    def training_passes(self) -> list[ForwardRecord]:
        """The forwards of this step that a training backward reached (the capture contract)."""
        return [fw for fw in self._pending if fw.out_grad is not None]

    def discard(self) -> None:
        """Forget the training passes recorded so far (``optimizer.zero_grad()``)."""
        self._pending = [fw for fw in self._pending if fw.out_grad is None]

    def clear(self) -> None:
        self._pending, self._replay = [], None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict:
        return {"backpack_generator": self._seeds.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "backpack_generator" in state:
            self._seeds.set_state(state["backpack_generator"])


# -- helpers ------------------------------------------------------------------------------------------
def _check_model(model: nn.Module, layers: dict[str, nn.Module], backward: bool) -> None:
    for name, m in layers.items():
        if type(m) not in (nn.Linear, nn.Conv2d):
            raise UnsupportedLayer(f"capture='backpack' supports nn.Linear and nn.Conv2d layers; layer {name!r} is "
                                   f"{type(m).__name__}. Use capture='hooks' (the default)")
    for name, m in model.named_modules() if backward and layers else ():
        if type(m) is not nn.Sequential and type(m) not in HBP_MODULES:
            known = ", ".join(sorted({c.__name__ for c in HBP_MODULES}))
            raise UnsupportedLayer(
                f"capture='backpack': module {name or '<root>'!r} ({type(m).__name__}) cannot be replayed by "
                f"BackPACK's K-FAC extensions, which need an nn.Sequential (nested allowed) built from {known}. "
                "Use capture='hooks' (the default)")


def _private_copy(model: nn.Module) -> nn.Module:
    """Deep copy with its own tensors, without forward/backward hooks or BackPACK state (pre-hooks kept)."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for key in _HOOK_DICTS + ("_forward_pre_hooks",):
            if isinstance(value := getattr(m, key, None), dict):
                memo[id(value)] = type(value)(value) if key == "_forward_pre_hooks" else type(value)()
    net = copy.deepcopy(model, memo)
    for m in net.modules():
        for attr in ["_backpack_extend", "output"] + [a for a in vars(m) if re.fullmatch(r"input\d+", a)]:
            m.__dict__.pop(attr, None)
    for p in net.parameters():
        p.grad = None
    return net


def _detach(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(o) for o in obj) if type(obj) in (tuple, list) else obj
    return {k: _detach(v) for k, v in obj.items()} if isinstance(obj, dict) else obj


@contextlib.contextmanager
def _forked_rng(device: torch.device, seed: int):
    """Run with the global RNG of ``device`` seeded with ``seed``, restoring the user's state afterwards."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield
