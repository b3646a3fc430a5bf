#!/usr/bin/env python3
"""Benchmark scenarios for pulse-ingestor. Run through scripts/bench.sh (which builds and
installs what is needed). Starts its own redis-server, reference Processor and ingestor on free
loopback ports, runs each scenario, checks the books after each, stops everything, prints a
table and writes it into BENCHMARKS.md between the bench markers.

Throughput and latency of the HTTP scenarios are measured with wrk (C, light on the shared
CPU); the books of each of those scenarios are checked with a pulse-producer run against the
same instance right after: its ledger of 2xx'd pulses against what the ingestor holds, read
through its live usage API (`pulse-producer verify --ingestor`), exactly.
"""

import datetime
import hashlib
import glob
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pyutil import free_port, wait_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# BENCH_BIN: another build's binaries (with `compare`, two builds against each other).
BIN = os.environ.get("BENCH_BIN", os.path.join(ROOT, "target", "release"))
QUICK = os.environ.get("BENCH_QUICK") == "1"
DUR = 4 if QUICK else 10
BENCH_KEY = "bench-trusted-service-key"





def http(method, url, body=None, timeout=30):
    req = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, args, env=None, log=None):
        out = open(log, "w") if log else subprocess.DEVNULL
        p = subprocess.Popen(args, env=env, stdout=out, stderr=out)
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=30):
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for p in reversed(self.procs):
            self.stop(p, signal.SIGKILL, 5)


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def redis_info(port):
    """Redis CPU seconds (user + sys) and script calls so far."""
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "all"], capture_output=True,
                         text=True, check=True).stdout
    cpu = sum(float(re.search(rf"^{k}:([\d.]+)", out, re.M).group(1))
              for k in ("used_cpu_user", "used_cpu_sys"))
    calls = sum(int(c) for c in re.findall(r"^cmdstat_(?:evalsha|fcall):calls=(\d+)", out, re.M))
    return cpu, calls


def proc_cpu(pid):
    """CPU seconds a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commit_stats(port):
    """(sum, count) of ingestor_commit_batch_pulses."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    get = lambda n: float(re.search(rf"^{n} ([\d.e+]+)$", text, re.M).group(1))
    return get("ingestor_commit_batch_pulses_sum"), get("ingestor_commit_batch_pulses_count")


class Cost:
    """The cost model of one measured interval: Redis CPU per pulse, script calls per pulse,
    pulses per commit, ingestor CPU per request."""

    def __init__(self, rport, pids, ports):
        self.rport, self.pids, self.ports = rport, pids, ports
        self.start = self.snap()

    def snap(self):
        r = redis_info(self.rport)
        c = [commit_stats(p) for p in self.ports]
        return r, sum(proc_cpu(p) for p in self.pids), sum(x[0] for x in c), sum(x[1] for x in c)

    def done(self, requests, pulses):
        (rc0, calls0), ic0, s0, n0 = self.start
        (rc1, calls1), ic1, s1, n1 = self.snap()
        pulses = max(pulses, 1)
        return {"redis_us": (rc1 - rc0) * 1e6 / pulses, "calls": (calls1 - calls0) / pulses,
                "per_commit": (s1 - s0) / max(n1 - n0, 1),
                "ingestor_us": (ic1 - ic0) * 1e6 / max(requests, 1),
                "redis_busy": rc1 - rc0}


def wrk(url, script, conns=64, dur=DUR, threads=2):
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{conns}", f"-d{dur}s", "--latency", "-s", script, url],
        capture_output=True, text=True, check=True).stdout

    def ms(label):
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(non2xx.group(1)) if non2xx else 0
    # Only 2xx answers count as throughput: a shed request (503) is cheap and proves nothing.
    rps = (total - non2xx) / dur
    return {"rps": rps, "p50": ms("50%"), "p99": ms("99%"), "non2xx": non2xx, "raw": out,
            "ok": total - non2xx}


def wrk_scripts(tmp):
    rnd = random.Random(7)
    units = ["KB", "MB", "GB", "KB/sec", "MB/sec", "GB/sec"]

    def pulse(tenants):
        sku = rnd.randrange(10)
        return {"tenant_id": f"wrk-{rnd.randrange(tenants)}", "product_sku": f"SKU-{sku}",
                "used_amount": rnd.randrange(1, 100000) / 100, "use_unit": units[sku % 6]}

    singles = [json.dumps(pulse(3000)) for i in range(1000)]
    # Worst case: 1,000 pulses over 30,000 keys, almost every pulse its own Redis increment.
    batches = [json.dumps([pulse(3000) for i in range(1000)]) for _ in range(8)]
    # Typical: a service reporting its 50 tenants' usage, 500 keys: pulses of one key are
    # summed in the worker before they reach Redis.
    typical = [json.dumps([pulse(50) for i in range(1000)]) for _ in range(8)]
    lua = """
local bodies = %s
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  return wrk.format(nil, nil, nil, bodies[(i %% #bodies) + 1])
end
"""
    # The same bodies with event timestamps: "TS" is replaced at each request by now, or for
    # 5 % of the pulses by up to 30 minutes ago (late pulses: sealed windows and amendments).
    stamped_lua = lua.replace(
        "return wrk.format(nil, nil, nil, bodies[(i %% #bodies) + 1])",
        "local now = os.time()\n  local b = bodies[(i %% #bodies) + 1]:gsub('\"TS\"', function()\n"
        "    if math.random() < 0.05 then return tostring(now - math.random(0, 1800)) end\n"
        "    return tostring(now)\n  end)\n  return wrk.format(nil, nil, nil, b)")

    def stamp(body):
        return body.replace('"use_unit"', '"timestamp": "TS", "use_unit"')
    paths = {}
    for name, bodies in (("single", singles), ("batch", batches), ("typical", typical)):
        p = os.path.join(tmp, f"{name}-ts.lua")
        with open(p, "w") as f:
            f.write(stamped_lua % ("{" + ",".join("[==[" + stamp(b) + "]==]" for b in bodies) + "}"))
        paths[f"{name}-ts"] = p
        p = os.path.join(tmp, f"{name}.lua")
        with open(p, "w") as f:
            f.write(lua % ("{" + ",".join("[==[" + b + "]==]" for b in bodies) + "}"))
        paths[name] = p
    # The same single pulses, sent with a trusted service's API key.
    with open(paths["single"]) as f:
        keyed = f.read().replace('wrk.method = "POST"', 'wrk.method = "POST"\nwrk.headers["X-API-Key"] = "%s"' % BENCH_KEY)
    paths["single-keyed"] = os.path.join(tmp, "single-keyed.lua")
    with open(paths["single-keyed"], "w") as f:
        f.write(keyed)
    return paths


def books(ledger, port, api_key=None):
    """The producer's ledger against what the ingestor on `port` holds, read through its live
    usage API (`pulse-producer verify --ingestor`): exact, and no knowledge of the key layout
    here. Returns (balanced, detail)."""
    args = [os.path.join(BIN, "pulse-producer"), "verify", "--ledger", ledger, "--ingestor",
            f"http://127.0.0.1:{port}"] + (["--api-key", api_key] if api_key else [])
    v = subprocess.run(args, capture_output=True, text=True)
    with open(ledger) as f:
        led = json.load(f)
    detail = f"{len(led['totals'])} keys, {led['pulses']} pulses"
    ok = v.returncode == 0
    return ok, detail if ok else f"{detail}; {v.stdout.strip()[-300:]}"


def used_memory(rport, without_clients=False):
    """`used_memory`; `without_clients`: less the clients' buffers (`mem_clients_normal`), which
    a burst of 1,000-pulse calls leaves at ~100 KB a connection until Redis shrinks them."""
    out = subprocess.run(["redis-cli", "-p", str(rport), "INFO", "memory"], capture_output=True,
                         text=True).stdout
    used = int(re.search(r"^used_memory:(\d+)", out, re.M).group(1))
    if without_clients:
        used -= int(re.search(r"^mem_clients_normal:(\d+)", out, re.M).group(1))
    return used


def producer(args, log):
    out = subprocess.run([os.path.join(BIN, "pulse-producer")] + args, capture_output=True,
                         text=True)
    with open(log, "a") as f:
        f.write(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"producer failed: {out.stdout}{out.stderr}")
    return out.stdout


class Bench:
    """One benchmark run: its Redis, processes, wrk scripts and the rows it collects. Each
    scenario is a method, run in the order of the table."""

    def __init__(self, aof=True):
        self.procs = Procs()
        self.tmp = tempfile.mkdtemp(prefix="pulse-bench-")
        self.log = os.path.join(self.tmp, "bench.log")
        self.scripts = wrk_scripts(self.tmp)
        self.rows, self.costs, self.fleet = [], [], []
        self.ok = True
        self.rport = free_port()
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if aof \
            else ["--appendonly", "no"]
        self.procs.start(["redis-server", "--port", str(self.rport), "--bind", "127.0.0.1",
                          "--dir", self.tmp, "--save", ""] + persistence,
                         log=os.path.join(self.tmp, "redis.log"))
        wait_port(self.rport)

    def processor(self):
        port = free_port()
        p = self.procs.start([os.path.join(BIN, "pulse-processor"), "--listen", f"127.0.0.1:{port}"],
                             log=os.path.join(self.tmp, "processor.log"))
        wait_port(port)
        return p, port

    def ingestor(self, extra, processor_port=None, flush=True, log="ingestor.log", wait=True):
        """A fresh ingestor on this run's Redis (flushed first unless `flush=False`); waits until
        it listens unless `wait=False` (the fleet starts several, then waits)."""
        if flush:
            subprocess.run(["redis-cli", "-p", str(self.rport), "FLUSHALL"], check=True,
                           capture_output=True)
        port = free_port()
        env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{self.rport}",
                   LISTEN_ADDR=f"127.0.0.1:{port}", RUST_LOG="warn")
        if processor_port:
            env["PROCESSOR_URL"] = f"http://127.0.0.1:{processor_port}/batches"
        env.update(extra)
        if "REDIS_CLUSTER_URLS" in extra:
            del env["REDIS_URL"]  # one way to reach Redis
        p = self.procs.start([os.path.join(BIN, "pulse-ingestor")], env=env,
                             log=os.path.join(self.tmp, log))
        if wait:
            wait_port(port)
        return p, port

    def http_scenario(self, name, extra, script, path, producer_args, per_request=1, conns=64,
                      api_key=None):
        """wrk against a fresh ingestor (throughput, latency, cost model), then a producer run
        whose ledger is checked against what the ingestor holds."""
        ing, port = self.ingestor(extra)
        # The cost model reads this run's single Redis: not what a cluster run spends.
        cost = None if "REDIS_CLUSTER_URLS" in extra else Cost(self.rport, [ing.pid], [port])
        w = wrk(f"http://127.0.0.1:{port}{path}", self.scripts[script], conns=conns)
        if cost:
            self.costs.append((name, cost.done(w["ok"], w["ok"] * per_request)))
        ledger = os.path.join(self.tmp, "ledger.json")
        producer(["--url", f"http://127.0.0.1:{port}", "--duration", f"{min(DUR, 5)}s",
                  "--ids", "--ledger", ledger] + producer_args
                 + (["--api-key", api_key] if api_key else []), self.log)
        # Enqueued mode answers before the write: let the queue empty first.
        time.sleep(1)
        ok, detail = books(ledger, port, api_key)
        self.ok &= ok
        rss = peak_rss_mb(ing.pid)
        self.procs.stop(ing)
        unit = "pulses/s" if per_request > 1 else "req/s"
        rate = w["rps"] * per_request
        base = self.ceiling_batch if per_request > 1 else self.ceiling
        self.rows.append((name, f"{rate:,.0f} {unit}", w["p50"], w["p99"], rss,
                          w["rps"] / base["rps"],
                          ("balanced: " if ok else "NOT BALANCED: ") + detail
                          + (f"; {w['non2xx']} non-2xx" if w["non2xx"] else "")))
        print(f"{name}: {rate:,.0f} {unit}, books {'ok' if ok else 'BAD'}", file=sys.stderr)

    def s1_ceiling(self):
        """1. The same load against a handler that does nothing."""
        port = free_port()
        c = self.procs.start([os.path.join(BIN, "pulse-ceiling"), "--listen", f"127.0.0.1:{port}"])
        wait_port(port)
        cpu0 = proc_cpu(c.pid)
        self.ceiling = wrk(f"http://127.0.0.1:{port}/ingest", self.scripts["single"])
        # The limit an ingestor request's CPU is compared with: the bare handler's, same load.
        self.ceiling_us = (proc_cpu(c.pid) - cpu0) * 1e6 / max(self.ceiling["rps"] * DUR, 1)
        self.hincrby_us = self.hincrby_limit()
        self.ceiling_batch = wrk(f"http://127.0.0.1:{port}/ingest/batch", self.scripts["batch"],
                                 conns=8)
        self.procs.stop(c)
        self.rows.append(("1. ceiling (202, no work), 64 conns", f"{self.ceiling['rps']:,.0f} req/s",
                          self.ceiling["p50"], self.ceiling["p99"], None, 1.0, "n/a (no work)"))
        self.rows.append(("1b. ceiling, 1,000-pulse bodies, 8 conns",
                          f"{self.ceiling_batch['rps'] * 1000:,.0f} pulses/s",
                          self.ceiling_batch["p50"], self.ceiling_batch["p99"], None, 1.0,
                          "n/a (no work)"))
        print(f"ceiling: {self.ceiling['rps']:,.0f} req/s", file=sys.stderr)

    def hincrby_limit(self, n=1_000_000):
        """The limit a pulse's Redis CPU is compared with, on this run's Redis (AOF as the
        scenarios have it): one pipelined HINCRBY into a 3,000-field hash, Redis CPU µs per
        command (`INFO` user+sys around `redis-benchmark -P 32`)."""
        def run(count):
            subprocess.run(["redis-benchmark", "-p", str(self.rport), "-P", "32", "-c", "4",
                            "-n", str(count), "-r", "3000", "-q", "HINCRBY", "bench:limit",
                            "__rand_int__", "1"], capture_output=True, check=True)
        run(50_000)
        cpu0, _ = redis_info(self.rport)
        run(n)
        cpu1, _ = redis_info(self.rport)
        subprocess.run(["redis-cli", "-p", str(self.rport), "DEL", "bench:limit"],
                       capture_output=True)
        us = (cpu1 - cpu0) * 1e6 / n
        print(f"limit: one pipelined HINCRBY = {us:.2f} µs of Redis CPU; bare handler = "
              f"{self.ceiling_us:.1f} µs of CPU per request", file=sys.stderr)
        return us

    def s2_durable(self):
        self.http_scenario("2. POST /ingest, durable ack, 64 conns", {"ACK_MODE": "durable"},
                           "single", "/ingest", ["--mode", "max", "--concurrency", "64"])

    def s2b_keys_and_limits(self):
        """2b. As 2 with API keys and per-tenant rate limits on (limits high enough not to
        refuse: this measures their cost, not their effect)."""
        keys_file = os.path.join(self.tmp, "api-keys")
        with open(keys_file, "w") as f:
            f.write(hashlib.sha256(BENCH_KEY.encode()).hexdigest() + " * bench\n")
        self.http_scenario("2b. as 2, with API keys and rate limits on",
                           {"ACK_MODE": "durable", "API_KEYS_FILE": keys_file,
                            "RATE_LIMIT": "1000000", "RATE_LIMIT_BURST": "1000000"},
                           "single-keyed", "/ingest", ["--mode", "max", "--concurrency", "64"],
                           api_key=BENCH_KEY)

    def s3_enqueued(self):
        self.http_scenario("3. POST /ingest, enqueued ack, 64 conns", {"ACK_MODE": "enqueued"},
                           "single", "/ingest", ["--mode", "max", "--concurrency", "64"])

    def s4a_worst_case_batches(self):
        self.http_scenario("4a. POST /ingest/batch, 1,000 pulses over 30,000 keys, 8 conns", {},
                           "batch", "/ingest/batch", BATCH_ARGS, per_request=1000, conns=8)

    def s4b_typical_batches(self):
        self.http_scenario("4b. POST /ingest/batch, 1,000 pulses over 500 keys, 8 conns", {},
                           "typical", "/ingest/batch", BATCH_ARGS + ["--tenants", "50"],
                           per_request=1000, conns=8)

    def s5_tenant_model(self):
        """5. The earlier producer's model: 3,000 tenants, 500-1,000 ms between sends."""
        ing, port = self.ingestor({})
        ledger = os.path.join(self.tmp, "ledger.json")
        rep = os.path.join(self.tmp, "report.json")
        secs = 10 if QUICK else 30
        producer(["--url", f"http://127.0.0.1:{port}", "--mode", "tenants", "--tenants", "3000",
                  "--min-delay", "500ms", "--max-delay", "1000ms", "--duration", f"{secs}s",
                  "--ids", "--ledger", ledger, "--report-json", rep], self.log)
        with open(rep) as f:
            r = json.load(f)
        ok, detail = books(ledger, port)
        self.ok &= ok
        rss = peak_rss_mb(ing.pid)
        self.procs.stop(ing)
        self.rows.append((f"5. 3,000 tenants every 0.5-1 s ({secs} s)",
                          f"{r['requests_per_s']:,.0f} req/s", r["latency_ms"]["p50"],
                          r["latency_ms"]["p99"], rss, None,
                          ("balanced: " if ok else "NOT BALANCED: ") + detail))

    def s6_drain(self):
        """6. Drain of a sealed window holding 1,000,000 distinct keys, books at the Processor."""
        keys = 200_000 if QUICK else 1_000_000
        window = 30
        proc, pport = self.processor()
        ing, port = self.ingestor(
            {"WINDOW": f"{window}s", "STABILISATION_DELAY": "0s", "DRAIN_INTERVAL": "1s"},
            processor_port=pport)
        # Start right after a boundary so the whole load lands in one window.
        while True:
            now = int(subprocess.run(["redis-cli", "-p", str(self.rport), "TIME"],
                                     capture_output=True, text=True).stdout.split()[0])
            if now % window < 2:
                break
            time.sleep(0.2)
        start = now - now % window
        ledger = os.path.join(self.tmp, "ledger.json")
        mem0 = used_memory(self.rport)
        t0 = time.time()
        producer(["--url", f"http://127.0.0.1:{port}", "--mode", "max", "--concurrency", "4",
                  "--batch", "1000", "--distinct", "--tenants", str(keys // 10), "--skus", "10",
                  "--count", str(keys), "--duration", "25s", "--ledger", ledger], self.log)
        load_s = time.time() - t0
        # Wait for the boundary, then time the drain until nothing is pending.
        while time.time() < t0 + (start + window - now) + 0.05:
            time.sleep(0.05)
        t1 = time.time()
        while True:
            p = http("GET", f"http://127.0.0.1:{port}/admin/pending")
            totals = http("GET", f"http://127.0.0.1:{pport}/stats")
            if p["pending_windows"] == 0 and totals["records"] >= keys:
                break
            if time.time() - t1 > 300:
                raise RuntimeError(f"drain did not finish: {p}")
            time.sleep(0.1)
        drain_s = time.time() - t1
        # What the delivered window left behind (usage index, records, their hashes): Redis
        # memory now against before the load, per delivered key.
        left = (used_memory(self.rport) - mem0) / keys
        self.left_per_key = left
        print(f"left in Redis after delivery: {left:.1f} B per delivered key", file=sys.stderr)
        rss = peak_rss_mb(ing.pid)
        totals = http("GET", f"http://127.0.0.1:{pport}/totals")
        v = subprocess.run([os.path.join(BIN, "pulse-producer"), "verify", "--ledger", ledger,
                            "--processor", f"http://127.0.0.1:{pport}"], capture_output=True,
                           text=True)
        ok = v.returncode == 0
        self.ok &= ok
        self.procs.stop(ing)
        self.procs.stop(proc)
        self.rows.append((f"6. drain of one window, {keys:,} distinct keys",
                          f"{totals['records'] / drain_s:,.0f} records/s", None, None, rss, None,
                          (f"balanced (Processor): {totals['records']:,} records in {drain_s:.1f} s; "
                           if ok else "NOT BALANCED: " + v.stdout.strip() + "; ")
                          + f"{totals['redelivered']} re-delivered; load took {load_s:.1f} s"))

    def s7_cluster(self):
        """7. The worst-case batch load again, on a 3-master Redis Cluster on this machine."""
        cports = []
        while len(cports) < 3:
            p = free_port()
            if p < 55000:
                cports.append(p)
        for p in cports:
            d = os.path.join(self.tmp, f"cluster-{p}")
            os.makedirs(d)
            self.procs.start(["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--dir", d,
                              "--cluster-enabled", "yes", "--appendonly", "yes", "--appendfsync",
                              "everysec", "--save", ""], log=os.path.join(d, "redis.log"))
        for p in cports:
            wait_port(p)
        subprocess.run(["redis-cli", "--cluster", "create"] + [f"127.0.0.1:{p}" for p in cports]
                       + ["--cluster-replicas", "0", "--cluster-yes"], check=True,
                       capture_output=True)
        while not all("cluster_state:ok" in subprocess.run(
                ["redis-cli", "-p", str(p), "CLUSTER", "INFO"], capture_output=True,
                text=True).stdout for p in cports):
            time.sleep(0.2)
        urls = ",".join(f"redis://127.0.0.1:{p}" for p in cports)
        self.http_scenario("7. as 4a, on a 3-master Redis Cluster (same machine)",
                           {"REDIS_CLUSTER_URLS": urls}, "batch", "/ingest/batch", BATCH_ARGS,
                           per_request=1000, conns=8)

    def s8_memory_per_id(self):
        """8. Redis memory per remembered pulse id, in the steady state: 100,000 ids in one
        DEDUPE_TTL bucket (20 s here), then 100,000 in the next, whose slot hashes were sized
        from the first. The marker hashes are the one place this script names a key (`:seen:`),
        to weigh them with MEMORY USAGE."""
        ttl = 20
        ing, port = self.ingestor({"DEDUPE_TTL": f"{ttl}s"})
        cli = ["redis-cli", "-p", str(self.rport)]

        def redis_now():
            return int(subprocess.run(cli + ["TIME"], capture_output=True,
                                      text=True).stdout.split()[0])

        def next_bucket():
            time.sleep(ttl - redis_now() % ttl + 0.2)
            return redis_now() // ttl

        def send():
            producer(["--url", f"http://127.0.0.1:{port}", "--mode", "max", "--concurrency", "4",
                      "--batch", "1000", "--ids", "--count", "100000",
                      "--duration", "60s"], self.log)

        next_bucket()
        send()
        bucket = next_bucket()
        before = used_memory(self.rport)
        before_data = used_memory(self.rport, without_clients=True)
        send()
        after = used_memory(self.rport)
        after_data = used_memory(self.rport, without_clients=True)
        if redis_now() // ttl != bucket:
            print("memory per id: the second 100,000 ids took longer than one bucket",
                  file=sys.stderr)
        keys = subprocess.run(cli + ["--scan", "--pattern", f"{{pulses:*}}:seen:{ttl}:{bucket}:*"],
                              capture_output=True, text=True).stdout.split()
        key_bytes = sum(int(subprocess.run(cli + ["MEMORY", "USAGE", k, "SAMPLES", "0"],
                                           capture_output=True, text=True).stdout.strip() or 0)
                        for k in keys)
        self.procs.stop(ing)
        self.memory_row = (key_bytes / 100_000, (after - before) / 100_000,
                           (after_data - before_data) / 100_000)
        print(f"memory per id: {self.memory_row[0]:.1f} B in marker hashes ({len(keys)}), "
              f"{self.memory_row[1]:.1f} B used_memory, {self.memory_row[2]:.1f} B without the "
              "clients' buffers", file=sys.stderr)

    def s9_fleet(self):
        """9. Fleet: 2 and 3 replicas against one Redis, single pulses, until Redis saturates
        (on this 2-core box the replicas and wrk saturate first; the cost per pulse projects)."""
        for n in (2, 3):
            subprocess.run(["redis-cli", "-p", str(self.rport), "FLUSHALL"], check=True,
                           capture_output=True)
            ings = [self.ingestor({}, flush=False, log=f"fleet-{n}-{i}.log", wait=False)
                    for i in range(n)]
            for _, port in ings:
                wait_port(port)
            cost = Cost(self.rport, [p.pid for p, _ in ings], [port for _, port in ings])
            runs = [subprocess.Popen(["wrk", "-t1", f"-c{64 // n}", f"-d{DUR}s", "--latency", "-s",
                                      self.scripts["single"], f"http://127.0.0.1:{port}/ingest"],
                                     stdout=subprocess.PIPE, text=True) for _, port in ings]
            outs = [r.communicate()[0] for r in runs]
            ok_reqs = 0
            for out in outs:
                total = int(re.search(r"(\d+) requests in", out).group(1))
                bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
                ok_reqs += total - (int(bad.group(1)) if bad else 0)
            self.fleet.append((n, ok_reqs / DUR, cost.done(ok_reqs, ok_reqs)))
            for p, _ in ings:
                self.procs.stop(p)

    def run(self):
        try:
            for scenario in (self.s1_ceiling, self.s2_durable, self.s2b_keys_and_limits,
                             self.s3_enqueued, self.s4a_worst_case_batches,
                             self.s4b_typical_batches, self.s5_tenant_model, self.s6_drain,
                             self.s7_cluster, self.s8_memory_per_id, self.s9_fleet):
                scenario()
        finally:
            self.procs.stop_all()

    def write_table(self):
        cpu = "unknown"
        try:
            with open("/proc/cpuinfo") as f:
                cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
        except (OSError, AttributeError):
            pass
        fmt = lambda v, f: "" if v is None else f.format(v)
        table = ["| scenario | throughput | p50 ms | p99 ms | ingestor peak RSS MB | ratio to ceiling | books |",
                 "|---|---|---|---|---|---|---|"]
        for name, thr, p50, p99, rss, ratio, books_ in self.rows:
            table.append(f"| {name} | {thr} | {fmt(p50, '{:.2f}')} | {fmt(p99, '{:.2f}')} | "
                         f"{fmt(rss, '{:.0f}')} | {fmt(ratio, '{:.2f}')} | {books_} |")
        h, b = getattr(self, "hincrby_us", 0) or 1e-9, getattr(self, "ceiling_us", 0) or 1e-9
        table += ["", "Cost model (same run; Redis CPU from `INFO` user+sys, script calls from "
                  "`INFO commandstats`, pulses per commit from `ingestor_commit_batch_pulses`, ingestor "
                  "CPU from `/proc/<pid>/stat`). Limits measured in the same run: one pipelined "
                  f"`HINCRBY` into a 3,000-field hash = {h:.2f} µs of Redis CPU (`redis-benchmark "
                  f"-P 32`, same Redis, AOF on); the bare handler (`pulse-ceiling`, scenario 1) = "
                  f"{b:.1f} µs of CPU per request:", "",
                  "| scenario | Redis CPU µs per pulse | ÷ one HINCRBY | script calls per pulse | pulses per commit | ingestor CPU µs per request | ÷ bare handler |",
                  "|---|---|---|---|---|---|---|"]
        for name, c in self.costs:
            single = "single" in name or name.startswith(("2", "3"))
            ratio = f"{c['ingestor_us'] / b:.2f}×" if single else "—"
            table.append(f"| {name} | {c['redis_us']:.2f} | {c['redis_us'] / h:.2f}× | "
                         f"{c['calls']:.3f} | {c['per_commit']:.1f} | {c['ingestor_us']:.1f} | {ratio} |")
        for n, rps, c in self.fleet:
            table.append(f"| 9. fleet: {n} replicas, one Redis, single pulses ({rps:,.0f} req/s in total, "
                         f"Redis busy {c['redis_busy'] / DUR * 100:.0f} % of a core; projected "
                         f"{1e6 / max(c['redis_us'], 0.01):,.0f} pulses/s per Redis core) | {c['redis_us']:.2f} | "
                         f"{c['redis_us'] / h:.2f}× | {c['calls']:.3f} | {c['per_commit']:.1f} | "
                         f"{c['ingestor_us']:.1f} | {c['ingestor_us'] / b:.2f}× |")
        # Fleet projection: pulses per Redis core, from each scenario's Redis CPU per pulse.
        per_core = [f"{name.split('.')[0]}: {1e6 / max(c['redis_us'], 0.01):,.0f}"
                    for name, c in self.costs]
        table += ["", "Fleet projection, pulses/s per Redis core (1 / Redis CPU per pulse, this run): "
                  + "; ".join(per_core) + " (2, 2b, 3: single pulses; 4a, 4b: batches)."]
        m = self.memory_row
        table += ["", f"Redis memory left after a window of 1,000,000 keys was delivered: "
                  f"{getattr(self, 'left_per_key', float('nan')):.1f} bytes per delivered key "
                  f"(`used_memory` after the drain against before the load)."]
        table += ["", f"Redis memory per remembered pulse id (100,000 ids in a bucket sized from the "
                  f"one before): {m[0]:.1f} bytes in the marker hashes (`MEMORY USAGE`), "
                  f"{m[1]:.1f} bytes of `used_memory` growth ({m[2]:.1f} less the clients' "
                  f"buffers, which Redis shrinks once idle); a day of ids at 1,000 ids/s: "
                  f"{m[0] * 86.4e6 / 1e9:.1f} GB."]
        machine = (f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, "
                   f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
                   + (", BENCH_QUICK=1" if QUICK else ""))
        block = "\n".join(["<!-- bench:start -->", f"Machine: {machine}.", "", *table,
                           "<!-- bench:end -->"])
        print("\n".join(table))
        path = os.path.join(ROOT, "BENCHMARKS.md")
        text = open(path).read() if os.path.exists(path) else "<!-- bench:start -->\n<!-- bench:end -->\n"
        text = re.sub(r"<!-- bench:start -->.*<!-- bench:end -->", lambda _: block, text, flags=re.S)
        with open(path, "w") as f:
            f.write(text)
        print(f"\nlogs: {self.tmp}; table written to BENCHMARKS.md", file=sys.stderr)


BATCH_ARGS = ["--mode", "max", "--concurrency", "8", "--batch", "1000"]


def main():
    bench = Bench()
    bench.run()
    bench.write_table()
    return 0 if bench.ok else 1


def ab(pairs=5, base_bin=None, wait=False, event_time=False):
    """Alternating before/after pairs in one sitting: REDIS_COMMIT=per-shard (one script call
    per shard, the previous behaviour) against one-call (a commit's shards in one call), for
    single pulses (scenario 2) and worst-case batches (4a). Prints medians and per-pair ratios."""
    procs = Procs()
    tmp = tempfile.mkdtemp(prefix="pulse-ab-")
    scripts = wrk_scripts(tmp)
    results = {}
    try:
        rport = free_port()
        procs.start(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--dir", tmp,
                     "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
                    log=os.path.join(tmp, "redis.log"))
        wait_port(rport)
        if wait:
            # A replica of the benchmark's Redis, for REDIS_WAIT_REPLICAS.
            rep = free_port()
            procs.start(["redis-server", "--port", str(rep), "--bind", "127.0.0.1", "--dir", tmp,
                         "--dbfilename", "replica.rdb", "--appendonly", "no", "--save", "",
                         "--replicaof", "127.0.0.1", str(rport)], log=os.path.join(tmp, "replica.log"))
            wait_port(rep)
            time.sleep(1)
        # Either REDIS_COMMIT per-shard against one-call in this build, (compare) another build's
        # binary against this one, or (wait) REDIS_WAIT_REPLICAS 0 against 1.
        if event_time:
            variants = [("unstamped", BIN, {}), ("stamped-5%-late", BIN, {"SCRIPT": "-ts"})]
        elif wait:
            variants = [("no-wait", BIN, {}), ("wait-1", BIN, {"REDIS_WAIT_REPLICAS": "1"})]
        elif base_bin is None:
            variants = [("per-shard", BIN, {"REDIS_COMMIT": "per-shard"}), ("one-call", BIN, {})]
        else:
            variants = [("base", base_bin, {}), ("this", BIN, {})]
        scenarios = [("2", "single", "/ingest", 64, 1), ("4a", "batch", "/ingest/batch", 8, 1000)]
        if base_bin is not None or event_time:
            scenarios.append(("4b", "typical", "/ingest/batch", 8, 1000))
        for i in range(pairs):
            for mode, bindir, extra in variants:
                for scen, script, path, conns, per in scenarios:
                    subprocess.run(["redis-cli", "-p", str(rport), "FLUSHALL"], check=True,
                                   capture_output=True)
                    port = free_port()
                    extra = dict(extra)
                    suffix = extra.pop("SCRIPT", "")
                    env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{rport}",
                               LISTEN_ADDR=f"127.0.0.1:{port}", RUST_LOG="warn", **extra)
                    ing = procs.start([os.path.join(bindir, "pulse-ingestor")], env=env)
                    wait_port(port)
                    cost = Cost(rport, [ing.pid], [port])
                    w = wrk(f"http://127.0.0.1:{port}{path}", scripts[script + suffix], conns=conns)
                    c = cost.done(w["ok"], w["ok"] * per)
                    c["rate"] = w["ok"] * per / DUR
                    c["p99"] = w["p99"]
                    results.setdefault((scen, mode), []).append(c)
                    procs.stop(ing)
                    print(f"pair {i + 1} {scen} {mode}: {c['rate']:,.0f}/s, Redis {c['redis_us']:.2f} µs/pulse, "
                          f"{c['calls']:.3f} calls/pulse, {c['per_commit']:.1f} pulses/commit, "
                          f"ingestor {c['ingestor_us']:.1f} µs/req", file=sys.stderr)
    finally:
        procs.stop_all()
    med = lambda xs: sorted(xs)[len(xs) // 2]
    print("| scenario | variant | rate (median) | p99 ms | Redis CPU µs/pulse | script calls/pulse | pulses/commit | ingestor CPU µs/request |")
    print("|---|---|---|---|---|---|---|---|")
    for (scen, mode), cs in sorted(results.items()):
        print(f"| {scen} | {mode} | {med([c['rate'] for c in cs]):,.0f}/s | {med([c['p99'] for c in cs]):.2f} | "
              f"{med([c['redis_us'] for c in cs]):.2f} | {med([c['calls'] for c in cs]):.3f} | "
              f"{med([c['per_commit'] for c in cs]):.1f} | {med([c['ingestor_us'] for c in cs]):.1f} |")
    names = [v[0] for v in variants]
    for scen in sorted({k[0] for k in results}):
        before, after = results[(scen, names[0])], results[(scen, names[1])]
        ratios = [a["rate"] / b["rate"] for a, b in zip(after, before)]
        cpu = [b["redis_us"] / a["redis_us"] for a, b in zip(after, before)]
        print(f"scenario {scen}: {names[1]} / {names[0]} throughput, median of per-pair ratios "
              f"{med(ratios):.2f}; Redis CPU per pulse divided by {med(cpu):.2f}")
    return 0


def usage_latency(queries=300):
    """`GET /v1/usage` latency for a tenant with 10 keys and one with 1,000 keys, first alone in
    Redis, then beside 1,000,000 keys of other tenants in the same window (and shards): the query
    reads the tenant's own usage index, so its cost should not move. Prints a table."""
    # No AOF: its rewrite after the million-key load would compete with the queries measured.
    bench = Bench(aof=False)
    rows = []
    try:
        _, port = bench.ingestor({"WINDOW": "1h"})
        base = f"http://127.0.0.1:{port}"
        tenants = (("small", 10), ("big", 1000))
        for tenant, keys in tenants:
            body = json.dumps([{"tenant_id": tenant, "product_sku": f"SKU-{i}", "use_unit": "KB",
                                "used_amount": 1} for i in range(keys)]).encode()
            req = urllib.request.Request(f"{base}/ingest/batch", data=body, method="POST",
                                         headers={"content-type": "application/json"})
            urllib.request.urlopen(req, timeout=30).read()

        def measure(label):
            for tenant, keys in tenants:
                times = []
                for _ in range(queries):
                    t = time.perf_counter()
                    u = http("GET", f"{base}/v1/usage?tenant_id={tenant}")
                    times.append((time.perf_counter() - t) * 1000)
                    assert sum(len(w["usage"]) for w in u["windows"]) == keys, u
                times.sort()
                rows.append((label, f"{tenant} ({keys} keys)", times[len(times) // 2],
                             times[int(len(times) * 0.99) - 1]))
                print(f"{label}, {tenant}: p50 {rows[-1][2]:.2f} ms, p99 {rows[-1][3]:.2f} ms",
                      file=sys.stderr)

        measure("alone")
        other = 200_000 if QUICK else 1_000_000
        producer(["--url", base, "--mode", "max", "--concurrency", "4", "--batch", "1000",
                  "--distinct", "--tenants", str(other // 10), "--skus", "10", "--count",
                  str(other), "--duration", "60s"], bench.log)
        measure(f"beside {other:,} keys of other tenants")
    finally:
        bench.procs.stop_all()
    print("| Redis holds | tenant | p50 ms | p99 ms |\n|---|---|---|---|")
    for label, tenant, p50, p99 in rows:
        print(f"| {label} | {tenant} | {p50:.2f} | {p99:.2f} |")
    return 0


def callgrind(count=1000):
    """Instructions, not seconds: the ingestor and redis-server each run under valgrind's
    callgrind (hardware counters are not available here); after a warm-up the counters are
    zeroed, a fixed replay is sent (64 connections), and the counters are dumped. Instructions
    per request (ingestor) and per pulse (Redis) do not move with the neighbours' load, so two
    builds can be compared across sittings. BENCH_BIN=<dir> measures another build;
    BENCH_REDIS_ARGS adds redis-server arguments (an experiment's configuration)."""
    procs = Procs()
    tmp = tempfile.mkdtemp(prefix="pulse-cg-")
    vg = ["valgrind", "--tool=callgrind", "--quiet"]
    rows = []
    try:
        rport = free_port()
        redis = procs.start(vg + [f"--callgrind-out-file={tmp}/redis.%p", "redis-server",
                                  "--port", str(rport), "--bind", "127.0.0.1", "--dir", tmp,
                                  "--appendonly", "no", "--save", ""]
                            + os.environ.get("BENCH_REDIS_ARGS", "").split(),
                            log=os.path.join(tmp, "redis.log"))
        wait_port(rport, 60)
        port = free_port()
        env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{rport}",
                   LISTEN_ADDR=f"127.0.0.1:{port}", RUST_LOG="warn", WORKERS="2")
        ing = procs.start(vg + [f"--callgrind-out-file={tmp}/ingestor.%p",
                                os.path.join(BIN, "pulse-ingestor")], env=env,
                          log=os.path.join(tmp, "ingestor.log"))
        wait_port(port, 120)
        log = os.path.join(tmp, "producer.log")
        limit = hincrby_limit(redis, rport, tmp)
        bare = bare_handler_limit(procs, vg, tmp, count, log)
        scenarios = [("single pulses, no ids", [], 1), ("single pulses with ids", ["--ids"], 1),
                     ("batches of 100 with ids", ["--ids", "--batch", "100"], 100),
                     ("batches of 1,000 over 30,000 keys", ["--batch", "1000"], 1000)]
        warmed = False
        for name, args, per in scenarios:
            n = count * 10 if per >= 1000 else count
            # 64 connections, as the throughput scenarios: commits gather what is queued.
            send = lambda n: producer(["--url", f"http://127.0.0.1:{port}", "--mode", "max",
                                       "--concurrency", "64", "--count", str(n), "--tenants",
                                       "3000", "--duration", "600s"] + args, log)
            if per >= 1000:
                send = lambda n: producer(["--url", f"http://127.0.0.1:{port}", "--mode", "max",
                                           "--concurrency", "8", "--count", str(n),
                                           "--duration", "600s"] + args, log)
            if not warmed:
                # Steady state, as a window is for all but its first seconds: every one of the
                # 30,000 keys already counted in it (a key's first pulse in a window also enters
                # the usage index). 200,000 pulses in batches touch ~99.9 % of them.
                producer(["--url", f"http://127.0.0.1:{port}", "--mode", "max", "--concurrency",
                          "8", "--count", "200000", "--batch", "1000", "--duration", "600s"], log)
                warmed = True
            # Warm-up, as long as the replay: Redis' Lua heap still holds the garbage of the
            # scenario before (a 1,000-pulse batch's arguments), which its incremental GC would
            # otherwise charge to this one (seen: +1k instructions a single pulse).
            send(n if per >= 1000 else count)
            for p, stem in ((ing, "ingestor"), (redis, "redis")):
                fresh_counters(p.pid, tmp, stem)
            before = commandstats(rport)
            send(n)
            after = commandstats(rport)
            calls = {c: after[c] - before.get(c, 0) for c in after
                     if after[c] - before.get(c, 0) > 0}
            ir = []
            for p, stem in ((ing, "ingestor"), (redis, "redis")):
                ir.append(callgrind_dump(p.pid, tmp, stem, f"{stem}-{len(rows) + 1}"))
            requests = n // per if per > 1 else n
            scripts = calls.get("evalsha", 0) + calls.get("eval", 0) + calls.get("fcall", 0)
            inner = {c: v / n for c, v in sorted(calls.items(), key=lambda x: -x[1])
                     if c not in ("evalsha", "eval", "fcall", "info", "config|resetstat",
                                  "function|load")}
            rows.append((name, ir[0] / requests, ir[1] / n, n / max(scripts, 1), inner))
            print(f"{name}: {ir[0] / requests:,.0f} ingestor instructions per request, "
                  f"{ir[1] / n:,.0f} Redis instructions per pulse, "
                  f"{n / max(scripts, 1):.1f} pulses per script call; Redis commands per pulse: "
                  + ", ".join(f"{c} {v:.2f}" for c, v in inner.items()), file=sys.stderr)
    finally:
        procs.stop_all()
    print(f"callgrind files: {tmp}", file=sys.stderr)
    print(f"limits (same run): one pipelined HINCRBY into a 3,000-field hash = {limit:,.0f} "
          f"Redis instructions; the bare handler (pulse-ceiling) = {bare:,.0f} instructions per "
          "single-pulse request")
    print("| replay (callgrind) | ingestor instructions / request | ÷ bare handler "
          "| Redis instructions / pulse | ÷ one HINCRBY | pulses / script call "
          "| commands / pulse in the scripts |")
    print("|---|---|---|---|---|---|---|")
    for name, a, b, per_call, inner in rows:
        cmds = ", ".join(f"{c} {v:.2f}" for c, v in list(inner.items())[:6])
        ratio = f"{a / bare:.2f}×" if name.startswith("single") else "—"
        print(f"| {name} | {a:,.0f} | {ratio} | {b:,.0f} | {b / limit:.2f}× | {per_call:.1f} "
              f"| {cmds} |")
    return 0


def commandstats(rport):
    """Calls per command so far (`INFO commandstats`)."""
    out = {}
    for line in redis_cli(rport, "INFO", "commandstats").splitlines():
        m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line.strip())
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def redis_cli(rport, *args):
    return subprocess.run(["redis-cli", "-p", str(rport)] + list(args), capture_output=True,
                          text=True).stdout


def fresh_counters(pid, tmp, stem):
    """Zeroes a callgrind'ed process' counters, after a dump that is thrown away: the first dump
    after `-z` alone also carried costs from before it (seen: Redis' first scenario counted
    32.7M instructions for 1,000 pulses, against 21.7M and 21.5M for the same replay dumped
    after a dump)."""
    callgrind_dump(pid, tmp, stem, f"{stem}-discarded")
    os.remove(os.path.join(tmp, f"{stem}-discarded.out"))
    subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True)


def callgrind_dump(pid, tmp, stem, keep_as):
    """Dumps a callgrind'ed process' counters since they were zeroed: its instructions; the
    file is kept as `<keep_as>.out` for callgrind_annotate."""
    for f in glob.glob(f"{tmp}/{stem}.{pid}*"):
        os.remove(f)
    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True)
    total = 0
    for f in glob.glob(f"{tmp}/{stem}.{pid}*"):
        with open(f) as fh:
            for line in fh:
                if line.startswith("summary:") or line.startswith("totals:"):
                    total = max(total, int(line.split()[1]))
        os.rename(f, f"{tmp}/{keep_as}.out")
    return total


def bare_handler_limit(procs, vg, tmp, count, log):
    """The limit the ingestor's cost per request is compared with, in the same run: the bare
    axum handler (`pulse-ceiling`: parse the pulse, answer 202) under callgrind, the same
    single-pulse replay, instructions per request."""
    port = free_port()
    c = procs.start(vg + [f"--callgrind-out-file={tmp}/ceiling.%p",
                          os.path.join(BIN, "pulse-ceiling"), "--listen", f"127.0.0.1:{port}"],
                    log=os.path.join(tmp, "ceiling.log"))
    wait_port(port, 120)
    send = lambda n: producer(["--url", f"http://127.0.0.1:{port}", "--mode", "max",
                               "--concurrency", "64", "--count", str(n), "--tenants", "3000",
                               "--duration", "600s"], log)
    send(100)
    fresh_counters(c.pid, tmp, "ceiling")
    send(count)
    total = callgrind_dump(c.pid, tmp, "ceiling", "ceiling")
    procs.stop(c)
    return total / count


def hincrby_limit(redis, rport, tmp, n=200_000):
    """The limit a pulse's Redis cost is compared with, measured on the same Redis in the same
    run: one pipelined HINCRBY into a 3,000-field hash (a hash table, as a deployment's
    generation hash is), in callgrind instructions per command."""
    def run(count):
        subprocess.run(["redis-benchmark", "-p", str(rport), "-P", "32", "-c", "4", "-n",
                        str(count), "-r", "3000", "-q", "HINCRBY", "bench:limit", "__rand_int__",
                        "1"], capture_output=True, check=True)
    run(20_000)  # warm-up: the hash reaches its 3,000 fields
    fresh_counters(redis.pid, tmp, "redis")
    run(n)
    total = callgrind_dump(redis.pid, tmp, "redis", "redis-limit")
    subprocess.run(["redis-cli", "-p", str(rport), "DEL", "bench:limit"], capture_output=True)
    return total / n


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "usage":
        # scripts/bench.sh usage: live usage query latency, alone and beside 1,000,000 keys
        sys.exit(usage_latency())
    if len(sys.argv) > 1 and sys.argv[1] == "ab":
        sys.exit(ab(int(sys.argv[2]) if len(sys.argv) > 2 else 5))
    if len(sys.argv) > 1 and sys.argv[1] == "eventtime":
        # scripts/bench.sh eventtime [pairs]: pulses with timestamps (5 % up to 30 min late)
        # against the same pulses without, single pulses and both kinds of batches
        sys.exit(ab(int(sys.argv[2]) if len(sys.argv) > 2 else 3, event_time=True))
    if len(sys.argv) > 1 and sys.argv[1] == "wait":
        # scripts/bench.sh wait [pairs]: the cost of REDIS_WAIT_REPLICAS=1 (with a real replica)
        sys.exit(ab(int(sys.argv[2]) if len(sys.argv) > 2 else 3, wait=True))
    if len(sys.argv) > 2 and sys.argv[1] == "only":
        # scripts/bench.sh only s6_drain [s8_memory_per_id ...]: some scenarios, table not written
        b = Bench()
        try:
            for name in sys.argv[2:]:
                getattr(b, name)()
        finally:
            b.procs.stop_all()
        sys.exit(0 if b.ok else 1)
    if len(sys.argv) > 1 and sys.argv[1] == "callgrind":
        # scripts/bench.sh callgrind [count]: instructions per request and per pulse
        sys.exit(callgrind(int(sys.argv[2]) if len(sys.argv) > 2 else 1000))
    if len(sys.argv) > 2 and sys.argv[1] == "compare":
        # scripts/bench.sh compare <dir holding another build's pulse-ingestor> [pairs]
        sys.exit(ab(int(sys.argv[3]) if len(sys.argv) > 3 else 3, base_bin=sys.argv[2]))
    sys.exit(main())
