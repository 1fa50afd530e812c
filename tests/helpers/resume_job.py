"""A job for the resume tests: attaches, loads a saved state if given one, and after each batch
appends a line ``{"epoch", "indices", "state"}`` to its log (flushed and fsynced, so a SIGKILL leaves
whole lines); runs ``passes`` passes. Spec (JSON argv[1]): name, log, batch_size, passes, sleep,
state (a file with a saved state, optional), hold (a path: after its first batch the job waits,
holding it, until that file exists), break_after (leave the first pass with ``break`` after that many
batches; its ``pass_end`` line then has the state saved after the break)."""

import json
import os
import sys
import time

import torch

from dalishare import DaliShareIterator

spec = json.loads(sys.argv[1])
with DaliShareIterator(spec["name"], batch_size=spec["batch_size"], attach_timeout=60) as loader, \
        open(spec["log"], "a") as log:
    if spec.get("state"):
        loader.load_state_dict(torch.load(spec["state"], weights_only=True))  # as from a checkpoint
    for pass_ in range(spec.get("passes", 1)):
        for n, batch in enumerate(loader, 1):
            log.write(json.dumps({"epoch": loader.epoch, "indices": batch["indices"].tolist(),
                                  "state": loader.state_dict()}, default=str) + "\n")
            log.flush()
            os.fsync(log.fileno())
            deadline = time.monotonic() + 120
            while spec.get("hold") and not os.path.exists(spec["hold"]):
                assert time.monotonic() < deadline, "never released"
                time.sleep(0.01)
            time.sleep(spec.get("sleep", 0))
            if pass_ == 0 and n == spec.get("break_after"):
                break
        log.write(json.dumps({"pass_end": loader.epoch, "state": loader.state_dict()}) + "\n")
        log.flush()
