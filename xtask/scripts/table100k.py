#!/usr/bin/env python3
"""Agent memory and reconciliation cost with 100k sockets in the port table.

    sudo python3 xtask/scripts/table100k.py [path/to/portwatch]

Builds 50,000 loopback TCP connections (100,000 sockets) inside a network namespace of its
own, starts the agent, waits for two reconciliations and asks the agent (control socket,
`status`) for its RSS and the last reconciliation's cost. Everything is torn down after.
"""
import ctypes, json, os, resource, socket, subprocess, sys, threading, time

libc = ctypes.CDLL(None, use_errno=True)

def setns(path):
    # os.setns needs Python 3.12; CLONE_NEWNET = 0x40000000.
    if libc.setns(os.open(path, os.O_RDONLY), 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns")

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/portwatch"
NS = f"pw100k-{os.getpid()}"
RT = f"/tmp/pw100k-rt-{os.getpid()}"
PAIRS = 50_000

def sh(*a):
    subprocess.run(a, check=True)

# One process may hold at most RLIMIT_NOFILE sockets (20,000 here, not raisable), so the
# connections are spread over worker processes.
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
per_worker = (hard - 200) // 2
sh("ip", "netns", "add", NS)
workers = []
try:
    sh("ip", "-n", NS, "link", "set", "lo", "up")
    t = time.time()
    left, port = PAIRS, 7001
    while left > 0:
        n = min(left, per_worker)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                setns(f"/var/run/netns/{NS}")
                l = socket.socket(); l.bind(("127.0.0.1", port)); l.listen(4096)
                keep = []
                for _ in range(n):
                    c = socket.create_connection(("127.0.0.1", port))
                    s, _ = l.accept()
                    keep += (c, s)
                os.write(w, b"x"); os.close(w)
                time.sleep(3600)
            finally:
                os._exit(0)
        os.close(w)
        if os.read(r, 1) != b"x":
            raise SystemExit("a worker could not build its connections")
        os.close(r)
        workers.append(pid)
        left -= n; port += 1
    print(f"{2 * PAIRS} sockets in {len(workers)} processes in {time.time() - t:.1f} s", flush=True)
    agent = subprocess.Popen([BIN, "run", "--no-log-file", "--runtime-dir", RT, "--tw-interval", "3"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    t0 = time.time()
    ready = json.loads(agent.stdout.readline())
    ready_ms = (time.time() - t0) * 1000
    # Keep reading: on a busy host the records fill the pipe, the agent's writer blocks on
    # it, and `status` below never gets an answer.
    threading.Thread(target=lambda: [None for _ in agent.stdout], daemon=True).start()
    time.sleep(8)  # two reconciliations
    u = socket.socket(socket.AF_UNIX); u.connect(f"{RT}/portwatch.sock")
    u.sendall(b'{"cmd":"status"}\n')
    st = json.loads(u.makefile().readline())
    agent.terminate(); agent.wait()
    print(json.dumps({
        "sockets_held": 2 * PAIRS,
        "table_size_at_ready": ready["table_size"],
        "table_size": st["table_size"],
        "rss_mb": round(st["rss_kb"] / 1024, 1),
        "last_reconcile_sockets": st["last_reconcile"]["sockets"],
        "last_reconcile_ms": round(st["last_reconcile"]["ms"], 1),
        "ready_ms": round(ready_ms), "startup_ms": ready["startup_ms"],
        "drift_healed": st["drift_healed"],
    }))
finally:
    for pid in workers:
        os.kill(pid, 9)
    subprocess.run(["ip", "netns", "del", NS])
