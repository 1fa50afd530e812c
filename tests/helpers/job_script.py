"""A training job for the tests: attaches, runs N passes, records what it got as JSON.

Optional: ``sleep`` per batch, ``verify_stable`` (the slot must not change while held), and
``die`` = {"how": "sigkill" | "sigterm" | "raise" | "close", "after": batches} to end the job badly,
``stall`` = {"after": batches, "seconds": s} to stop consuming for a while (as in a long evaluation),
``go`` = a path: attach only once that file exists.
"""

import hashlib
import json
import os
import signal
import sys
import time

from dalishare import DaliShareIterator


def die(how: str, loader) -> None:
    if how == "close":
        loader.close()
        time.sleep(60)  # stays alive, detached; the test kills it
    elif how == "raise":
        raise RuntimeError("the job failed on purpose")
    os.kill(os.getpid(), {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM}[how])
    time.sleep(60)


spec = json.loads(sys.argv[1])
passes, done, death = [], 0, spec.get("die")
if spec.get("go"):  # imported and ready: attach only once the test says so (timing independent of start-up)
    deadline = time.monotonic() + 120
    while not os.path.exists(spec["go"]):
        assert time.monotonic() < deadline, "never told to go"
        time.sleep(0.005)
with DaliShareIterator(spec["name"], batch_size=spec.get("batch_size"), attach_timeout=60,
                       seed=spec.get("seed")) as loader:
    open(spec["out"] + ".attached", "w").close()  # lets a test wait for the attach itself
    cache = getattr(loader._session.reader, "cache", None)  # None: the producer serves a ring
    cached_at_attach = cache.valid() if cache is not None else None
    for _ in range(spec.get("passes", 1)):
        batches = []
        for batch in loader:
            if death and done == death["after"]:
                die(death["how"], loader)
            done += 1
            images = batch["images"]
            digest = [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in images]
            stall = spec.get("stall") and done - 1 == spec["stall"]["after"]
            time.sleep(spec["stall"]["seconds"] if stall else spec.get("sleep", 0))
            if spec.get("verify_stable") or stall:  # the producer must not have overwritten the slot meanwhile
                assert digest == [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in images], "slot reused"
            batches.append({"epoch": loader.epoch, "indices": batch["indices"].tolist(), "at": time.monotonic(),
                            "labels": batch["labels"].tolist(), "shape": list(images.shape),
                            "dtype": str(images.dtype), "digest": digest})
        passes.append({"epoch": loader.epoch, "batches": batches})
    result = {"passes": passes, "len": len(loader), "stop_reason": loader.stop_reason,
              "missed": loader.missed_samples, "excluded": loader.excluded_samples,
              "cached_at_attach": cached_at_attach, "finished_at": time.monotonic()}
with open(spec["out"], "w") as f:
    json.dump(result, f)
