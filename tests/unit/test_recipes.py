"""The launch recipes in examples/launch (issue 13) are well-formed: the shell scripts parse, the
Kubernetes manifest is valid YAML whose pod shares what CUDA IPC and dalishare need, and each starts
the producer with its shard before the ranks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

LAUNCH = Path(__file__).resolve().parents[2] / "examples" / "launch"


def test_the_shell_recipes_parse_and_start_a_sharded_producer_before_torchrun():
    for script in ("torchrun-nodes.sh", "slurm.sbatch"):
        text = (LAUNCH / script).read_text()
        assert subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, timeout=30).returncode == 0
        assert text.index("dalishare serve") < text.index("torchrun --nnodes") and "--shard auto" in text


def test_the_kubernetes_recipe_shares_shm_the_pid_namespace_and_the_runtime_dir():
    service, job = yaml.safe_load_all((LAUNCH / "k8s-sidecar.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    assert service["kind"] == "Service" and job["spec"]["completionMode"] == "Indexed"
    assert pod["shareProcessNamespace"] is True
    (producer,), (trainer,) = pod["initContainers"], pod["containers"]
    assert producer["restartPolicy"] == "Always" and "dalishare serve" in producer["args"][0]
    assert "$JOB_COMPLETION_INDEX/2" in producer["args"][0] and "torchrun" in trainer["args"][0]
    for container in (producer, trainer):
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/dev/shm", "/run/dalishare"} <= mounts
        assert {"name": "DALISHARE_RUNTIME_DIR", "value": "/run/dalishare"} in container["env"]
