"""A training job for the tests: attaches, runs N passes, records what it got as JSON."""

import hashlib
import json
import sys
import time

from dalishare import DaliShareIterator

spec = json.loads(sys.argv[1])
passes = []
with DaliShareIterator(spec["name"], batch_size=spec.get("batch_size"), attach_timeout=60) as loader:
    open(spec["out"] + ".attached", "w").close()  # lets a test wait for the attach itself
    for _ in range(spec.get("passes", 1)):
        batches = []
        for batch in loader:
            images = batch["images"]
            digest = [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in images]
            time.sleep(spec.get("sleep", 0))
            if spec.get("verify_stable"):  # the producer must not have overwritten the slot meanwhile
                assert digest == [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in images], "slot reused"
            batches.append({"epoch": loader.epoch, "indices": batch["indices"].tolist(),
                            "labels": batch["labels"].tolist(), "shape": list(images.shape),
                            "dtype": str(images.dtype), "digest": digest})
        passes.append({"epoch": loader.epoch, "batches": batches})
    result = {"passes": passes, "len": len(loader), "stop_reason": loader.stop_reason}
with open(spec["out"], "w") as f:
    json.dump(result, f)
