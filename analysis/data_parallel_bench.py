"""Data-parallel cost of curvlab (curvlab.distributed): step time on 1 vs 2 processes and bytes per step.

MLP 784-512-512-10 (ReLU, float32), one global batch split over the ranks, gloo on 127.0.0.1, CPU, one thread
per process. For every configuration: the mean wall time of a full training step (zero_grad, forward,
backward, ``opt.step()``; best of the repeats, max over ranks) after a warm-up, the CPU time of the
same steps (``time.process_time``: compute per rank, robust to other load on the machine), and the bytes each rank hands to curvlab's
collectives per step, by kind (``curvlab.distributed.DataParallel.comm``). DDP's own gradient all-reduce is
not counted by curvlab; it is the model's gradient size (reported as ``ddp_grad_bytes``).

    python analysis/data_parallel_bench.py --mode quick          # prints the table, writes numbers JSON
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: name -> (estimator, rule, data_parallel_refresh, wrapping, extra hyper-parameters)
CONFIGS = {
    "sgd (identity)": ("identity", "natural", "replicated", "ddp", {}),
    "kfac inv10 replicated": ("kfac", "natural", "replicated", "ddp", {"inv_interval": 10}),
    "kfac inv10 distributed": ("kfac", "natural", "distributed", "ddp", {"inv_interval": 10}),
    "kfac inv10 replicated raw": ("kfac", "natural", "replicated", "raw", {"inv_interval": 10}),
    "kfac inv1 replicated": ("kfac", "natural", "replicated", "ddp", {"inv_interval": 1}),
    "kfac inv1 distributed": ("kfac", "natural", "distributed", "ddp", {"inv_interval": 1}),
    "kfac+fop inv10 replicated": ("kfac", "fop", "replicated", "ddp", {"inv_interval": 10}),
    "isaac replicated": ("isaac", "natural", "replicated", "ddp", {"damping": 10.0}),
    "isaac distributed": ("isaac", "natural", "distributed", "ddp", {"damping": 10.0}),
}
MODES = {"tiny": (2, 1, 32, 1), "quick": (10, 2, 256, 3)}     # steps, warm-up, global batch, repeats


def worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    import curvlab

    torch.set_num_threads(1)
    steps, warm, batch, repeats = MODES[mode]
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    local = batch // world
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(local, 784, generator=gen), torch.randint(0, 10, (local,), generator=gen)
    res = {}
    for name, (est, rule, strategy, wrap, extra) in CONFIGS.items():
        extra = dict(extra)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        net = model
        if world > 1 and wrap == "ddp":
            net = nn.parallel.DistributedDataParallel(model)
        opt = curvlab.optimizer(net, est, rule, lr=0.01, damping=extra.pop("damping", 0.1), fisher="empirical",
                                data_parallel_refresh=strategy, **extra)
        best, best_cpu = float("inf"), float("inf")
        for _ in range(repeats):
            for i in range(warm + steps):
                if i == warm:
                    if world > 1:
                        dist.barrier()
                    opt.dist.reset_counters()
                    t0, c0 = time.perf_counter(), time.process_time()
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
            best = min(best, (time.perf_counter() - t0) / steps)
            best_cpu = min(best_cpu, (time.process_time() - c0) / steps)
        comm = {k: v["bytes"] / steps for k, v in opt.dist.comm.items()}
        calls = {k: v["calls"] / steps for k, v in opt.dist.comm.items()}
        wait = {k: v["seconds"] / steps for k, v in opt.dist.comm.items()}
        ddp_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) if world > 1 and wrap == "ddp" else 0
        res[name] = {"seconds_per_step": best, "cpu_seconds_per_step": best_cpu, "comm_seconds_per_step": wait, "bytes_per_step": comm, "calls_per_step": calls,
                     "ddp_grad_bytes": ddp_bytes, "owners": opt.dist.owners}
    with open(os.path.join(out, f"w{world}_r{rank}.json"), "w") as fh:
        json.dump(res, fh)
    if world > 1:
        dist.destroy_process_group()


def _launch(world: int, out: str, mode: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), str(port), out, mode], env=env)
             for r in range(world)]
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError(f"a {world}-process benchmark worker failed")


def main(argv: list[str] | None = None) -> dict:
    from curvlab.figures import paper_mode_parser, write_numbers

    p = paper_mode_parser(__doc__.splitlines()[0], "analysis_output/data_parallel")
    p.set_defaults(mode="quick")
    args = p.parse_args(argv)
    mode = "tiny" if args.mode == "tiny" else "quick"
    out = tempfile.mkdtemp(prefix="curvlab_dpbench_")
    numbers: dict = {}
    for world in (1, 2):
        _launch(world, out, mode)
        ranks = [json.load(open(os.path.join(out, f"w{world}_r{r}.json"))) for r in range(world)]
        for name in CONFIGS:
            entry = numbers.setdefault(name, {})
            entry[f"ms_{world}proc"] = 1e3 * max(r[name]["seconds_per_step"] for r in ranks)
            entry[f"cpu_ms_{world}proc"] = 1e3 * max(r[name]["cpu_seconds_per_step"] for r in ranks)
            if world == 2:
                entry["bytes_per_step"] = {**ranks[0][name]["bytes_per_step"], "ddp_gradients": ranks[0][name]["ddp_grad_bytes"]}
                entry["calls_per_step"] = ranks[0][name]["calls_per_step"]
                entry["comm_ms_per_step"] = 1e3 * max(sum(r[name]["comm_seconds_per_step"].values()) for r in ranks)
                entry["owners"] = ranks[0][name]["owners"]
    print(f"{'configuration':<27}{'wall ms 1p':>11}{'2p':>7}{'cpu ms 1p':>10}{'2p':>7}{'in curvlab colls':>17}  "
          "bytes/step/rank (calls/step)")
    for name, e in numbers.items():
        comm = ", ".join(f"{k} {v / 1e6:.3f} MB" + (f" ({e['calls_per_step'][k]:g})" if k in e["calls_per_step"] else "")
                         for k, v in e["bytes_per_step"].items() if v)
        print(f"{name:<27}{e['ms_1proc']:>11.1f}{e['ms_2proc']:>7.1f}{e['cpu_ms_1proc']:>10.1f}{e['cpu_ms_2proc']:>7.1f}"
              f"{e['comm_ms_per_step']:>14.1f} ms  {comm}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_numbers(args.out, "data_parallel_bench", {"mode": mode, "configs": numbers})
    return numbers


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
    else:
        main()
