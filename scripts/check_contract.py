#!/usr/bin/env python3
"""The published API contracts, checked by tools nobody here wrote.

- docs/openapi.json is what a running instance serves at /openapi.json (that both documents are
  what the binary generates is the Rust test `http::openapi::the_published_contracts_are_current`);
- both are valid OpenAPI (openapi-spec-validator);
- Schemathesis fuzzes a live instance backed by a real redis-server, bounded in examples and
  time, with every check on: no 5xx, every status documented, every response matching its
  schema, valid requests accepted and invalid ones refused (schemathesis.toml).
"""

import json
import os
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pyutil import free_port, wait_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug")
EXAMPLES = os.environ.get("CONTRACT_EXAMPLES", "100")
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


ing = os.path.join(BIN, "pulse-ingestor")
# That docs/*.json are what the code generates is a Rust test (http::openapi); here they are
# validated and served.
docs = ["docs/openapi.json", "docs/processor-openapi.json"]
out = subprocess.run(["openapi-spec-validator"] + [os.path.join(ROOT, p) for p in docs], capture_output=True, text=True)
check(out.returncode == 0, f"openapi-spec-validator: {out.stdout.strip()} {out.stderr.strip()}")

tmp = tempfile.mkdtemp(prefix="pulse-contract-")
procs = []
try:
    rport, port = free_port(), free_port()
    procs.append(subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                   "--dir", tmp], stdout=subprocess.DEVNULL))
    wait_port(rport)
    env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{rport}", LISTEN_ADDR=f"127.0.0.1:{port}",
               RUST_LOG="warn", WINDOW="1h")
    log = open(os.path.join(tmp, "ingestor.log"), "w")
    procs.append(subprocess.Popen([ing], env=env, stdout=log, stderr=log))
    wait_port(port)
    served = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=10).read())
    check(served == json.load(open(os.path.join(ROOT, "docs/openapi.json"))), "GET /openapi.json serves docs/openapi.json")
    st = subprocess.run(["st", "run", os.path.join(ROOT, "docs/openapi.json"), "--url", f"http://127.0.0.1:{port}",
                         "-n", EXAMPLES, "--checks", "all", "--request-timeout", "10", "--max-failures", "10",
                         "--generation-deterministic"],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)
    tail = "\n".join(st.stdout.strip().splitlines()[-12:])
    check(st.returncode == 0, f"Schemathesis ({EXAMPLES} examples per operation):\n{tail}")
    check(procs[-1].poll() is None, "the instance is still running after the fuzzing")
finally:
    for p in reversed(procs):
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
sys.exit(1 if failures else 0)
