#!/usr/bin/env python3
"""Checks deploy/kubernetes offline: every manifest against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields are errors), and against the service itself —
the ConfigMap names only settings `pulse-ingestor --help` lists, the grace period outlasts
SHUTDOWN_TIMEOUT, RATE_LIMIT_REPLICAS equals the replica count, probes use /readyz and /healthz;
the Processor's DATABASE_URL comes from a Secret that ships only the placeholder REPLACE_ME (which
the Processor refuses)."""

import os
import re
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIR = os.path.join(ROOT, "deploy", "kubernetes")
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug")
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def seconds(d):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", d)
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


files = sorted(f for f in os.listdir(DIR) if f.endswith(".yaml") and f != "kustomization.yaml")
out = subprocess.run(["kubernetes-validate", "--strict", "--quiet"] + [os.path.join(DIR, f) for f in files],
                     capture_output=True, text=True)
check(out.returncode == 0, f"kubernetes-validate --strict: {', '.join(files)} {out.stdout}{out.stderr}".strip())
kust = yaml.safe_load(open(os.path.join(DIR, "kustomization.yaml")))
check(sorted(kust["resources"]) == files, "kustomization.yaml lists every manifest")

docs = {}  # the ingestor's objects by kind; the Processor's by kind in `processor`
processor = {}
for f in files:
    for d in yaml.safe_load_all(open(os.path.join(DIR, f))):
        (processor if d["metadata"]["name"] == "pulse-processor" else docs)[d["kind"]] = d
help_text = subprocess.run([os.path.join(BIN, "pulse-ingestor"), "--help"], capture_output=True,
                           text=True, check=True).stdout
settings = set(re.findall(r"^  ([A-Z][A-Z_]+) ", help_text, re.M))
cm = docs["ConfigMap"]["data"]
unknown = sorted(k for k in cm if k not in settings)
check(not unknown, f"ConfigMap names only real settings (unknown: {unknown})")
dep = docs["Deployment"]["spec"]
pod = dep["template"]["spec"]
grace = pod["terminationGracePeriodSeconds"]
check(grace > seconds(cm.get("SHUTDOWN_TIMEOUT", "30s")),
      f"terminationGracePeriodSeconds {grace} > SHUTDOWN_TIMEOUT {cm.get('SHUTDOWN_TIMEOUT')}")
check(int(cm.get("RATE_LIMIT_REPLICAS", "1")) == dep["replicas"],
      "RATE_LIMIT_REPLICAS equals replicas")
c = pod["containers"][0]
check(c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz",
      "readiness on /readyz, liveness on /healthz")
check(pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"],
      "non-root, read-only root filesystem")
secret_keys = set(docs["Secret"]["stringData"])
refs = {e["valueFrom"]["secretKeyRef"]["key"] for e in c.get("env", []) if "valueFrom" in e}
check(refs <= secret_keys and {"ADMIN_TOKEN", "PROCESSOR_TOKEN"} <= refs, "tokens come from the Secret")
check(docs["PodDisruptionBudget"]["spec"]["selector"] == dep["selector"], "PDB selects the Deployment's pods")
metrics_port = cm["METRICS_ADDR"].rsplit(":", 1)[1]
check(dep["template"]["metadata"]["annotations"]["prometheus.io/port"] == metrics_port,
      "the scrape annotation points at METRICS_ADDR")

ppod = processor["Deployment"]["spec"]["template"]["spec"]
pc = ppod["containers"][0]
check(pc["readinessProbe"]["httpGet"]["path"] == "/readyz" and pc["livenessProbe"]["httpGet"]["path"] == "/healthz",
      "Processor: readiness on /readyz (the database answers), liveness on /healthz")
db_ref = [e["valueFrom"]["secretKeyRef"] for e in pc["env"] if e["name"] == "DATABASE_URL"]
check(db_ref == [{"name": "pulse-processor", "key": "DATABASE_URL"}], "Processor: DATABASE_URL comes from its Secret")
check("REPLACE_ME" in processor["Secret"]["stringData"]["DATABASE_URL"],
      "Processor: the Secret ships the placeholder password only")
check(ppod["securityContext"]["runAsNonRoot"] and pc["securityContext"]["readOnlyRootFilesystem"],
      "Processor: non-root, read-only root filesystem")
check(cm["PROCESSOR_URL"].startswith(f"http://{processor['Service']['metadata']['name']}:"),
      "the ingestor delivers to the Processor's Service")
sys.exit(1 if failures else 0)
