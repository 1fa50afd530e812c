#!/usr/bin/env bash
# Builds docker/Dockerfile as a CPU image on a machine without a Docker engine, runs what the image is
# for inside it (`dalishare demo`, tests/unit), and prints its size.
#
#   bash docker/check-image.sh        # each step with its outcome and duration; exit 0 = all passed
#
# Needs root on Debian 12 (it apt-installs buildah and debootstrap when missing) and network to Debian's
# mirror and PyPI. Settings, from the environment:
#   CACHE       where the base image's rootfs and the last full log stay (default /var/tmp/dalishare-image)
#   WHEELS      a folder holding the torch wheel (default /opt/wheels)
#   TORCH_SPEC  what pip installs as torch (default torch==2.13.0+cpu, found in WHEELS)
#   DEMO_ARGS   (default "--images-per-class 64 --epochs 2": a minute or two on 2 cores)
#   LAYERS=1    reuse buildah's cached layers of an earlier run (default: every step afresh)
#   REF         a commit to build (its `git archive`) instead of the working tree, which is what
#               `docker build .` would send, unfinished edits included
#
# What differs from `docker build -f docker/Dockerfile .` (the CUDA image), on purpose:
#   - BASE: Debian 12 (minbase) made with debootstrap once and imported as
#     localhost/dalishare-base:bookworm, standing in for debian:bookworm-slim: no registry but PyPI and
#     Debian's mirror answers here;
#   - TORCH_INDEX empty (PyPI, for torch's own dependencies) and TORCH_SPEC=torch==2.13.0+cpu from
#     WHEELS, mounted read-only into the build as PIP_FIND_LINKS: the cu126 index is unreachable here,
#     and a CUDA torch is gigabytes of libraries that nothing can load without a GPU. No torchvision:
#     neither the demo nor tests/unit import it;
#   - PIP_CERT: this machine's CA bundle, mounted into the build, because TLS to PyPI goes through a
#     proxy whose certificates only that bundle trusts;
#   - buildah's chroot isolation for the build and the runs: crun, the OCI runtime that comes with
#     buildah, refuses this machine's hybrid cgroups. A chroot shares the host's pid namespace and
#     /dev/shm, where this machine's other test runs live and which the tests' leak checks scan, so each
#     command runs under unshare with a pid namespace, /proc and /dev/shm (a tmpfs) of its own, as in
#     a container.
# The image is kept as localhost/dalishare:check (the previous one is removed); the container is not.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${CACHE:-/var/tmp/dalishare-image}
WHEELS=${WHEELS:-/opt/wheels}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}
DEMO_ARGS=${DEMO_ARGS:---images-per-class 64 --epochs 2}
CA=/etc/ssl/certs/ca-certificates.crt
BASE_IMAGE=localhost/dalishare-base:bookworm
IMAGE=localhost/dalishare:check
MIRROR=http://deb.debian.org/debian

mkdir -p "$CACHE"
log=$CACHE/check-image.log
out=$CACHE/step.out
: > "$log"
start_all=$EPOCHREALTIME
ctr=
cleanup() { if [[ -n $ctr ]]; then buildah rm "$ctr" > /dev/null || echo "could not remove container $ctr"; fi; }
trap cleanup EXIT
trap 'echo "check-image.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

step() {  # step NAME COMMAND...: run it, its output to the log; print the outcome and duration
    local name=$1 t0 rc
    shift
    t0=$EPOCHREALTIME
    echo "== $name: $*" >> "$log"
    if "$@" > "$out" 2>&1; then rc=0; else rc=$?; fi
    cat "$out" >> "$log"
    printf '%-58s %s %7.1f s\n' "$name" "$([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc)")" \
        "$(awk "BEGIN {print $EPOCHREALTIME - $t0}")"
    if [[ $rc != 0 ]]; then
        echo "--- last lines of its output (all of it: $log):"
        tail -n 40 "$out"
        exit 1
    fi
}
show() { tail -n "$1" "$out" | sed 's/^/    /'; }  # the last N lines of the step just run

echo "check of docker/Dockerfile as a CPU image, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "host: $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r), $(nproc) cores," \
     "$(free -g | awk '/^Mem/ {print $2}') GiB memory, GPU: $(command -v nvidia-smi > /dev/null && echo yes || echo none)"
context=$repo
if [[ -n ${REF:-} ]]; then
    context=$CACHE/context
    rm -rf "$context" && mkdir -p "$context"
    git -C "$repo" archive "$REF" | tar -x -C "$context"
    echo "source: $REF = $(git -C "$repo" rev-parse --short "$REF") (git archive into $context)"
else
    changes=$(git -C "$repo" status --porcelain | awk '{print $2}' | tr '\n' ' ')
    echo "source: the working tree at $(git -C "$repo" rev-parse --short HEAD)${changes:+ plus uncommitted changes to: $changes}"
fi
echo "full log: $log"

# -- the tools and the base image (once; kept in CACHE and buildah's store) ---------------------------

if ! command -v buildah > /dev/null || ! command -v debootstrap > /dev/null; then
    step "apt-get install buildah debootstrap" \
        bash -c "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y buildah debootstrap"
fi
echo "$(buildah --version), $(debootstrap --version)"

if buildah inspect --type image "$BASE_IMAGE" > /dev/null 2>&1; then
    echo "base image $BASE_IMAGE: present"
else
    rootfs=$CACHE/bookworm-minbase.tar
    if [[ ! -f $rootfs ]]; then
        # The suites debian:bookworm-slim lists too, so apt-get sees the same packages as there.
        step "debootstrap --variant=minbase bookworm" bash -c "
            rm -rf '$CACHE/rootfs' && debootstrap --variant=minbase bookworm '$CACHE/rootfs' $MIRROR \
            && printf '%s\n' 'deb $MIRROR bookworm main' 'deb $MIRROR bookworm-updates main' \
                   'deb http://deb.debian.org/debian-security bookworm-security main' \
                   > '$CACHE/rootfs/etc/apt/sources.list' \
            && tar --numeric-owner -C '$CACHE/rootfs' -cf '$rootfs.part' . \
            && mv '$rootfs.part' '$rootfs' && rm -rf '$CACHE/rootfs'"
    fi
    # `FROM scratch` + ADD unpacks the tarball: an import without podman.
    printf 'FROM scratch\nADD bookworm-minbase.tar /\nCMD ["/bin/bash"]\n' > "$CACHE/Containerfile.base"
    step "import the rootfs as $BASE_IMAGE" \
        buildah bud --isolation chroot -f "$CACHE/Containerfile.base" -t "$BASE_IMAGE" "$CACHE"
fi

# -- the image -------------------------------------------------------------------------------------

image_id() { buildah images --noheading --no-trunc --format '{{.ID}}' "$IMAGE" 2> /dev/null || true; }
old=$(image_id)
layers=--layers=false
[[ ${LAYERS:-0} == 1 ]] && layers=--layers
step "buildah bud -f docker/Dockerfile (TORCH_SPEC=$TORCH_SPEC)" \
    buildah bud --isolation chroot --pull=never "$layers" -f "$context/docker/Dockerfile" -t "$IMAGE" \
        --build-arg BASE="$BASE_IMAGE" --build-arg TORCH_INDEX= --build-arg TORCH_SPEC="$TORCH_SPEC" \
        --build-arg PIP_FIND_LINKS=/wheels -v "$WHEELS:/wheels:ro" \
        --build-arg PIP_CERT=/host-ca.crt -v "$CA:/host-ca.crt:ro" \
        "$context"
# What pip installed, and that torch came from WHEELS (nothing to show when LAYERS=1 found every step
# in the cache).
{ grep -E '^(Successfully installed|Processing .*wheels/)' "$log" || echo "(no pip output: cached layers)"; } \
    | fold -s -w 100 | sed 's/^/    /'
new=$(image_id)
if [[ -n $old && $old != "$new" ]]; then buildah rmi "$old" > /dev/null 2>&1 || true; fi

# -- inside it -------------------------------------------------------------------------------------

ctr=$(buildah from --pull=never --name "dalishare-check-$$" "$IMAGE")
inside() {  # inside COMMAND...: run it in the container, in a pid namespace, /proc and /dev/shm of its own
    buildah run --isolation chroot --cap-add CAP_SYS_ADMIN --workingdir /opt/dalishare "$ctr" \
        unshare --pid --fork --mount-proc --mount --ipc \
        sh -c 'mount -t tmpfs -o mode=1777,size=4g shm /dev/shm && exec "$@"' sh "$@"
}

step "isolation: pid 1 is ours, /dev/shm empty" \
    inside sh -c 'test "$$" = 1 && test -z "$(ls -A /dev/shm)" && echo "pid $$; $(ls /proc | grep -c "^[0-9]") processes"'
step "versions" inside python -c '
import importlib.metadata as m, platform, torch
names = ["torch", "nvidia-dali-cuda120", "cupy-cuda12x", "pyzmq", "numpy", "lightning", "accelerate", "pytest"]
print("python " + platform.python_version() + ", " + ", ".join(f"{n} {m.version(n)}" for n in names)
      + f"; torch.version.cuda={torch.version.cuda}")'
show 1
step "pip check" inside pip check
step "dalishare demo $DEMO_ARGS" inside dalishare demo $DEMO_ARGS
show 12
step "python -m pytest tests/unit -q -p no:cacheprovider" \
    inside python -m pytest tests/unit -q -p no:cacheprovider
show 1
# The programs docker/compose.yaml runs, with --help (compose itself cannot run here).
step "compose: each service's program --help" inside python -c '
import shlex, subprocess, yaml
for name, service in yaml.safe_load(open("docker/compose.yaml"))["services"].items():
    command = service["command"]
    argv = (command if isinstance(command, list) else shlex.split(command))[:2] + ["--help"]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    print(f"{name}: {shlex.join(argv)}")'
show 3
step "sizes: the venv's largest packages" inside sh -c \
    'du -sh /opt/venv; cd /opt/venv/lib/python3*/site-packages && du -s -BM * | sort -rn | head -8 | tr "\n" " "; echo'
show 2

echo "image $IMAGE: $(buildah images --format '{{.Size}}' "$IMAGE") (base $BASE_IMAGE:" \
     "$(buildah images --format '{{.Size}}' "$BASE_IMAGE"))"
printf 'all steps passed in %.0f s\n' "$(awk "BEGIN {print $EPOCHREALTIME - $start_all}")"
