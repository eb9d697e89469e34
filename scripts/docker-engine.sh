#!/usr/bin/env bash
# A private Docker engine for the docker tests: start/stop dockerd, build the test image.
#
# Usage: scripts/docker-engine.sh start|stop|status|image
#
#   start   install docker.io and debootstrap if missing, start a dockerd with its
#           own data root and socket (reusing one already running), build the test
#           image, then print shell assignments for the tests on stdout:
#             eval "$(scripts/docker-engine.sh start)"
#           AGENT_V2_DOCKER_STARTED=1 says this call started the daemon, so the
#           caller knows to stop it again.
#   stop    stop that dockerd (SIGTERM, then SIGKILL after a grace period)
#   status  exit 0 when the daemon answers
#   image   build the test image only (the daemon must be running)
#
# The image is made without a registry: debootstrap a minimal Debian, tar it (the
# tarball is cached between runs) and `docker import` it; the import is skipped
# when an image built from the same package list exists. Progress goes to stderr.
#
# Settings (environment): AGENT_V2_DOCKER_ROOT, AGENT_V2_DOCKER_SOCKET,
# AGENT_V2_DOCKER_CACHE, AGENT_V2_DOCKER_IMAGE, AGENT_V2_DEBIAN_MIRROR, and
# AGENT_V2_DOCKER_STORAGE_DRIVER to use one driver instead of trying overlay2
# then vfs.
set -euo pipefail

root=${AGENT_V2_DOCKER_ROOT:-/var/lib/agent-v2-docker}
socket=${AGENT_V2_DOCKER_SOCKET:-/run/agent-v2-docker.sock}
exec_root=/run/agent-v2-docker
pidfile=/run/agent-v2-docker.pid
log=/var/log/agent-v2-dockerd.log
cache=${AGENT_V2_DOCKER_CACHE:-/var/cache/agent-v2}
image=${AGENT_V2_DOCKER_IMAGE:-agent-v2-test:bookworm}
suite=bookworm
# bash, coreutils and util-linux (taskset, setsid) come with minbase; gcc and
# libc6-dev let the tests build and benchmark a tiny C instance.
packages=git,procps,gcc,libc6-dev
url="unix://$socket"

say() { echo "docker-engine: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi

# The docker.io client, not whatever other `docker` comes first on PATH.
docker_cli() {
    local cli=/usr/bin/docker
    [[ -x $cli ]] || cli=docker
    $SUDO "$cli" -H "$url" "$@"
}

answers() { docker_cli version >/dev/null 2>&1; }

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    ((${#missing[@]})) || return 0
    say "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >&2
}

# Start dockerd with one storage driver; succeed once it answers.
launch() {
    local driver=$1
    say "starting dockerd (storage driver $driver, socket $socket)"
    $SUDO mkdir -p "$root" "$exec_root" "$(dirname "$log")"
    # NOTE: setsid puts the daemon in its own session, so a Ctrl-C aimed at the
    # test run does not reach it; `stop` ends it through its pid file. It must
    # not inherit the lock (fd 9), or it would hold the lock for its lifetime.
    $SUDO setsid dockerd \
        --data-root "$root" --exec-root "$exec_root" --pidfile "$pidfile" \
        --host "$url" --storage-driver "$driver" \
        --iptables=false --ip6tables=false --bridge=none \
        --shutdown-timeout 5 </dev/null >>"$log" 2>&1 9>&- &
    local pid=$!
    for _ in $(seq 1 120); do
        if answers; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then break; fi
        sleep 0.5
    done
    say "dockerd with $driver did not answer; last lines of $log:"
    tail -n 5 "$log" >&2 || true
    $SUDO kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    $SUDO rm -f "$pidfile"
    return 1
}

start_daemon() {
    install_packages
    if [[ -n ${AGENT_V2_DOCKER_STORAGE_DRIVER:-} ]]; then
        launch "$AGENT_V2_DOCKER_STORAGE_DRIVER" || exit 1
    elif ! launch overlay2 && ! launch vfs; then
        say "could not start dockerd; see $log"
        exit 1
    fi
}

stop_daemon() {
    local pid
    pid=$(cat "$pidfile" 2>/dev/null) || {
        say "no pid file $pidfile; nothing to stop"
        return 0
    }
    say "stopping dockerd (pid $pid)"
    $SUDO kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "dockerd ignored SIGTERM for 30 s; killing it"
        $SUDO kill -KILL "$pid" 2>/dev/null || true
    fi
    $SUDO rm -f "$pidfile"
}

# A Debian mirror the host already uses, else deb.debian.org.
mirror() {
    if [[ -n ${AGENT_V2_DEBIAN_MIRROR:-} ]]; then
        echo "$AGENT_V2_DEBIAN_MIRROR"
        return
    fi
    local found
    found=$(
        {
            grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
            grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
                sed 's/\[[^]]*\]//' | awk '{print $2}'
        } | grep -E '^https?://' | grep -E '/debian/?$' | head -n 1
    ) || true
    echo "${found:-http://deb.debian.org/debian}"
}

build_image() {
    local key tarball
    key=$(echo "$suite $packages" | sha256sum | cut -c1-12)
    if [[ $(docker_cli image inspect -f '{{index .Config.Labels "agent-v2.rootfs"}}' \
        "$image" 2>/dev/null) == "$key" ]]; then
        say "image $image is up to date"
        return 0
    fi

    tarball="$cache/rootfs-$suite-$key.tar"
    if [[ ! -f $tarball ]]; then
        make_rootfs "$tarball"
    else
        say "using cached $tarball"
    fi
    say "importing $tarball as $image"
    docker_cli import \
        --change "LABEL agent-v2.rootfs=$key" \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV LANG=C.UTF-8" \
        - "$image" <"$tarball" >/dev/null
}

make_rootfs() {
    local tarball=$1 work
    install_packages
    work=$(mktemp -d "${TMPDIR:-/tmp}/agent-v2-rootfs.XXXXXX")
    say "debootstrap $suite from $(mirror) (packages: $packages)"
    $SUDO debootstrap --variant=minbase --include="$packages" \
        "$suite" "$work/rootfs" "$(mirror)" >&2

    # What the tests never use, to keep the image small.
    $SUDO rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb \
        "$work"/rootfs/var/lib/apt/lists/* "$work"/rootfs/usr/share/doc \
        "$work"/rootfs/usr/share/man "$work"/rootfs/usr/share/locale \
        "$work"/rootfs/usr/share/info

    $SUDO mkdir -p "$cache"
    $SUDO tar -C "$work/rootfs" --numeric-owner -cf "$tarball.partial" .
    $SUDO mv "$tarball.partial" "$tarball"
    $SUDO rm -rf "$work"
    say "cached $tarball ($(du -h "$tarball" | cut -f1))"
}

command=${1:-}
# One start, stop or image build at a time, so parallel test runs share one daemon.
if [[ $command =~ ^(start|stop|image)$ ]]; then
    exec 9>"${TMPDIR:-/tmp}/agent-v2-docker-engine.lock"
    flock 9
fi
case "$command" in
start)
    started=0
    if answers; then
        say "dockerd already answers on $socket; reusing it"
    else
        start_daemon
        started=1
        # Containers of earlier runs were stopped with the daemon: drop them.
        docker_cli container prune --force >/dev/null
    fi
    build_image
    echo "export AGENT_V2_DOCKER_URL=$url"
    echo "export AGENT_V2_DOCKER_IMAGE=$image"
    echo "AGENT_V2_DOCKER_STARTED=$started"
    ;;
stop) stop_daemon ;;
status) answers ;;
image) build_image ;;
*)
    echo "usage: $0 start|stop|status|image" >&2
    exit 2
    ;;
esac
