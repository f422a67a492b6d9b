"""Distributed helpers with a one-process fallback.

The same script runs as one process on a laptop CPU (`python pretrain.py`) and as many under torchrun
(`torchrun --nproc-per-node 8 pretrain.py`): every helper here answers for a single process when torch.distributed
is not initialised.
"""
import os

import torch


def launched():
    """Was this process started by torchrun (its environment names a rank and a world size)?"""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def joined():
    """Has this process joined a process group?"""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_distributed():
    """Join the process group described by torchrun's environment, or run as one process (calling it again is
    harmless).

    Returns the device this process should use: its own GPU (NCCL) when CUDA is present, else the CPU (gloo).
    """
    dist = torch.distributed
    if launched() and not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def data_parallel(module, device):
    """(module, the module to call): under torchrun, its BatchNorms become SyncBatchNorm on GPUs (statistics over
    the global batch, as the official code's; gloo on CPU keeps them per process: SyncBatchNorm needs GPUs) and it
    is wrapped in DistributedDataParallel, which averages the gradients; one process: (module, module). The first
    is what the optimiser and the checkpoints see."""
    if world_size() == 1:
        return module, module
    if device.type == "cuda":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ddp = torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    return module, ddp


@torch.no_grad()
def average_batchnorm_statistics(module):
    """Every process's BatchNorm running statistics replaced by their mean over the processes (a collective; nothing
    with one process). SyncBatchNorm keeps them equal on GPUs; on CPU processes (gloo, plain BatchNorm) each would
    otherwise evaluate and save its own."""
    if world_size() == 1:
        return
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
            for statistic in (layer.running_mean, layer.running_var):
                torch.distributed.all_reduce(statistic)
                statistic.div_(world_size())


def world_size():
    return torch.distributed.get_world_size() if joined() else 1


def rank():
    return torch.distributed.get_rank() if joined() else 0


def is_main_process():
    return rank() == 0


def all_gather_with_grad(tensor):
    """Concatenate `tensor` from every rank along dim 0, keeping the gradient path to every rank's input.

    The backward pass sums the incoming gradients of each rank's slice back onto that rank (reduce-scatter),
    so a loss computed on the gathered tensor trains every rank's encoder. Every rank must pass the same shape.
    """
    if world_size() == 1:
        return tensor
    group = torch.distributed.group.WORLD
    try:  # torch >= 2.6: functional collective with autograd support
        from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor
        return wait_tensor(all_gather_single_autograd(tensor.contiguous(), 0, group))
    except ImportError:  # older torch: the (since deprecated) autograd-aware all_gather
        from torch.distributed.nn.functional import all_gather
        return torch.cat(all_gather(tensor.contiguous(), group=group), dim=0)


def all_gather_no_grad(tensor):
    """Concatenate `tensor` from every rank along dim 0, without gradient (labels, token ids, counts)."""
    if world_size() == 1:
        return tensor
    dist = torch.distributed
    with torch.no_grad():
        out = torch.empty((world_size() * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype,
                          device=tensor.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # newest name first
        gather(out, tensor.contiguous())
    return out


def leave(meet=True):
    """Leave the process group, if there is one. With `meet`, every rank waits for the others first: a rank that
    tears down while another still reduces gradients aborts gloo and NCCL. Without it (generate.py, whose ranks
    finish hours apart and meet at their summary instead), each leaves when it is done."""
    if joined():
        if meet:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
