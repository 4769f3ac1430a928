"""Run under `torchrun --nproc_per_node 2` (gloo, CPU): a small MLP sharded with torch's `fully_shard`
(FSDP2) takes a few MuonAdamW steps, each process on its half of a fixed batch; process 0 saves the whole
parameters (and how many of them were sharded DTensors) for tests/test_scale.py to compare with one
process.

    torchrun --nproc_per_node 2 tests/scale_muon_fsdp.py OUT.pt
"""

import sys

import torch
from torch import nn


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # (32, 16) and (7, 32) weights: even and uneven shards over 2 processes; biases and a (16,) norm: AdamW
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 32), nn.GELU(),
                         nn.Linear(32, 7))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 7, generator=g)


def optimizer(model: nn.Module):
    from train.optim import MuonAdamW

    muon = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return MuonAdamW([{"params": muon, "muon": True, "weight_decay": 0.1},
                      {"params": rest, "muon": False, "weight_decay": 0.0}], lr=0.02)


STEPS = 3


def main(out_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = optimizer(model)
    x, y = batch()
    per = x.shape[0] // world
    mine = slice(rank * per, (rank + 1) * per)
    from torch.distributed.tensor.debug import CommDebugMode

    comms = []
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(model(x[mine]), y[mine])  # gradients averaged over the processes
        loss.backward()
        with CommDebugMode() as counter:  # the optimizer's own collectives
            opt.step()
        comms.append(counter.get_total_counts())
        opt.zero_grad()
    full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    if rank == 0:
        torch.save({"params": full, "sharded": sharded, "world": world, "comms": comms}, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
