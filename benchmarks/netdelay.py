"""A packet delay line for benchmarks/wan.py when the kernel has no `netem` qdisc (tc can then cap
rates with `tbf`, but not add latency).

Runs inside the benchmark's router namespace, attached to a TUN device that the router's policy
routing sends every forwarded packet through: each packet read from the TUN is written back after
its delay, and the kernel then forwards it to its destination. The delay is DELAY_MS per home link
the packet crosses: a packet between two peers crosses two (the sender's upload and the receiver's
download), one between a peer and the coordinator (a server) crosses one. Packets of one flow all get
the same delay, so nothing is reordered.

Usage (root, inside the router namespace): python netdelay.py TUN_NAME DELAY_MS PEER_PREFIX...
where a PEER_PREFIX like 10.93.1. marks addresses behind a home link.
"""
import fcntl
import heapq
import os
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def main() -> None:
    name, delay_ms, prefixes = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    peers = {bytes(int(x) for x in prefix.strip(".").split(".")) for prefix in prefixes}
    try:
        os.nice(-10)  # a late delay line adds jitter to every flow
    except OSError:
        pass
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    print("ready", flush=True)
    pending, sequence = [], 0
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        readable, _, _ = select.select([fd], [], [], timeout)
        now = time.monotonic()
        if readable:
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                links = 1
                if len(packet) >= 20 and packet[0] >> 4 == 4:
                    links = (packet[12:15] in peers) + (packet[16:19] in peers)
                heapq.heappush(pending, (now + links * delay_ms / 1000.0, sequence, packet))
                sequence += 1
        while pending and pending[0][0] <= time.monotonic():
            _, _, packet = heapq.heappop(pending)
            try:
                os.write(fd, packet)
            except OSError:
                pass  # a full queue drops the packet, as a router would


if __name__ == "__main__":
    main()
