"""docker/compose.yaml (issue: a producer and two training jobs in containers) is well-formed: the
producer and both trainers share the IPC namespace (/dev/shm), the pid namespace (CUDA IPC and the
liveness checks) and the runtime dir, reserve the same GPU, run the manual's commands (docs/containers.md) from the image
that docker/Dockerfile builds, and the trainers wait for the producer's socket."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
TRAINERS = ("trainer-a", "trainer-b")


def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def argv(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode), from the short volume syntax (a source may be ${VAR:-default})."""
    found = {}
    for volume in service["volumes"]:
        mode = "rw"
        if volume.endswith((":ro", ":rw")):
            volume, mode = volume.rsplit(":", 1)
        source, target = volume.rsplit(":", 1)
        found[target] = (source, mode)
    return found


def test_the_file_parses_into_a_producer_and_two_trainers_built_from_the_projects_dockerfile():
    spec = yaml.safe_load(COMPOSE.read_text())
    assert set(spec["services"]) == {"producer", *TRAINERS}
    for name, service in spec["services"].items():
        build = service["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build["dockerfile"]).resolve() == ROOT / "docker" / "Dockerfile", name
        assert service["image"] == spec["services"]["producer"]["image"], name  # one image for all three


def test_the_trainers_join_the_producers_ipc_and_pid_namespaces():
    all_ = services()
    producer = all_["producer"]
    assert producer["ipc"] == "shareable"  # the trainers may join it
    assert producer["init"] is True        # reaps orphans in the shared pid namespace
    for name in TRAINERS:
        assert all_[name]["ipc"] == "service:producer", name  # the producer's /dev/shm
        assert all_[name]["pid"] == "service:producer", name  # CUDA IPC and the liveness checks
    assert "vllm-project/vllm#55906" in COMPOSE.read_text()


def test_the_runtime_dir_is_one_volume_at_the_same_path_named_by_dalishare_runtime_dir():
    spec = yaml.safe_load(COMPOSE.read_text())
    paths, sources = set(), set()
    for name, service in spec["services"].items():
        path = service["environment"]["DALISHARE_RUNTIME_DIR"]
        source, mode = mounts(service)[path]
        assert mode == "rw", name
        paths.add(path)
        sources.add(source)
    assert paths == {"/run/dalishare"} and len(sources) == 1
    (source,) = sources
    assert source in spec["volumes"]  # a named volume of this file, not a per-container folder


def test_the_dataset_is_mounted_read_only_where_the_producer_reads_it():
    all_ = services()
    data = option(argv(all_["producer"]), "--data")
    assert mounts(all_["producer"])[data][1] == "ro"
    for name in TRAINERS:
        assert data not in mounts(all_[name]), name  # the jobs never read the files


def test_every_container_reserves_the_gpu_of_the_producers_ring():
    all_ = services()
    assert option(argv(all_["producer"]), "--device").startswith("gpu")
    reservations = [s["deploy"]["resources"]["reservations"]["devices"] for s in all_.values()]
    assert all(r == reservations[0] for r in reservations)
    (device,) = reservations[0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and len(device["device_ids"]) == 1


def test_the_commands_are_the_readmes_and_the_trainers_attach_to_the_producers_name():
    readme = (ROOT / "docs" / "containers.md").read_text()  # the manual's page on containers
    assert "docker compose -f docker/compose.yaml up" in readme
    all_ = services()
    producer_args = argv(all_["producer"])
    assert producer_args[:2] == ["dalishare", "serve"]
    name = option(producer_args, "--name")
    for service_name, service in all_.items():
        assert " ".join(argv(service)) in readme, service_name
    for trainer in TRAINERS:
        args = argv(all_[trainer])
        assert args[0] == "python" and args[1].startswith("examples/"), trainer
        assert option(args, "--name") == name, trainer
    assert len({argv(all_[t])[1] for t in TRAINERS}) == 2  # two different example jobs


def test_the_files_the_commands_run_exist_and_the_dockerfile_copies_them():
    copied = set()
    for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(Path(source).parts[0] for source in line.split()[1:-1])
    for name, service in services().items():
        files = [arg for arg in argv(service) if arg.endswith(".py")]
        assert files, name
        for file in files:
            assert (ROOT / file).is_file(), (name, file)
            assert Path(file).parts[0] in copied, (name, file)


def test_the_trainers_start_once_the_producers_socket_exists():
    all_ = services()
    producer = all_["producer"]
    name = option(argv(producer), "--name")
    socket = f"{producer['environment']['DALISHARE_RUNTIME_DIR']}/{name}.sock"
    assert producer["healthcheck"]["test"] == ["CMD", "test", "-S", socket]
    for trainer in TRAINERS:
        assert all_[trainer]["depends_on"] == {"producer": {"condition": "service_healthy"}}, trainer


def test_the_install_check_script_parses_and_reads_the_dockerfiles_copy_lines():
    script = ROOT / "docker" / "check-install.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert re.search(r"grep -E '\^COPY ' \"\$dockerfile\"", text)
    assert "pip install -e '.[gpu,test]'" in text and "import dalishare, nvidia.dali, cupy, zmq" in text
