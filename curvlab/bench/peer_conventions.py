"""The peer libraries that ``curvlab bench --peers`` runs, and what differs between them and curvlab at "identical
settings": :data:`PEERS` (what each runs), :data:`DIFFERENCES` (what could not be made equal: bias conventions,
warm-up conventions, numerical root methods; ``tests/test_bench_peers.py`` checks the equal-math claims in float64
and that the listed bias differences are real) and :data:`COST_NOTES` (the conventions that make a peer's step
cheaper or dearer, printed beside each ratio). The builders and the timing are in :mod:`curvlab.bench.peers`.
"""
from __future__ import annotations

#: peer name -> what it runs
PEERS: dict[str, str] = {
    "asdl-kfac": "ASDL (asdfghjkl) KfacGradientMaker (Kronecker factors, pi-damped Cholesky inverses) "
                 "+ torch.optim.SGD",
    "asdl-shampoo": "ASDL (asdfghjkl) ShampooGradientMaker (coupled-Newton inverse 4th roots, relative ridge) "
                    "+ torch.optim.SGD",
    "curvlinops-kfac": "curvlinops KFACLinearOperator built on the batch on statistics steps (EMA folded by hand), "
                       "KFACInverseLinearOperator (heuristic pi-damping, cached Cholesky inverses) rebuilt on "
                       "refresh steps, applied to the gradient, then torch.optim.SGD",
    "pytorch_optimizer-shampoo": "pytorch_optimizer.Shampoo (summed statistics, SVD inverse roots every "
                                 "preconditioning_compute_steps)",
    "singd": "SINGD (inverse-free structured natural gradient, dense K and C, IKFAC update): no inverse at all, "
             "so NOT equal math -- the nearest curvlab configuration is K-FAC on the empirical Fisher",
}

#: peer name -> (import name, distribution name)
_MODULES: dict[str, tuple[str, str]] = {
    "asdl-kfac": ("asdl", "asdfghjkl"),
    "asdl-shampoo": ("asdl", "asdfghjkl"),
    "curvlinops-kfac": ("curvlinops", "curvlinops-for-pytorch"),
    "pytorch_optimizer-shampoo": ("pytorch_optimizer", "pytorch-optimizer"),
    "singd": ("singd", "singd"),
}

#: peer name -> conventions that differ from :func:`curvlab_equivalent` and cannot be removed
DIFFERENCES: dict[str, list[str]] = {
    "asdl-kfac": [
        "bias: ASDL preconditions the bias with G^-1 only and keeps the homogeneous coordinate out of A (and out "
        "of pi); curvlab folds the bias into A. Equal only for bias-free layers (no curvlab option for ASDL's form)",
        "first EMA step: ASDL starts from 0 and stores (1 - xi) * S_new (curvlab stores S_new); equal for "
        "ema_decay=0, afterwards both are the same EMA with a different warm-up",
        "pi-damping floor: ASDL uses max(pi sqrt(lambda), 1e-7) per side; curvlab has no floor",
        "loss='mse': not aligned (ASDL's MSE Fisher assumes a unit-variance Gaussian, G is (D/2) times curvlab's "
        "for type2, and its MSE updates did not match curvlab's after rescaling lr and damping); verified for "
        "cross_entropy only",
        "fisher='mc': both sample labels, from different random streams",
    ],
    "asdl-shampoo": [
        "bias: ASDL leaves 1-D parameters unpreconditioned (plain gradient); curvlab uses diagonal AdaGrad "
        "(d + eps)^-1/2 on the bias. Equal only for bias-free layers",
        "ASDL adds the ridge eps * lambda_max into its statistics in place at every root computation (it "
        "accumulates over refreshes) and initializes them with 1e-12 I; curvlab never modifies the statistics",
        "roots: ASDL's coupled Newton stops at max|M - I| <= 1e-6 with a random-start power iteration for "
        "lambda_max (1e-6 absolute); curvlab's (shampoo_newton_dtype='statistics', ASDL's precision convention: "
        "Newton in the parameters' dtype) stops at 1e-6 below float64 and at 1e-10 in float64 (roots ~1e-7 apart "
        "in the step), with a fixed-start power iteration to 1e-13 relative",
        "first EMA step: ASDL stores (1 - xi) * S_new + xi * 1e-12 I; equal for ema_decay=0",
        "ASDL builds its identities and power-iteration vectors in torch's default dtype: the step sets the "
        "default dtype to the parameters' dtype around ASDL's calls (a float64 model otherwise gets float32 "
        "statistics or a dtype error)",
    ],
    "curvlinops-kfac": [
        "curvlinops has no EMA and no optimizer: the step folds the Kronecker factors by hand (its private "
        "_input_covariances / _gradient_covariances dicts) and applies SGD itself",
        "statistics cost one extra forward+backward: KFACLinearOperator runs its own pass over the batch "
        "(torch.autograd.grad) besides the user's backward for the gradient",
        "fisher='mc': different random label streams",
        "loss='mse' with fisher='empirical': curvlinops scales the empirical G differently (not a plain factor "
        "we could identify); mse with type2 and cross_entropy with empirical/type2 are equal",
    ],
    "pytorch_optimizer-shampoo": [
        "statistics are summed every step (no EMA, no stat_interval): curvlab equivalent uses "
        "shampoo_statistics='sum', stat_interval=1",
        "refresh on 1-based steps k, 2k, ...: before step k the root is 0 and the update vanishes; curvlab "
        "refreshes at t=0 (and whenever not ready). Equal for inv_interval=1",
        "bias: full-matrix AdaGrad (b b^T summed, inverse square root, a d_out x d_out root per bias); curvlab "
        "uses the diagonal. Equal only for bias-free layers",
        "momentum: the raw gradient is lerped with the PREVIOUS preconditioned update before the statistics and "
        "the preconditioning (g <- (1 - mu) g + mu u_prev); curvlab is heavy-ball on the preconditioned "
        "direction. Equal only for momentum=0",
        "roots by SVD (curvlab: eigh, same matrix function)",
    ],
    "singd": [
        "not the same algorithm: SINGD updates inverse-free factors K, C of the preconditioner by a Riemannian "
        "step every T steps (lr_cov, alpha1, damping inside the update); there is no inverse. T = stat_interval "
        "(the statistics are consumed when gathered). Compared for cost only",
    ],
}

#: peer name -> the conventions in :data:`DIFFERENCES` that change the COST of a step against the curvlab
#: equivalent (``curvlab bench --peers`` prints them under the peer's row): "cheaper" where the peer does less work
#: by its convention, "dearer" where it does more
COST_NOTES: dict[str, str] = {
    "asdl-kfac": "cheaper by convention: the bias stays out of A (d_in x d_in factors and even-width products, e.g. "
                 "784 instead of curvlab's 785 for a 784-input layer; the bias is preconditioned by G only)",
    "asdl-shampoo": "cheaper by convention: biases get the plain gradient (curvlab: diagonal AdaGrad); its "
                    "float32 Newton roots are matched by curvlab's shampoo_newton_dtype='statistics' in this row",
    "curvlinops-kfac": "dearer by convention: one extra forward+backward per statistics step (its own pass over the "
                       "batch)",
    "pytorch_optimizer-shampoo": "dearer by convention: SVD roots (curvlab: eigh) and a full-matrix root per bias; "
                                "statistics summed, not averaged (same cost)",
    "singd": "not the same algorithm: no inverse or root at all (a Riemannian factor update every stat_interval "
             "steps); compared for cost only",
}
