#!/usr/bin/env bash
# The GPU check on the GPU machine, in one command, from the project root:
#
#   bash bench/gpu_run.sh          # results in $OUT (the device tool's folder), else bench/results
#
# It installs the carried wheels (. .gpuwheels/install.sh), then runs `python3 bench/gpu_check.py`
# (budget 420 s), and prints how long each took: about 8 minutes in all on one H100/H200.
#
# Prepare here first (the GPU machine has Python 3.12, torch, CuPy, pytest, prometheus-client and
# numpy, but no DALI, no pyzmq, and reaches no registry). gpu-wheels downloads with --no-deps, so
# EXTRA_WHEELS names every transitive dependency: msgpack (the wire), rich and its markdown-it-py,
# mdurl, pygments (tables, serve's status), pillow (dalishare.testing writes the JPEGs when the
# hymenoptera photos are not there), pytest-timeout (90 s per GPU test; without it only the
# phase's timeout bounds a hung test):
#
#   EXTRA_WHEELS='msgpack rich markdown-it-py mdurl pygments pillow pytest-timeout' ../shared/tools/gpu-wheels prepare
#
# then send the parts it lists, one transfer each, and run this with the last one.
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
start=$SECONDS
# shellcheck disable=SC1091
. .gpuwheels/install.sh || { echo "gpu_run: installing the wheels failed" >&2; exit 3; }
installed=$SECONDS
python3 bench/gpu_check.py --out "$out/gpu-check.txt"
rc=$?
echo "gpu_run: wheels $((installed - start)) s, gpu_check $((SECONDS - installed)) s (exit $rc)," \
     "total $((SECONDS - start)) s; results in $out/gpu-check.txt, gpu-check.jsonl, gpu-check-logs/"
exit $rc
