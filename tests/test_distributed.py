"""distributed.py: the one-process fallback, and gathers across two gloo processes (values and gradients)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import leave_spawned_worker
from util import distributed


def test_one_process_fallback_needs_no_process_group():
    assert not dist.is_initialized()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main_process()) == (1, 0, True)
    assert distributed.init_distributed().type in ("cpu", "cuda")
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x and distributed.all_gather_no_grad(x) is x


def _worker(rank, world_size, store_path, result_path):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    local = torch.full((2, 3), float(rank + 1), requires_grad=True)  # rank 0 holds 1s, rank 1 holds 2s
    gathered = distributed.all_gather_with_grad(local)  # [4, 3]
    weights = torch.arange(12.0).view(4, 3)  # the same on both ranks
    (gathered * weights).sum().backward()
    labels = distributed.all_gather_no_grad(torch.tensor([rank, rank]))
    torch.save({"gathered": gathered.detach(), "grad": local.grad, "labels": labels}, f"{result_path}.{rank}")
    leave_spawned_worker()


@pytest.mark.slow
def test_gathers_concatenate_in_rank_order_and_sum_gradients_back(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    expected = torch.cat([torch.ones(2, 3), 2 * torch.ones(2, 3)])
    weights = torch.arange(12.0).view(4, 3)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["gathered"], expected)
        assert result["labels"].tolist() == [0, 0, 1, 1]
        # every rank's loss sums over all rows, so the gradient of a rank's own rows is the sum over ranks:
        # 2 x its slice of the weights
        torch.testing.assert_close(result["grad"], 2 * weights[2 * rank:2 * rank + 2])
