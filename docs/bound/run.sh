#!/bin/bash
# Issue 12's rate goals against a bound: how fast 64 B UDP gets with the least a TC
# fast path can do (src/main.rs), against the routed no-NAT path, in one topology.
# Run as root: ROUNDS=5 docs/bound/run.sh. Everything lives in four private network
# namespaces (bound<pid>-*), on documentation addresses, and its own bpffs directory;
# all of it is removed on exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
P=bound$$
H=$P-h W=$P-w A=$P-a B=$P-b
BPF=/sys/fs/bpf/$P
TMP=$(mktemp -d /tmp/$P.XXXX)
ROUNDS=${ROUNDS:-5}
cleanup() {
    for n in $H $W $A $B; do ip netns del "$n" 2>/dev/null || true; done
    rm -rf "$BPF" "$TMP"
}
trap cleanup EXIT
inh() { nsenter --net=/run/netns/$H "$@"; } # keeps /sys/fs/bpf (ip netns exec remounts /sys)

for n in $H $W $A $B; do ip netns add "$n"; ip -n "$n" link set lo up; done
ip -n $H link add upl type veth peer name w0 netns $W
ip -n $H link add br0 type bridge
ip -n $H link add h0 type veth peer name eth0 netns $A
ip -n $H link add h1 type veth peer name eth0 netns $B
for d in h0 h1; do ip -n $H link set $d master br0 up; done
ip -n $H addr add 172.19.0.1/16 dev br0 && ip -n $H link set br0 up
ip -n $H addr add 198.51.100.2/24 dev upl && ip -n $H link set upl up
ip netns exec $H sysctl -qw net.ipv4.ip_forward=1
ip -n $W addr add 198.51.100.1/24 dev w0 && ip -n $W link set w0 up
ip -n $W route add 172.19.0.0/16 via 198.51.100.2
for x in "$A 172.19.0.2" "$B 172.19.0.3"; do
    set -- $x
    ip -n "$1" addr add "$2/16" dev eth0
    ip -n "$1" link set eth0 up
    ip -n "$1" route add default via 172.19.0.1
done
ip netns exec $A ping -qc1 -W1 198.51.100.1 >/dev/null
ip netns exec $A ping -qc1 -W1 172.19.0.3 >/dev/null
ip netns exec $W ping -qc1 -W1 172.19.0.2 >/dev/null

link() { ip -n "$1" -j link show "$2" | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['$3'])"; }
python3 - "$TMP/cfg.rs" "$(link $A eth0 address)" "$(link $H br0 address)" \
    "$(link $W w0 address)" "$(link $H upl address)" \
    "$(link $H h0 ifindex)" "$(link $H h1 ifindex)" "$(link $H upl ifindex)" <<'PY'
import socket, struct, sys
out, cm, bm, wm, um, h0, h1, up = sys.argv[1:]
be32 = lambda s: int.from_bytes(socket.inet_aton(s), "little")
be16 = lambda p: int.from_bytes(struct.pack("!H", p), "little")
mac = lambda s: "[" + ",".join("0x" + x for x in s.split(":")) + "]"
open(out, "w").write(
    f"const C: Cfg = Cfg {{ ctr_ip: {be32('172.19.0.2')}, ctr2_ip: {be32('172.19.0.3')}, "
    f"uplink_ip: {be32('198.51.100.2')}, fwd_port: {be16(8081)}, ctr_port: {be16(5002)}, "
    f"h0: {h0}, h1: {h1}, up: {up}, ctr_mac: {mac(cm)}, br_mac: {mac(bm)}, "
    f"wan_mac: {mac(wm)}, up_mac: {mac(um)} }};\n")
PY
(cd "$here" && BOUND_CFG=$TMP/cfg.rs CARGO_TARGET_DIR=$TMP/target \
    cargo +nightly build -q -Z build-std=core --target bpfel-unknown-none --release)
mkdir -p "$BPF"
bpftool prog loadall "$TMP/target/bpfel-unknown-none/release/redirect-bound" "$BPF/p" type classifier

udp_in() { ip netns exec "$1" awk '/^Udp:/ { if (++n == 2) print $2 }' /proc/net/snmp; }
# rate RX-NS TX-NS DST PORT [SERVER-PORT]: 64 B datagrams delivered per second.
rate() {
    ip netns exec "$1" sockperf server -i 0.0.0.0 -p "${5:-$4}" >/dev/null 2>&1 &
    local s=$! before after
    sleep 0.3
    before=$(udp_in "$1")
    ip netns exec "$2" timeout 10 sockperf throughput -i "$3" -p "$4" -m 64 -t 2 >/dev/null 2>&1 || true
    after=$(udp_in "$1")
    kill $s && wait $s 2>/dev/null || true
    echo $(((after - before) / 2))
}
attach() { inh tc qdisc add dev "$1" clsact && inh tc filter add dev "$1" ingress bpf da pinned "$BPF/p/$2"; }
detach() { inh tc qdisc del dev "$1" clsact; }

echo "64 B UDP delivered/s, bound / no NAT (routed, plain bridge), $ROUNDS rounds"
for r in $(seq "$ROUNDS"); do
    n_out=$(rate $W $A 198.51.100.1 5002)
    n_in=$(rate $A $W 172.19.0.2 5002)
    n_c2c=$(rate $B $A 172.19.0.3 5002)
    attach upl bound_in && attach h0 bound_port
    b_out=$(rate $W $A 198.51.100.1 5002)
    b_in=$(rate $A $W 198.51.100.2 8081 5002)
    b_c2c=$(rate $B $A 172.19.0.3 5002)
    detach upl && detach h0
    python3 -c "print('round $r: container -> wan %.2f (%d/%d), wan -> container %.2f (%d/%d), \
container a -> b %.2f (%d/%d)' % ($b_out/$n_out, $b_out, $n_out, $b_in/$n_in, $b_in, $n_in, \
$b_c2c/$n_c2c, $b_c2c, $n_c2c))"
done
