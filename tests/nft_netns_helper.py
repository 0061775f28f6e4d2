"""Helper for tests/test_nft.py, run inside a fresh network namespace.

Usage: ``unshare -n python nft_netns_helper.py`` (needs PYTHONPATH to reach
triofwd).  It builds a tiny topology that exists only inside namespaces it
created itself, applies a rendered ruleset with triofwd._nft, pushes traffic
through each offloaded route and prints one JSON object with what it saw.

Topology::

    namespace A (this process)            namespace B (child "peer")
      lo: 127.0.0.1, ::1                     v1: 10.99.0.2/24
      v0: 10.99.0.1/24  <---- veth ---->

Routes:
    local-v4  any:8001         -> 127.0.0.1:9001  (local clients, output hook;
                                                    127.0.0.2 blocked)
    inbound   10.99.0.1:8002-8003 -> 10.99.0.1:9002 (from B, prerouting hook,
                                                    preserve_source_ip)
    hair.pin  any:8004         -> 10.99.0.2:9004  (from B back to B, forwarded,
                                                    masqueraded)
    local_v6  [::1]:8006       -> [::1]:9006
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import traceback

A_ADDR = "10.99.0.1"
B_ADDR = "10.99.0.2"
PREFIX_LEN = 24
PAYLOAD_SIZE = 20_000
SOCKET_TIMEOUT_S = 3.0
BLOCKED_TIMEOUT_S = 0.5
COMMAND_TIMEOUT_S = 10.0
PEER_TIMEOUT_S = 20.0


def run(*args: str) -> None:
    """Run a command (list args, no shell) and fail loudly with its stderr."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")


def serve(host: str, port: int) -> None:
    """Listen on host:port; each client gets "<port> <its peer address>" after its payload."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen()

    def loop() -> None:
        while True:
            conn, peer = listener.accept()
            with conn:
                conn.settimeout(SOCKET_TIMEOUT_S)
                received = 0
                while received < PAYLOAD_SIZE:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    received += len(chunk)
                conn.sendall(f"{port} {peer[0]} {received}".encode())

    threading.Thread(target=loop, daemon=True).start()


def call(host: str, port: int, source: str | None = None) -> str:
    """Connect, send the payload, return the reply text or "error: <errno name>"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(BLOCKED_TIMEOUT_S if source else SOCKET_TIMEOUT_S)
    try:
        if source:
            sock.bind((source, 0))
        sock.connect((host, port))
        sock.settimeout(SOCKET_TIMEOUT_S)
        sock.sendall(b"x" * PAYLOAD_SIZE)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
        return reply.decode()
    except TimeoutError:
        return "error: timeout"
    except OSError as exc:
        return f"error: {exc.strerror}"
    finally:
        sock.close()


def peer() -> None:
    """Namespace B: wait for the veth end, then act as remote client and remote target."""
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    run("ip", "link", "set", "lo", "up")
    run("ip", "addr", "add", f"{B_ADDR}/{PREFIX_LEN}", "dev", "v1")
    run("ip", "link", "set", "v1", "up")
    serve(B_ADDR, 9004)
    results = {
        "inbound": call(A_ADDR, 8003),
        "hairpin": call(A_ADDR, 8004),
    }
    print(json.dumps(results), flush=True)


def main() -> dict[str, object]:
    """Namespace A: set up, apply rules, drive traffic, read counters, delete."""
    from triofwd import _nft

    run("ip", "link", "set", "lo", "up")
    try:
        run("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    except RuntimeError as exc:
        return {"skip": f"cannot create a veth pair here: {exc}"}
    run("ip", "addr", "add", f"{A_ADDR}/{PREFIX_LEN}", "dev", "v0")
    run("ip", "link", "set", "v0", "up")
    # Only this namespace's sysctl: needed for the hairpin route.
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1\n")

    serve("127.0.0.1", 9001)
    serve(A_ADDR, 9002)
    serve("::1", 9006)

    rules = [
        _nft.OffloadRule(
            "local-v4", (8001,), "0.0.0.0", (("127.0.0.1", 9001),), block_ips=("127.0.0.2",)
        ),
        _nft.OffloadRule(
            "inbound", ((8002, 8003),), A_ADDR, ((A_ADDR, 9002),), preserve_source_ip=True
        ),
        _nft.OffloadRule("hair.pin", (8004,), "0.0.0.0", ((B_ADDR, 9004),)),
        _nft.OffloadRule("local_v6", (8006,), "::1", (("::1", 9006),)),
    ]
    out: dict[str, object] = {"available": _nft.nft_available()}
    _nft.apply(_nft.render_ruleset(rules))
    out["counters_before"] = _nft.read_counters()

    local = {
        "lo": call("127.0.0.1", 8001),
        "v0_addr": call(A_ADDR, 8001),
        "blocked": call("127.0.0.1", 8001, source="127.0.0.2"),
        "v6": call("::1", 8006),
        "unrouted_port": call("127.0.0.1", 8005),
    }
    out["local"] = local

    child = subprocess.Popen(
        ["unshare", "-n", sys.executable, __file__, "peer"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        # unshare execs python in place, so once "ready" arrives the child's
        # pid lives in namespace B and the veth end can be moved there.
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("peer did not start")
        run("ip", "link", "set", "v1", "netns", str(child.pid))
        stdout, _ = child.communicate("go\n", timeout=PEER_TIMEOUT_S)
        out["peer"] = json.loads(stdout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=COMMAND_TIMEOUT_S)

    out["counters"] = _nft.read_counters()
    _nft.delete_table()
    tables = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )
    out["tables_after_delete"] = tables.stdout
    _nft.delete_table()  # a second delete must be a no-op
    out["payload"] = PAYLOAD_SIZE
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["peer"]:
        peer()
    else:
        try:
            result = main()
        except Exception:
            print(json.dumps({"error": traceback.format_exc()}))
            sys.exit(1)
        print(json.dumps(result))
