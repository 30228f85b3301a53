"""Two data-parallel processes (gloo backend, CPU) keep identical SpIEL indices through several
reselections, for SpIEL-AG (accumulated candidate gradients all-reduced) and SpIEL-MA."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TESTS = str(Path(__file__).resolve().parent)
WORLD = 2
STEPS = 7
TOTAL = 9  # T > the last reselection step, so that its rate p(7) = 0.5·(1 − 7/9) > 0
GA = 2


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from conftest import make_tiny_llama
    from spiel.config import SpielConfig
    from spiel.model import get_spiel_model
    from spiel.optim import build_optimizer
    from spiel.selection import SpielSelector

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for algo in ("ag", "ma"):
            cfg = SpielConfig(density=0.05, selection_algorithm=algo, reselection_steps=3,
                              selection_accumulation_steps=1, initial_reselection_rate=0.5)
            model = get_spiel_model(make_tiny_llama(0), cfg)
            # broadcast_buffers=False: DDP must not copy rank 0's indices over the others' (that would
            # hide a divergence); every rank has to reach the same selection by itself.
            ddp = DDP(model, broadcast_buffers=False)
            opt = build_optimizer(ddp, lr=1e-2)  # the wrapper is unwrapped
            sel = SpielSelector(ddp, opt, total_steps=TOTAL, grad_accumulation_steps=GA)
            gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
            snapshots, losses = [], []
            for _ in range(STEPS):
                for micro in range(GA):
                    x = torch.randint(3, 128, (2, 10), generator=gen)
                    ctx = ddp.no_sync() if micro < GA - 1 else torch.enable_grad()
                    with ctx:
                        loss = ddp(input_ids=x, labels=x).loss / GA
                        loss.backward()
                    losses.append(loss.item())
                opt.step()
                opt.zero_grad(set_to_none=True)
                sel.step()
                snapshots.append({n: l.indices.clone() for n, l in model.sparse_layers()})
            results[algo] = {"indices": snapshots, "values": {n: l.values.detach().clone() for n, l in model.sparse_layers()},
                             "history": sel.history, "losses": losses}
            sel.close()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_keep_identical_indices(tmp_path):
    ctx = mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="fork")
    while not ctx.join(timeout=120):
        pass
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for algo in ("ag", "ma"):
        a, b = r0[algo], r1[algo]
        assert a["losses"] != b["losses"]  # the ranks really saw different data
        assert [h["step"] for h in a["history"]] == [1, 4, 7]
        assert a["history"] == b["history"]
        assert all(h["num_replaced"] > 0 for h in a["history"])
        changed = False
        for step, (sa, sb) in enumerate(zip(a["indices"], b["indices"])):
            for name in sa:
                assert torch.equal(sa[name], sb[name]), (algo, step, name)
                assert torch.unique(sa[name]).numel() == sa[name].numel()
            changed |= any(not torch.equal(sa[n], a["indices"][0][n]) for n in sa)
        assert changed
        for name in a["values"]:
            assert torch.equal(a["values"][name], b["values"][name]), (algo, name)
