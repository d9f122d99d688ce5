#!/usr/bin/env bash
# A multi-host UML lab on one machine, in one command.
#
#   deploy/lab.sh up [--hosts N] [--guests K] [--nets 100,101] [--dir DIR] [--umnet PATH]
#   deploy/lab.sh status [--dir DIR]
#   deploy/lab.sh down [--dir DIR]
#
# `up` makes N hosts (network namespaces on a shared underlay bridge, 10.99.0.I/24), a cluster
# CA and an identity per host, an umnet node on each host peered with every other, and K UML
# guests per host. Guest K of each host sits on the K-th network of --nets (round robin), with
# address 10.77.I.K/16 on eth0: every guest shares one subnet, so only the network decides who
# reaches whom. Guests may move themselves with `umnet guest set-net eth0 NET`. It prints each
# guest's console (a serial line on a host pty) and writes the same table to DIR/guests.tsv.
#
# `down` stops the guests and nodes it started (by the pids it recorded, after checking they
# are still those processes), deletes the namespaces, and removes DIR.
#
# Needs root, and the Debian packages user-mode-linux, busybox-static, iproute2 and
# util-linux. The umnet binary is --umnet, else `umnet` in PATH, else target/release/umnet or
# target/debug/umnet of this checkout.
set -euo pipefail

hosts=3
guests=2
nets=100
dir=/tmp/umnet-lab
umnet=""

# The guests' glibc stays off AVX. Debian's UML 6.1 saves a guest's FPU state in a buffer
# smaller than a host with AMX wants, and such a host needs UML kept on the FXSAVE path,
# where a page fault loses the upper halves of the AVX registers (see "Hosts with large FPU
# state" in tests/src/guest.rs). AVX_Fast_Unaligned_Load keeps memcpy off AVX too.
guest_tunables="GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,\
-AVX512DQ,-AVX512CD,-EVEX,-FMA,-AVX_VNNI,-AVX_Fast_Unaligned_Load"

die() {
    echo "lab.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '3,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

command=${1:-}
[ -n "$command" ] || usage
shift
while [ $# -gt 0 ]; do
    case "$1" in
        --hosts) hosts=${2:?}; shift 2 ;;
        --guests) guests=${2:?}; shift 2 ;;
        --nets) nets=${2:?}; shift 2 ;;
        --dir) dir=${2:?}; shift 2 ;;
        --umnet) umnet=${2:?}; shift 2 ;;
        -h|--help) usage ;;
        *) echo "lab.sh: unknown argument $1" >&2; usage ;;
    esac
done

[ "$(id -u)" = 0 ] || die "the lab makes namespaces and taps: run it as root"

find_umnet() {
    local top
    top=$(cd "$(dirname "$0")/.." && pwd)
    if [ -n "$umnet" ]; then
        :
    elif command -v umnet >/dev/null; then
        umnet=$(command -v umnet)
    elif [ -x "$top/target/release/umnet" ]; then
        umnet=$top/target/release/umnet
    elif [ -x "$top/target/debug/umnet" ]; then
        umnet=$top/target/debug/umnet
    fi
    [ -x "$umnet" ] || die "no umnet binary: build it (cargo build --release -p umnet) or pass --umnet PATH"
    umnet=$(realpath "$umnet")
}

need() {
    command -v "$1" >/dev/null || die "$1 not found: install the Debian package $2"
}

# Waits up to $1 seconds for the command in the remaining arguments to succeed.
wait_for() {
    local seconds=$1
    shift
    local deadline=$((SECONDS + seconds))
    until "$@" 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

# Whether pid $1 is alive and its command line contains $2: a pid we recorded, not a reused one.
ours() {
    [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$2"
}

# Stops the process whose pid is in file $1 if it is still ours (marker $2), with signal $3,
# and SIGKILL if it lingers.
stop_pid() {
    local pidfile=$1 marker=$2 signal=$3 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if ours "$pid" "$marker"; then
        kill "-$signal" "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 10))
        while ours "$pid" "$marker" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        if ours "$pid" "$marker"; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pidfile"
}

# Boots guest K of host I (its directory holds the network it joins), in the background.
# Address-space randomization is off: UML adds the gap between its binary and its heap to the
# guest's memory, and a randomized heap makes that gap, and the memory lost to it, vary.
start_guest() {
    local i=$1 k=$2
    local name="g$i-$k" g="$dir/g$1-$2"
    local mac
    mac=$(printf '52:54:00:00:%02x:%02x' "$i" "$k")
    ip netns exec "$tag-h$i" setarch "$(uname -m)" -R unshare --pid --fork --kill-child \
        linux.uml mem=64M root=/dev/root rootfstype=hostfs rootflags=/ ro \
        init="$dir/guest-init.sh" con=null con0=fd:0,fd:1 ssl=null ssl0=pts \
        "eth0=daemon,$mac,unix,$dir/h$i/run/net$(cat "$g/net")/ctl" \
        umid="$tag-$name" uml_dir="$g" \
        UMNET_LAB_NAME="$name" UMNET_LAB_IP="10.77.$i.$k/16" "$guest_tunables" \
        </dev/null >"$g/console.log" 2>&1 &
    echo $! >"$g/uml.pid"
}

# Waits until guest K of host I has booted. Debian's UML 6.1 now and then panics at boot,
# unable to fork (about one boot in a hundred on a busy machine); such a guest is booted
# again, three times at most.
wait_guest() {
    local i=$1 k=$2 attempt g="$dir/g$1-$2"
    for attempt in 1 2 3; do
        # The serial line's pty is announced when the guest's shell opens it, after boot.
        booted_or_panicked() {
            grep -q -e "Serial line 0 assigned device" -e "Kernel panic - not syncing" \
                "$g/console.log"
        }
        wait_for 90 booted_or_panicked || return 1
        grep -q "Serial line 0 assigned device" "$g/console.log" && return 0
        echo "lab.sh: guest g$i-$k panicked at boot (attempt $attempt); see $g/console.log" >&2
        stop_pid "$g/uml.pid" "umid=$tag-g$i-$k" KILL
        [ "$attempt" = 3 ] && return 1
        mv "$g/console.log" "$g/console.panic-$attempt.log"
        start_guest "$i" "$k"
    done
}

guest_init() {
    cat <<'EOF'
#!/bin/busybox sh
# PID 1 of a lab guest (root: the host's / through hostfs, read-only). Written by lab.sh.
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
# Writable space on /run; the host's /tmp stays visible, read-only (a umnet built there runs).
$bb mount -t tmpfs tmpfs /run
$bb mount -t devtmpfs devtmpfs /dev
$bb mkdir -p /run/bin
$bb --install -s /run/bin
export PATH=/run/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/run PS1="$UMNET_LAB_NAME# "
hostname "$UMNET_LAB_NAME"
ip link set lo up
ip link set eth0 up
ip addr add "$UMNET_LAB_IP" dev eth0
echo "umnet-lab-guest-ready $UMNET_LAB_NAME"
while true; do
    setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
done
EOF
}

lab_up() {
    find_umnet
    need linux.uml user-mode-linux
    need ip iproute2
    need unshare util-linux
    need setarch util-linux
    [ -x /bin/busybox ] || die "/bin/busybox not found: install the Debian package busybox-static"
    [ "$hosts" -ge 1 ] && [ "$hosts" -le 50 ] || die "--hosts must be 1 to 50"
    [ "$guests" -ge 0 ] && [ "$guests" -le 50 ] || die "--guests must be 0 to 50"
    IFS=, read -r -a net_list <<<"$nets"
    [ "${#net_list[@]}" -ge 1 ] || die "--nets needs at least one network"
    for net in "${net_list[@]}"; do
        [[ "$net" =~ ^[0-9]+$ ]] || die "--nets: $net is not a network number"
    done
    [ ! -e "$dir/lab.env" ] || die "a lab is up in $dir already: run lab.sh down --dir $dir first"
    mkdir -p "$dir"
    dir=$(realpath "$dir")
    local tag="umlab$$"
    printf 'tag=%s\nhosts=%s\nguests=%s\nnets=%s\n' "$tag" "$hosts" "$guests" "$nets" >"$dir/lab.env"
    trap 'echo "lab.sh: up failed; cleaning up" >&2; lab_down' ERR

    # Step 1: the underlay and the hosts.
    ip netns add "$tag-under"
    ip -n "$tag-under" link add br0 type bridge
    ip -n "$tag-under" link set br0 up
    for i in $(seq 1 "$hosts"); do
        ip netns add "$tag-h$i"
        ip -n "$tag-under" link add "p$i" type veth peer name eth0 netns "$tag-h$i"
        ip -n "$tag-under" link set "p$i" master br0 up
        ip -n "$tag-h$i" link set lo up
        ip -n "$tag-h$i" addr add "10.99.0.$i/24" dev eth0
        ip -n "$tag-h$i" link set eth0 up
    done

    # Step 2: a CA, an identity and a config per node, every node peered with every other.
    "$umnet" ca init --dir "$dir/ca" --name "$tag" >/dev/null
    for i in $(seq 1 "$hosts"); do
        local h="$dir/h$i"
        mkdir -p "$h/run" "$h/state"
        "$umnet" ca issue "h$i" --dir "$dir/ca" --out "$h/identity.pem" >/dev/null
        {
            for net in "${net_list[@]}"; do printf '[[network]]\nid = %s\n\n' "$net"; done
            printf '[guests]\nset_net = true\n\n'
            for j in $(seq 1 "$hosts"); do
                [ "$j" = "$i" ] || printf '[[peer]]\nname = "h%s"\naddress = "10.99.0.%s:7780"\n\n' "$j" "$j"
            done
        } >"$h/umnet.toml"
        ip netns exec "$tag-h$i" "$umnet" node --config "$h/umnet.toml" --run-dir "$h/run" \
            --state-dir "$h/state" --identity "$h/identity.pem" --listen "10.99.0.$i:7780" \
            </dev/null >"$h/node.log" 2>&1 &
        echo $! >"$h/node.pid"
    done
    for i in $(seq 1 "$hosts"); do
        wait_for 15 test -S "$dir/h$i/run/admin.sock" || die "node h$i did not start; see $dir/h$i/node.log"
    done
    for i in $(seq 1 "$hosts"); do
        local expected=$((hosts - 1))
        connected() {
            [ "$("$umnet" --run-dir "$dir/h$i/run" peer list --json | grep -o '"state":"connected"' | wc -l)" -ge "$expected" ]
        }
        wait_for 30 connected || die "node h$i did not connect to its $expected peers; see $dir/h$i/node.log"
    done

    # Step 3: the guests, K per host.
    guest_init >"$dir/guest-init.sh"
    chmod 0755 "$dir/guest-init.sh"
    for i in $(seq 1 "$hosts"); do
        for k in $(seq 1 "$guests"); do
            local net=${net_list[$(((k - 1) % ${#net_list[@]}))]}
            mkdir -p "$dir/g$i-$k"
            printf '%s\n' "$net" >"$dir/g$i-$k/net"
            start_guest "$i" "$k"
        done
    done
    printf 'guest\thost\tnet\taddress\tconsole\n' >"$dir/guests.tsv"
    for i in $(seq 1 "$hosts"); do
        for k in $(seq 1 "$guests"); do
            local g="$dir/g$i-$k"
            wait_guest "$i" "$k" || die "guest g$i-$k did not boot; see $g/console.log"
            local pts
            pts=$(sed -n "s/.*Serial line 0 assigned device '\(.*\)'.*/\1/p" "$g/console.log" | head -n 1)
            printf 'g%s-%s\th%s\t%s\t10.77.%s.%s\t%s\n' "$i" "$k" "$i" "$(cat "$g/net")" "$i" "$k" "$pts" >>"$dir/guests.tsv"
        done
    done
    trap - ERR

    echo "umnet lab up: $hosts hosts, $guests guests each, networks $nets (in $dir)"
    column -t -s $'\t' "$dir/guests.tsv" 2>/dev/null || cat "$dir/guests.tsv"
    cat <<EOF

Reach a guest's console with   screen /dev/pts/N   (or picocom /dev/pts/N; leave screen with Ctrl-a k)
Inside a guest:                ping 10.77.I.K, or $umnet guest set-net eth0 NET
A node's CLI:                  $umnet --run-dir $dir/hI/run status   (peer list, port list, capture ...)
Tear it all down:              $0 down --dir $dir
EOF
}

lab_status() {
    [ -f "$dir/lab.env" ] || die "no lab in $dir"
    find_umnet
    cat "$dir/guests.tsv"
    # shellcheck disable=SC1091
    . "$dir/lab.env"
    for i in $(seq 1 "$hosts"); do
        echo "== node h$i"
        "$umnet" --run-dir "$dir/h$i/run" peer list || true
    done
}

lab_down() {
    [ -f "$dir/lab.env" ] || { echo "lab.sh: no lab in $dir" >&2; return 0; }
    local tag lab_hosts lab_guests
    tag=$(sed -n 's/^tag=//p' "$dir/lab.env")
    lab_hosts=$(sed -n 's/^hosts=//p' "$dir/lab.env")
    lab_guests=$(sed -n 's/^guests=//p' "$dir/lab.env")
    for i in $(seq 1 "$lab_hosts"); do
        for k in $(seq 1 "$lab_guests"); do
            # unshare ignores SIGTERM while it waits for UML; SIGKILL ends it, and with
            # --kill-child the guest and every helper of its PID namespace.
            stop_pid "$dir/g$i-$k/uml.pid" "umid=$tag-g$i-$k" KILL
        done
    done
    for i in $(seq 1 "$lab_hosts"); do
        stop_pid "$dir/h$i/node.pid" "$dir/h$i/umnet.toml" TERM
    done
    for i in $(seq 1 "$lab_hosts"); do
        ip netns del "$tag-h$i" 2>/dev/null || true
    done
    ip netns del "$tag-under" 2>/dev/null || true
    rm -rf "$dir"
    echo "umnet lab in $dir torn down"
}

case "$command" in
    up) lab_up ;;
    status) lab_status ;;
    down) lab_down ;;
    *) usage ;;
esac
