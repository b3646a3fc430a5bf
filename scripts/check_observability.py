#!/usr/bin/env python3
"""Checks the observability kit and the deployable stack against real parts:

1. `promtool check config` / `check rules` on prometheus.yml and prometheus.rules.yml;
2. docker-compose.yml validated against the Compose specification schema (vendored in
   scripts/vendor/compose-spec with its licence), plus the service set, published ports and every
   variable the binaries need;
3. the Grafana provisioning: valid dashboard JSON, unique panel ids, datasource uid matching the
   provisioned datasource;
4. live: redis-server, the reference Processor and two real ingestor replicas (the same topology
   as the compose file, as plain processes), a real Prometheus scraping both during a short
   producer run; then `promtool check metrics` on a live /metrics, and every PromQL expression
   of the dashboard and of the rules evaluated through Prometheus' query API: each parses, and
   every panel's query returns data.

Usage: check_observability.py <dir with pulse-ingestor, pulse-producer, pulse-processor>
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pyutil import free_port, wait_port  # noqa: E402

import jsonschema
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAILURES = []


def check(cond, msg):
    print(("ok   " if cond else "FAIL ") + msg)
    if not cond:
        FAILURES.append(msg)





def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def promtool_static():
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "prometheus.rules.yml"]):
        r = subprocess.run(["promtool"] + args, cwd=ROOT, capture_output=True, text=True)
        check(r.returncode == 0, "promtool " + " ".join(args) + (": " + r.stdout + r.stderr if r.returncode else ""))


def compose_schema():
    """The Compose specification's schema, vendored with its licence (scripts/vendor/)."""
    with open(os.path.join(ROOT, "scripts", "vendor", "compose-spec", "compose-spec.json")) as f:
        return json.load(f)


def sentinel_profile(services):
    """The `sentinel` profile: every part of it under the profile, three sentinels monitoring the
    profile's master with a quorum they can reach, a replica of that master, and an ingestor that
    reaches Redis through exactly those sentinels (and not through REDIS_URL)."""
    part = ["redis-s", "redis-s-replica", "sentinel-1", "sentinel-2", "sentinel-3", "ingestor-sentinel"]
    check(all("sentinel" in services[n].get("profiles", []) for n in part),
          "the Sentinel services run under the sentinel profile only")
    monitors = []
    for n in ("sentinel-1", "sentinel-2", "sentinel-3"):
        cmd = " ".join(services[n]["command"])
        m = re.search(r"sentinel monitor (\S+) (\S+) (\d+) (\d+)", cmd)
        monitors.append(m.groups() if m else None)
        check("--sentinel" in cmd, f"{n} runs redis-server --sentinel")
    check(len(set(monitors)) == 1 and monitors[0] is not None, f"the sentinels agree: {monitors}")
    name, host, port, quorum = monitors[0]
    check(host == "redis-s" and port == "6379" and 1 <= int(quorum) <= 2,
          f"they monitor redis-s:6379 with a quorum a majority of 3 reaches ({quorum})")
    check("--replicaof redis-s 6379" in " ".join(services["redis-s-replica"]["command"]),
          "redis-s-replica replicates redis-s")
    env = services["ingestor-sentinel"]["environment"]
    urls = env.get("REDIS_SENTINEL_URLS", "").split(",")
    check(sorted(urls) == [f"redis://sentinel-{i}:26379" for i in (1, 2, 3)],
          f"ingestor-sentinel asks the three sentinels: {urls}")
    check(env.get("REDIS_SENTINEL_MASTER") == name, "ingestor-sentinel asks for the monitored master")
    check(env.get("REDIS_URL") == "" and "REDIS_CLUSTER_URLS" not in env,
          "ingestor-sentinel has no other way to Redis (REDIS_URL cleared)")
    # The sentinel configuration the profile writes, run by a real redis-server --sentinel
    # against a real master on loopback (its hostname mapped to 127.0.0.1).
    conf = re.search(r"printf '([^']*)'", " ".join(services["sentinel-1"]["command"])).group(1)
    tmp = tempfile.mkdtemp(prefix="sentinel-profile-")
    mport, sport = free_port(), free_port()
    conf = conf.replace("\\n", "\n").replace("port 26379", f"port {sport}") \
        .replace("redis-s 6379", f"127.0.0.1 {mport}")
    path = os.path.join(tmp, "sentinel.conf")
    with open(path, "w") as f:
        f.write(conf + f"dir {tmp}\n")
    procs = [subprocess.Popen(["redis-server", "--port", str(mport), "--bind", "127.0.0.1",
                               "--save", "", "--dir", tmp], stdout=subprocess.DEVNULL),
             subprocess.Popen(["redis-server", path, "--sentinel"], stdout=subprocess.DEVNULL)]
    try:
        master = None
        for _ in range(50):
            r = subprocess.run(["redis-cli", "-p", str(sport), "SENTINEL",
                                "get-master-addr-by-name", name], capture_output=True, text=True)
            master = r.stdout.split()
            if master == ["127.0.0.1", str(mport)]:
                break
            time.sleep(0.1)
        check(master == ["127.0.0.1", str(mport)],
              f"redis-server --sentinel runs the profile's configuration and finds the master ({master})")
    finally:
        for pr in procs:
            pr.kill()
            pr.wait()


def compose(bins):
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        doc = yaml.safe_load(f)
    schema = compose_schema()
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
    check(not errors, "docker-compose.yml is valid against the Compose specification schema"
          + "".join(f"\n     {e.message} at {list(e.path)}" for e in errors[:5]))
    services = doc["services"]
    check(set(services) == {"redis", "processor", "ingestor-1", "ingestor-2", "prometheus",
                            "grafana", "producer", "redis-s", "redis-s-replica", "sentinel-1",
                            "sentinel-2", "sentinel-3", "ingestor-sentinel", "postgres"},
          f"service set: {sorted(services)}")
    ports = {name: [str(p) for p in s.get("ports", [])] for name, s in services.items()}
    check(ports["ingestor-1"] == ["8070:8070"] and ports["ingestor-2"] == ["8071:8070"],
          f"ingestor ports {ports['ingestor-1']} {ports['ingestor-2']}")
    check(ports["grafana"] == ["3000:3000"] and ports["prometheus"] == ["9090:9090"],
          "grafana on 3000, prometheus on 9090")
    check("load" in services["producer"].get("profiles", []), "producer runs under the load profile")
    check("appendonly" in " ".join(services["redis"]["command"])
          and "healthcheck" in services["redis"], "redis has AOF and a health check")
    env_file = {}
    with open(os.path.join(ROOT, "example.env")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                env_file[k] = v
    for name in ("ingestor-1", "ingestor-2"):
        s = services[name]
        check(s.get("env_file") == "example.env", f"{name} is fed by example.env")
        env = dict(env_file, **s.get("environment", {}))
        check(env.get("REDIS_URL") == "redis://redis:6379", f"{name} REDIS_URL points at the redis service")
        check(env.get("PROCESSOR_URL", "").startswith("http://processor:8090"), f"{name} PROCESSOR_URL points at the processor")
        check(env.get("LISTEN_ADDR", "").endswith(":8070"), f"{name} listens on 8070")
        check("ACK_MODE" in env and not {"WINDOW", "SHARDS", "DEDUPE_TTL"} & set(env),
              f"{name} gets ACK_MODE from example.env and leaves the recorded settings (WINDOW, SHARDS, DEDUPE_TTL) to the deployment")
    # Every variable the ingestor reads (as its --help lists them) is in example.env, and the
    # compose file sets none the binary does not know.
    helptext = subprocess.run([os.path.join(bins, "pulse-ingestor"), "--help"], capture_output=True,
                              text=True, check=True).stdout
    names = re.findall(r"^  ([A-Z][A-Z0-9_]+)\s", helptext.split("Settings (", 1)[1], re.M)
    check(len(names) >= 40, f"--help lists the settings ({len(names)} found)")
    with open(os.path.join(ROOT, "example.env")) as f:
        example = f.read()
    missing = [n for n in names if not re.search(rf"^#?\s*{n}=", example, re.M)]
    check(not missing, f"every configuration variable is in example.env (missing: {missing})")
    for name in ("ingestor-1", "ingestor-2", "ingestor-sentinel"):
        unknown = [k for k in services[name].get("environment", {}) if k not in names and k != "RUST_LOG"]
        check(not unknown, f"{name} sets only variables the ingestor reads (unknown: {unknown})")
    sentinel_profile(services)
    proc_cmd = services["processor"]["command"]
    check("0.0.0.0:8090" in proc_cmd, "processor listens on 8090 inside the network")
    db_url = services["processor"].get("environment", {}).get("DATABASE_URL", "")
    check(db_url.startswith("postgres://") and "@postgres:5432/" in db_url
          and "healthcheck" in services["postgres"],
          "the processor stores into the postgres service, which has a health check")
    mounts = " ".join(services["prometheus"].get("volumes", []))
    check("prometheus.yml" in mounts and "prometheus.rules.yml" in mounts, "prometheus gets config and rules")
    check("./grafana-provisioning:/etc/grafana/provisioning" in " ".join(services["grafana"]["volumes"]),
          "grafana gets the provisioning")


def dashboard():
    with open(os.path.join(ROOT, "grafana-provisioning", "dashboards", "pulse-ingestor.json")) as f:
        dash = json.load(f)
    with open(os.path.join(ROOT, "grafana-provisioning", "datasources", "prometheus.yml")) as f:
        uid = yaml.safe_load(f)["datasources"][0]["uid"]
    ids = [p["id"] for p in dash["panels"]]
    check(isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 36, "dashboard schemaVersion")
    check(len(ids) == len(set(ids)), "unique panel ids")
    uids = {p["datasource"]["uid"] for p in dash["panels"]} | {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    check(uids == {uid}, f"every panel uses the provisioned datasource uid {uid!r}")
    return dash


def live(bins, dash):
    tmp = tempfile.mkdtemp(prefix="pulse-obs-")
    procs = []

    def start(args, env=None, name="p"):
        log = open(os.path.join(tmp, f"{name}.log"), "w")
        p = subprocess.Popen(args, env=env, stdout=log, stderr=log)
        procs.append(p)
        return p

    try:
        rport, pport, prom = free_port(), free_port(), free_port()
        start(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", tmp], name="redis")
        start([os.path.join(bins, "pulse-processor"), "--listen", f"127.0.0.1:{pport}"], name="processor")
        wait_port(rport)
        wait_port(pport)
        replicas = []
        for i in (1, 2):
            port = free_port()
            env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{rport}", LISTEN_ADDR=f"127.0.0.1:{port}",
                       PROCESSOR_URL=f"http://127.0.0.1:{pport}/batches", WINDOW="3s",
                       STABILISATION_DELAY="0s", DRAIN_INTERVAL="1s", SHARDS="4")
            start([os.path.join(bins, "pulse-ingestor")], env=env, name=f"ingestor-{i}")
            replicas.append(port)
        for port in replicas:
            wait_port(port)
        # Prometheus with the shipped rules, scraping both replicas every second.
        shutil.copy(os.path.join(ROOT, "prometheus.rules.yml"), tmp)
        with open(os.path.join(ROOT, "prometheus.yml")) as f:
            cfg = yaml.safe_load(f)
        cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        cfg["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{p}" for p in replicas]}]
        with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
            yaml.safe_dump(cfg, f)
        start(["prometheus", f"--config.file={tmp}/prometheus.yml", f"--storage.tsdb.path={tmp}/tsdb",
               f"--web.listen-address=127.0.0.1:{prom}"], name="prometheus")
        wait_port(prom)
        urls = ",".join(f"http://127.0.0.1:{p}" for p in replicas)
        r = subprocess.run([os.path.join(bins, "pulse-producer"), "--url", urls, "--mode", "rate",
                            "--rate", "300", "--duration", "12s", "--tenants", "200",
                            "--duplicate-ratio", "0.05", "--malformed-ratio", "0.05"],
                           capture_output=True, text=True)
        check(r.returncode == 0, "producer run against two replicas" + ("" if r.returncode == 0 else r.stdout + r.stderr))
        time.sleep(5)  # a window is sealed and delivered, and scraped
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{replicas[0]}/metrics").read()
        r = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True)
        check(r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(),
              "promtool check metrics on a live /metrics prints nothing" + (": " + (r.stdout + r.stderr).decode() if r.stdout or r.stderr else ""))
        api = f"http://127.0.0.1:{prom}/api/v1/query?query="
        up = get_json(api + urllib.parse.quote('sum(up{job="pulse-ingestor"})'))
        check(up["data"]["result"] and float(up["data"]["result"][0]["value"][1]) == 2, "Prometheus scrapes both replicas")
        for p in dash["panels"]:
            for t in p["targets"]:
                res = get_json(api + urllib.parse.quote(t["expr"]))
                check(res["status"] == "success" and len(res["data"]["result"]) > 0,
                      f"panel {p['title']!r}: {t['expr']} returns data")
        with open(os.path.join(ROOT, "prometheus.rules.yml")) as f:
            rules = yaml.safe_load(f)
        for g in rules["groups"]:
            for rule in g["rules"]:
                res = get_json(api + urllib.parse.quote(rule["expr"]))
                check(res["status"] == "success", f"rule {rule['alert']}: expression evaluates")
        rules_api = get_json(f"http://127.0.0.1:{prom}/api/v1/rules")
        health = [r["health"] for g in rules_api["data"]["groups"] for r in g["rules"]]
        check(health and all(h == "ok" for h in health), f"Prometheus evaluates every rule without error: {health}")
        delivered = get_json(api + urllib.parse.quote("sum(ingestor_records_delivered_total)"))
        check(float(delivered["data"]["result"][0]["value"][1]) > 0, "records were delivered during the run")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def main():
    bins = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug")
    promtool_static()
    compose(bins)
    dash = dashboard()
    live(bins, dash)
    if FAILURES:
        print(f"\n{len(FAILURES)} observability check(s) failed")
        return 1
    print("\nobservability checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
