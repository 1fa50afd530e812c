"""A DDP job for the consumer-group tests: one rank, launched by torchrun (or started by hand with
RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE set), reading its node's producer as a rank of
group "ddp". Writes ``OUT.RANK.json``: per epoch the indices, padded flags and batch count.

Spec (JSON in argv[1]): ``names`` (the producer's name per node; the node is GROUP_RANK),
``batch_size``, ``epochs``, ``drop_last``; ``train`` (torch.distributed with gloo and a tiny model
wrapped in DDP, gradients all-reduced each step; else no collectives at all), ``sleep`` per batch,
``die`` = [rank, batches]: that rank SIGKILLs itself after that many batches; ``fail`` = [rank,
batches]: that rank raises instead (and leaves the ``with`` block with the error).
"""

import json
import os
import signal
import sys
import time

import torch

from dalishare import DaliShareIterator, GroupBroken

spec = json.loads(sys.argv[1])
rank, node = int(os.environ["RANK"]), int(os.environ.get("GROUP_RANK", 0))
record = {"rank": rank, "node": node, "epochs": [], "error": None}
if spec.get("train"):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
try:
    with DaliShareIterator(spec["names"][node], batch_size=spec["batch_size"], group="ddp",
                           drop_last=spec.get("drop_last", False), attach_timeout=60, batch_timeout=60) as loader:
        record["len"] = len(loader)
        done = 0
        for _ in range(spec["epochs"]):
            indices, padded, batches = [], [], 0
            for batch in loader:
                if spec.get("die") == [rank, done]:
                    os.kill(os.getpid(), signal.SIGKILL)
                if spec.get("fail") == [rank, done]:
                    raise RuntimeError("this rank failed on purpose")
                if spec.get("train"):
                    features = batch["images"].float().mean(dim=(1, 2)) / 255  # (B, 3)
                    loss = model(features).pow(2).mean()
                    optimizer.zero_grad()
                    loss.backward()  # all-reduces the gradients across every rank of every node
                    optimizer.step()
                time.sleep(spec.get("sleep", 0))
                indices += batch["indices"].tolist()
                padded += batch["padded"].tolist()
                batches += 1
                done += 1
            record["epochs"].append({"epoch": loader.epoch, "indices": indices, "padded": padded,
                                     "batches": batches})
    if spec.get("train"):
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        everyone = [torch.zeros_like(params) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, params)
        record["same_weights"] = all(torch.equal(p, params) for p in everyone)
        record["trained"] = not torch.equal(params, torch.cat(
            [p.flatten() for p in (torch.manual_seed(0), torch.nn.Linear(3, 2))[1].parameters()]).detach())
        dist.barrier()  # every rank is done with its collectives before any tears gloo down
        dist.destroy_process_group()
except GroupBroken as exc:
    record["error"] = f"GroupBroken: {exc}"
    record["error_at"] = time.monotonic()
with open(f"{spec['out']}.{rank}.json", "w") as f:
    json.dump(record, f)
if spec.get("train"):
    # gloo's threads can abort the interpreter's own teardown ("terminate called without an active
    # exception", seen once in 10 runs of 4 ranks on 2 cores): the job is done, leave without it
    sys.stdout.flush()
    os._exit(0)
