#!/usr/bin/env python3
"""Checks what ships offline: every Kubernetes manifest against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields are errors), and against the service itself —
the ConfigMap names only settings `pulse-ingestor --help` lists, the grace period outlasts
SHUTDOWN_TIMEOUT, RATE_LIMIT_REPLICAS equals the replica count, probes use /readyz and /healthz,
the Secret's placeholders are refused by the binary (no credential works out of the box); the
Processor's DATABASE_URL comes from a Secret that ships only the placeholder REPLACE_ME (which the
Processor refuses).
Then the Dockerfile (no Docker engine here): its build context, as its COPY lines make it, is a
valid locked workspace, and its own `cargo build` command builds every binary it copies. And
the first-hour traps: example.env, Compose and the ConfigMap change no setting the deployment
records, .env never overrides the command line, the README's demo runs a deployment of its own."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIR = os.path.join(ROOT, "deploy", "kubernetes")
BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug"))
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
# Settings the deployment records in Redis: setting one explicitly changes the deployment.
RECORDED = {"SHARDS", "WINDOW", "WINDOW_OFFSET", "DEDUPE_TTL", "LATE_MAX_AGE", "MAX_FUTURE_SKEW",
            "LATE_PULSES"}


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run_ingestor(env):
    """Runs the binary in an empty directory (no .env) with only `env`; (exit code, stderr)."""
    with tempfile.TemporaryDirectory() as d:
        base = {"PATH": os.environ.get("PATH", ""), "LISTEN_ADDR": "127.0.0.1:0",
                "REDIS_URL": f"redis://127.0.0.1:{closed_port()}", "REDIS_TIMEOUT": "200ms"}
        try:
            p = subprocess.run([os.path.join(BIN, "pulse-ingestor")], env=dict(base, **env), cwd=d,
                               capture_output=True, text=True, timeout=20)
            return p.returncode, p.stderr + p.stdout
        except subprocess.TimeoutExpired:
            return None, "still running after 20 s: it started"


def secret_placeholders_are_refused(secret):
    for name in ("ADMIN_TOKEN", "PROCESSOR_TOKEN"):
        code, err = run_ingestor({name: secret[name]})
        check(code == 64 and "placeholder" in err, f"the Secret's {name} is refused at start (exit {code}): {err.strip()[-200:]}")
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as f:
        f.write(secret["api-keys"])
    try:
        code, err = run_ingestor({"API_KEYS_FILE": f.name})
    finally:
        os.unlink(f.name)
    check(code == 64 and "placeholder" in err, f"the Secret's api-keys are refused at start (exit {code}): {err.strip()[-200:]}")


def dockerfile_steps(text):
    """The Dockerfile's instructions, continuation lines joined."""
    text = re.sub(r"\\\n", " ", text)
    return [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]


def build_context(steps, into):
    """Copies what the build stage's COPY lines copy into `into`; returns the missing sources."""
    missing = []
    for st in steps:
        if st.startswith("FROM") and "AS build" not in st:
            break
        if not st.startswith("COPY ") or "--from" in st:
            continue
        *srcs, dest = shlex.split(st)[1:]
        for src in srcs:
            path = os.path.join(ROOT, src)
            if not os.path.exists(path):
                missing.append(src)
            elif os.path.isdir(path):
                shutil.copytree(path, os.path.join(into, dest.rstrip("/") if dest not in ("./", ".") else src),
                                ignore=shutil.ignore_patterns("target", ".data"))
            else:
                shutil.copy(path, os.path.join(into, os.path.basename(src)))
    return missing


def bins_built(cmd, meta):
    """The binaries `cargo build <args>` builds in the workspace `meta` (cargo metadata)."""
    args = shlex.split(cmd)
    members = set(meta["workspace_members"])
    pkgs = [p for p in meta["packages"] if p["id"] in members]
    if "--workspace" in args or "--all" in args:
        chosen = pkgs
    elif "-p" in args or "--package" in args:
        names = {args[i + 1] for i, a in enumerate(args) if a in ("-p", "--package")}
        chosen = [p for p in pkgs if p["name"] in names]
    else:
        default = set(meta.get("workspace_default_members") or members)
        chosen = [p for p in pkgs if p["id"] in default]
    bins = {t["name"] for p in chosen for t in p["targets"] if "bin" in t["kind"]}
    if "--bins" in args:
        return bins
    named = {args[i + 1] for i, a in enumerate(args) if a == "--bin"}
    return bins & named if named else bins


def dockerfile_builds_what_it_copies():
    steps = dockerfile_steps(open(os.path.join(ROOT, "Dockerfile")).read())
    run = next(s for s in steps if s.startswith("RUN cargo build"))
    cargo_cmd = run[len("RUN "):].split("&&")[0].strip()
    copied = re.findall(r"target/release/([A-Za-z0-9_-]+)", run)
    with tempfile.TemporaryDirectory() as ctx:
        missing = build_context(steps, ctx)
        check(not missing, f"every file the Dockerfile copies exists (missing: {missing})")
        # The image is Linux: crates of other platforms need not be at hand to resolve.
        out = subprocess.run(["cargo", "metadata", "--format-version", "1", "--offline", "--locked",
                              "--filter-platform", "x86_64-unknown-linux-gnu"],
                             cwd=ctx, capture_output=True, text=True)
        check(out.returncode == 0, f"the Dockerfile's build context is a valid, locked workspace {out.stderr[-300:]}")
        if out.returncode != 0:
            return
        meta = json.loads(out.stdout)
        built = bins_built(cargo_cmd, meta)
    every_bin = bins_built("cargo build --workspace --bins", meta)
    manual = "".join(open(os.path.join(ROOT, p)).read() for p in
                     ["README.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")])
    undocumented = sorted(b for b in every_bin if f"`{b}`" not in manual)
    check(not undocumented, f"every binary the workspace builds is documented ({undocumented})")
    check(copied and set(copied) <= built,
          f"`{cargo_cmd}` builds every binary the Dockerfile copies ({copied}; it builds {sorted(built)})")
    final = [s for s in steps if s.startswith("COPY --from=build")]
    shipped = {os.path.basename(p) for s in final for p in shlex.split(s)[2:-1]}
    check(shipped and shipped <= set(copied), f"the image ships what the build stage installed ({sorted(shipped)})")


def env_file(path):
    """NAME=value lines that are set (not commented out)."""
    out = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v
    return out


def no_recorded_setting_is_changed_out_of_the_box(cm):
    example = env_file(os.path.join(ROOT, "example.env"))
    check(not RECORDED & set(example), f"example.env sets no recorded setting ({sorted(RECORDED & set(example))})")
    check("REDIS_URL" not in example,
          "example.env leaves REDIS_URL unset (a copied .env must not stop run_ingestor.sh starting its Redis)")
    check(not RECORDED & set(cm), f"the ConfigMap sets no recorded setting ({sorted(RECORDED & set(cm))})")
    compose = yaml.safe_load(open(os.path.join(ROOT, "docker-compose.yml")))
    for name, svc in compose["services"].items():
        if "ingestor" in name:
            env = set(svc.get("environment") or {})
            check(not RECORDED & env, f"compose {name} sets no recorded setting ({sorted(RECORDED & env)})")


def env_file_never_overrides_the_command_line():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, ".env")
        with open(path, "w") as f:
            f.write("WINDOW=1h\nKEY_PREFIX=from-env-file\n# SHARDS=3\n")
        out = subprocess.run(["bash", "-c", f'. "{ROOT}/scripts/lib.sh"; load_env_file "{path}"; '
                              'echo "$WINDOW $KEY_PREFIX ${SHARDS:-unset}"'],
                             env=dict(os.environ, WINDOW="10s"), capture_output=True, text=True)
        check(out.stdout.split() == ["10s", "from-env-file", "unset"],
              f"run_ingestor.sh's .env fills in only what the environment leaves unset ({out.stdout.strip()} {out.stderr.strip()})")
    script = open(os.path.join(ROOT, "scripts", "run_ingestor.sh")).read()
    check("load_env_file .env" in script and not re.search(r"^\s*(\.|source)\s+\.?/?\.env", script, re.M),
          "run_ingestor.sh reads .env with load_env_file, never by sourcing it over the environment")


def readme_demo_runs_a_deployment_of_its_own():
    """The quick start records 1 h windows in the local Redis; the demo that follows on the same
    machine must not inherit them (a WINDOW change waits for the running window's end)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    code = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))
    runs = re.findall(r"^(.*scripts/run_ingestor\.sh.*)$", code, re.M)
    demo = [r for r in runs if "WINDOW=" in r]
    check(bool(demo), f"the README has a demo that sets WINDOW ({runs})")
    for r in demo:
        own = re.search(r"KEY_PREFIX=(\S+)", r) or re.search(r"LOCAL_REDIS_PORT=(\S+)", r)
        check(own is not None and own.group(1) not in ("pulses", "6379"),
              f"the README's demo runs a deployment of its own (KEY_PREFIX or LOCAL_REDIS_PORT): {r.strip()}")


def python_tools_stay_out_of_the_system_python():
    """scripts/*.sh install Python packages only into the repository's virtual environment."""
    for f in sorted(os.listdir(os.path.join(ROOT, "scripts"))):
        if f.endswith(".sh"):
            text = open(os.path.join(ROOT, "scripts", f)).read()
            bad = re.findall(r"^.*(?:python3 -m pip|^\s*pip3? install).*$", text, re.M)
            check(not bad, f"{f} installs no Python package into the system Python ({bad})")
    test_sh = open(os.path.join(ROOT, "scripts", "test.sh")).read()
    check("-m venv" in test_sh and not re.search(r"^[^#]*\bpython3 scripts/", test_sh, re.M),
          "test.sh makes a virtual environment and runs every python check from it")


def slug(heading):
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


def docs_links_resolve():
    """The README is a newcomer's page linking the manual in docs/: every relative link (and
    its #anchor) of the README and docs/*.md lands somewhere."""
    def anchors(path):
        text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
        return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.*)$", text, re.M)}
    pages = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs"))) if f.endswith(".md")]
    bad = []
    for page in pages:
        for m in re.finditer(r"\]\(([^)\s]+)\)", open(os.path.join(ROOT, page)).read()):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
            if not os.path.exists(full) or (anchor and full.endswith(".md") and anchor not in anchors(full)):
                bad.append(f"{page}: {target}")
    check(not bad, f"every link of the README and docs/ resolves ({bad})")
    readme = open(os.path.join(ROOT, "README.md")).read()
    check(len(readme.splitlines()) < 200, f"the README is a newcomer's page ({len(readme.splitlines())} lines)")


secret_placeholders_are_refused(docs["Secret"]["stringData"])
docs_links_resolve()
python_tools_stay_out_of_the_system_python()
dockerfile_builds_what_it_copies()
no_recorded_setting_is_changed_out_of_the_box(cm)
env_file_never_overrides_the_command_line()
readme_demo_runs_a_deployment_of_its_own()
sys.exit(1 if failures else 0)
