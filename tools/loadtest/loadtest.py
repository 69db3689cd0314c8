#!/usr/bin/env python3
"""Load test of `motif serve --workers 0` on 127.0.0.1 (standard library only).

Starts its own server on a fresh data folder, then
  1. CLIENTS concurrent clients, each making REQUESTS requests that mix gallery
     pages, API reads and job submissions (each client its own member token);
  2. SIGNUPS concurrent sign-ups.
Reports p50/p99 latency, errors (5xx and dropped connections), 429/503 counts,
and the server's peak memory (VmHWM from /proc) after each phase. Bounded: a
fixed number of requests, a 10 s timeout each, only 127.0.0.1.

usage: tools/loadtest/loadtest.py PATH/TO/motif [CLIENTS] [REQUESTS] [SIGNUPS]
"""
import http.client, json, os, re, socket, subprocess, sys, tempfile, threading, time, urllib.parse

MOTIF = sys.argv[1]
CLIENTS = int(sys.argv[2]) if len(sys.argv) > 2 else 200
REQUESTS = int(sys.argv[3]) if len(sys.argv) > 3 else 20
SIGNUPS = int(sys.argv[4]) if len(sys.argv) > 4 else 100

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def vm_hwm(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) // 1024
    return -1

def request(port, method, path, body=None, headers=None):
    """(status, headers, body); status 0 = dropped connection or timeout."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    except Exception as e:
        return 0, {}, str(e).encode()
    finally:
        c.close()

def visitor(port):
    _, h, _ = request(port, "GET", "/")
    csrf = re.search(r"motif_csrf=([0-9a-f]+)", h.get("set-cookie", "")).group(1)
    return csrf

def signup(port, csrf, name):
    body = urllib.parse.urlencode({"csrf": csrf, "name": name, "password": "a long password"})
    return request(port, "POST", "/signup", body, {"Cookie": f"motif_csrf={csrf}",
                   "Content-Type": "application/x-www-form-urlencoded"})

def pct(values, p):
    v = sorted(values); return v[min(len(v) - 1, int(p / 100 * len(v)))] if v else float("nan")

def main():
    data = tempfile.mkdtemp(prefix="motif-loadtest-")
    port = free_port()
    server = subprocess.Popen([MOTIF, "serve", "--data", data, "--listen", f"127.0.0.1:{port}",
        "--workers", "0", "--signups-per-address", "100000", "--max-connections-per-address", "1024"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if request(port, "GET", "/api/v1/health")[0] == 200: break
            time.sleep(0.1)
        print(f"load average at start: {open('/proc/loadavg').read().split()[:3]}")
        print(f"server idle: VmHWM {vm_hwm(server.pid)} MiB")
        # One member and API token per client (made one after another, before the clock starts).
        tokens = []
        for i in range(CLIENTS):
            csrf = visitor(port)
            s, h, _ = signup(port, csrf, f"load{i}")
            while s == 503:
                time.sleep(0.2); s, h, _ = signup(port, csrf, f"load{i}")
            session = re.search(r"motif_session=([0-9a-f]+)", h.get("set-cookie", "")).group(1)
            cookie = f"motif_csrf={csrf}; motif_session={session}"
            s, _, b = request(port, "POST", "/me/tokens", urllib.parse.urlencode({"csrf": csrf}),
                              {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
            tokens.append(re.search(rb"motif_[0-9a-f]{64}", b).group(0).decode())
        lat, statuses, lock = [], {}, threading.Lock()
        job = json.dumps({"prompt": "a red ball", "width": 64, "height": 64, "frames": 4, "steps": 2})
        def client(i):
            auth = {"Authorization": f"Bearer {tokens[i]}"}
            for k in range(REQUESTS):
                kind = k % 4
                t = time.monotonic()
                if kind == 0: s, _, _ = request(port, "GET", "/?sort=new")
                elif kind == 1: s, _, _ = request(port, "GET", "/api/v1/jobs", headers=auth)
                elif kind == 2: s, _, _ = request(port, "POST", "/api/v1/jobs", job, {**auth, "Content-Type": "application/json"})
                else: s, _, _ = request(port, "GET", "/api/v1/health")
                dt = time.monotonic() - t
                with lock:
                    lat.append(dt); statuses[s] = statuses.get(s, 0) + 1
        start = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads: t.start()
        for t in threads: t.join()
        wall = time.monotonic() - start
        errors = sum(n for s, n in statuses.items() if s == 0 or s >= 500)
        print(f"mixed: {CLIENTS} clients x {REQUESTS} requests in {wall:.1f} s; statuses {dict(sorted(statuses.items()))}")
        print(f"  p50 {pct(lat, 50)*1000:.0f} ms, p99 {pct(lat, 99)*1000:.0f} ms; errors (5xx, dropped) {errors}; "
              f"429 {statuses.get(429, 0)}; server VmHWM {vm_hwm(server.pid)} MiB")
        csrf = visitor(port)
        results = [None] * SIGNUPS
        def one(i): results[i] = signup(port, csrf, f"burst{i}")[0]
        threads = [threading.Thread(target=one, args=(i,)) for i in range(SIGNUPS)]
        for t in threads: t.start()
        for t in threads: t.join()
        counts = {s: results.count(s) for s in set(results)}
        hashing = json.loads(request(port, "GET", "/api/v1/health")[2])["password_hashing"]
        print(f"sign-ups: {SIGNUPS} at once: statuses {dict(sorted(counts.items()))}; hashing {hashing}; "
              f"server VmHWM {vm_hwm(server.pid)} MiB")
    finally:
        server.terminate(); server.wait()

main()
