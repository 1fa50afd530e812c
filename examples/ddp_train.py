"""A DDP job on dalishare: on every node the ranks read that node's producer as one consumer group.

On each node, first start its producer (its shard of every epoch, from the launcher's variables):

    dalishare serve pipelines/resnet.py --data /datasets/imagenet/train --device gpu --cache memory \\
        --shard auto --name imnet --epochs 90

then the ranks (torchrun sets LOCAL_RANK and LOCAL_WORLD_SIZE, which make each rank's place in its
node's group):

    torchrun --nnodes 4 --node-rank I --nproc-per-node 8 --master-addr HOST0 --master-port 29500 \\
        examples/ddp_train.py --name imnet --epochs 90

Every rank gets the same number of batches per epoch; together the ranks of all nodes read every
sample once per epoch, plus the few repeats (``batch["padded"]``) that even out the tail.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dalishare import DaliShareIterator
from dalishare.augment import Compose, Normalize, RandomHorizontalFlip, ToDtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="imnet", help="this node's producer (dalishare serve --name)")
    parser.add_argument("--epochs", type=int, default=90)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.LazyLinear(1000)).to(device)
    model(torch.zeros(1, 3, 224, 224, device=device))  # materialise the lazy layer before DDP wraps it
    model = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    augment = Compose([RandomHorizontalFlip(), ToDtype(torch.float32, scale=True),
                       Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    # attaching compares every rank's producer (dataset, stage, seed, shards) through torch.distributed
    with DaliShareIterator(args.name, batch_size=args.batch_size, device=device, augment=augment,
                           group="ddp") as loader:
        for epoch in range(args.epochs):
            for batch in loader:
                weight = (~batch["padded"]).float().to(device)  # repeats that even out the tail: no weight
                images = batch["images"]  # float NCHW: the augmentation turns the ring's NHWC uint8 into it
                loss = torch.nn.functional.cross_entropy(model(images), batch["labels"], reduction="none")
                loss = (loss * weight).sum() / weight.sum().clamp(min=1)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if dist.get_rank() == 0:
                print(f"epoch {epoch}: loss {loss.item():.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
