"""A stage that misbehaves on purpose, as the environment variable DALISHARE_TEST_FAULT says (the
producer's environment reaches its stage worker and probes):

- ``crash-marked``: segfault (through ctypes) on every file that contains MARK;
- ``hang-marked``: sleep forever on them;
- ``crash-always``: segfault on every file;
- ``crash-pairs``: segfault on a batch that holds two or more marked files (each decodes alone);
- ``slow``: take SLOW_S per sample, so a test can kill the worker in the middle of a batch;
- ``slow-start``: take SLOW_START_S to import (a big stage, a GPU warming up).

Otherwise it decodes and resizes to 32x32 like a small `pipelines/resnet.py`.
"""

import ctypes
import os
import time

from nvidia.dali import fn

MARK = b"DALISHARE-TEST-FAULT"
SLOW_S = 0.01
SLOW_START_S = 4.0
FAULT = os.environ.get("DALISHARE_TEST_FAULT", "")

if FAULT == "slow-start":
    time.sleep(SLOW_START_S)


def _misbehave(batch):
    marked = sum(MARK in encoded.tobytes() for encoded in batch)
    if FAULT == "crash-always" or (FAULT == "crash-marked" and marked) or (FAULT == "crash-pairs" and marked >= 2):
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if FAULT == "hang-marked" and marked:
        while True:
            time.sleep(1)
    if FAULT == "slow":
        time.sleep(SLOW_S * len(batch))
    return batch


def stage(jpegs, decoder_device):
    jpegs = fn.python_function(jpegs, function=_misbehave, batch_processing=True)
    images = fn.decoders.image(jpegs, device=decoder_device)
    return fn.resize(images, size=[32, 32])
