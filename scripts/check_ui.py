#!/usr/bin/env python3
"""The /ui page in a real browser (headless Chromium driven by Selenium): against a running
instance with real Redis, real pulses and the reference Processor, the page shows the window in
force, whether delivery and Redis work, the pending windows (an amendment not yet due says
"waiting"), a tenant's exact usage — a dead-lettered tenant's amount too — and the dead letters
with their aggregation and the Processor's reason, paged; its Replay button asks first, then
replays them; its charts (ingest rate, backlog, a tenant's usage per window, one chart per unit)
are drawn with a time axis, checked in the element screenshots. No JavaScript console errors.
Screenshots are kept in target/ui-test/."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pyutil import free_port, wait_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug")
OUT = os.path.join(ROOT, "target", "ui-test")
os.makedirs(OUT, exist_ok=True)
procs = []


def start(args, env=None, log=None):
    p = subprocess.Popen(args, env=env, stdout=log or subprocess.DEVNULL, stderr=log or subprocess.DEVNULL)
    procs.append(p)
    return p


def req(method, url, body=None, token=None):
    r = urllib.request.Request(url, data=body, method=method)
    r.add_header("content-type", "application/json")
    if token:
        r.add_header("authorization", "Bearer " + token)
    with urllib.request.urlopen(r, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def pulse(base, tenant, sku, amount):
    body = '{"tenant_id":%s,"product_sku":"%s","use_unit":"KB","used_amount":%s}' % (json.dumps(tenant), sku, amount)
    req("POST", base + "/ingest", body.encode())


def until(what, f, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            v = f()
            if v:
                return v
        except Exception:  # noqa: BLE001 - retried until the deadline
            pass
        time.sleep(0.3)
    raise SystemExit(f"FAIL {what}")


tmp = tempfile.mkdtemp(prefix="pulse-ui-")
driver = None
try:
    rport, port, pport = free_port(), free_port(), free_port()
    start(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--dir", tmp])
    wait_port(rport)
    processor = start([os.path.join(BIN, "pulse-processor"), "--listen", f"127.0.0.1:{pport}",
                       "--reject-tenant", "bad"])
    wait_port(pport)
    env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{rport}", LISTEN_ADDR=f"127.0.0.1:{port}",
               WINDOW="2s", STABILISATION_DELAY="0s", DRAIN_INTERVAL="300ms", ADMIN_TOKEN="adm",
               PROCESSOR_URL=f"http://127.0.0.1:{pport}/batches", RUST_LOG="warn")
    start([os.path.join(BIN, "pulse-ingestor")], env=env, log=open(os.path.join(tmp, "ingestor.log"), "w"))
    wait_port(port)
    base = f"http://127.0.0.1:{port}"
    # A window with a tenant the Processor refuses: dead letters, more than a page of them.
    pulse(base, "bad", "SKU-9", "7.5")
    for i in range(11):
        pulse(base, "bad", f"SKU-{10 + i}", "1")
    until("dead letters", lambda: len(req("GET", base + "/admin/dead-letters", token="adm")["records"]) == 12)
    # The Processor is fixed (restarted without the rejection) before the replay.
    processor.send_signal(signal.SIGTERM)
    processor.wait(10)
    start([os.path.join(BIN, "pulse-processor"), "--listen", f"127.0.0.1:{pport}", "--fail-status", "503",
           "--fail-first", "1000000"])
    wait_port(pport)
    # Live usage of a tenant with tricky characters, in the current window, exact.
    tenant = 'ui "tenant" | 東京'
    for amount in ("0.1", "0.2", "1234.567890123"):
        pulse(base, tenant, "SKU-1", amount)
    # Another unit: a chart of its own.
    body = '{"tenant_id":%s,"product_sku":"SKU-2","use_unit":"GB","used_amount":3}' % json.dumps(tenant)
    req("POST", base + "/ingest", body.encode())

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,2600"):
        opts.add_argument(a)
    opts.binary_location = "/usr/bin/chromium"
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"), options=opts)
    # The admin token is entered before the page's first call (kept in the tab's sessionStorage).
    driver.get(base + "/healthz")
    driver.execute_script("sessionStorage.setItem('admin-token', 'adm')")
    driver.get_log("browser")  # what that JSON page logged (its favicon) is not the page's
    driver.get(base + "/ui")
    wait = WebDriverWait(driver, 20)
    text = lambda i: driver.find_element(By.ID, i).text
    wait.until(lambda d: "Z" in text("window"))
    status = req("GET", base + "/v1/status")
    print("ok   window", text("window"), "sealed in", text("seal-in"), "queue", text("queue"))
    assert text("seal-in").endswith(" s"), text("seal-in")
    assert text("window").endswith("· 2 s"), text("window")
    # Delivery (the Processor answers 503 now) and Redis health are shown.
    wait.until(lambda d: text("delivery") == "failing" and "status_5xx" in text("delivery-detail"))
    print("ok   delivery:", text("delivery"), "|", text("delivery-detail"))
    wait.until(lambda d: text("redis") == "ready")
    print("ok   redis:", text("redis"))
    wait.until(lambda d: "pulses/s" in text("rate"))
    print("ok   ingest rate", text("rate"))
    # Pending: the window sealed from the pulses above waits for a Processor that fails (503).
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pending tbody tr")) > 0)
    pending = req("GET", base + "/admin/pending", token="adm")
    print("ok   pending windows on the page:", text("pending").replace("\n", " | "))
    assert str(pending["windows"][0]["records"]) in text("pending")
    # Dead letters with their exact amount, aggregation and the Processor's reason, paged.
    wait.until(lambda d: "bad" in text("dead") and "1–10 of 12" in text("dead-pager"))
    dead_text = text("dead")
    assert "tenant bad is not billable" in dead_text and "422" in dead_text and " sum " in dead_text, dead_text
    print("ok   dead letters:", dead_text.replace("\n", " | "))
    assert len(driver.find_elements(By.CSS_SELECTOR, "#dead tbody tr")) == 10
    assert "1–10 of 12" in text("dead-pager"), text("dead-pager")
    driver.find_element(By.CSS_SELECTOR, "#dead-pager .next").click()
    wait.until(lambda d: "11–12 of 12" in text("dead-pager"))
    assert len(driver.find_elements(By.CSS_SELECTOR, "#dead tbody tr")) == 2
    assert "7.5" in dead_text + text("dead"), "the exact amount of the 7.5 KB dead letter"
    driver.find_element(By.CSS_SELECTOR, "#dead-pager .prev").click()
    wait.until(lambda d: "1–10 of 12" in text("dead-pager"))
    print("ok   dead letters paged:", text("dead-pager"))
    # A pending part before its due time is waiting (as /v1/usage says), not "due".
    now = status["redis_time"]
    state = driver.execute_script("return pendingState({due: arguments[0] + 518400}, arguments[0], null)", now)
    assert state.startswith("waiting"), state
    print("ok   an amendment due later:", state)
    # A dead-lettered tenant's usage is its dead-lettered amount, not 0 / nothing yet.
    driver.find_element(By.ID, "tenant").send_keys("bad")
    driver.find_element(By.ID, "lookup").click()
    # Read in one script call: the page redraws every 2 s, so elements held across calls go stale.
    bars_of = lambda d: d.execute_script("return [...document.querySelectorAll('.usage-chart rect')].map(r => +r.dataset.value)")
    wait.until(lambda d: 7.5 in bars_of(d))
    rows = driver.execute_script("return [...document.querySelectorAll('#usage tbody tr')].map(tr => [...tr.cells].map(c => c.textContent))")
    assert rows and all(r[1] == "dead-lettered" and r[6] in ("1", "7.5") for r in rows), rows
    assert "of 12" in text("usage-pager"), text("usage-pager")
    assert "nothing yet" not in text("usage-charts")
    print("ok   dead-lettered usage:", text("usage").replace("\n", " | ")[:200])
    driver.save_screenshot(os.path.join(OUT, "ui-dead-lettered-tenant.png"))
    driver.find_element(By.ID, "usage-charts").screenshot(os.path.join(OUT, "usage-dead-lettered-tenant.png"))
    driver.find_element(By.ID, "tenant").clear()
    # Tenant lookup: exact sums of the live (or just sealed) window.
    driver.find_element(By.ID, "tenant").send_keys(tenant)
    driver.find_element(By.ID, "lookup").click()
    wait.until(lambda d: "1234.867890123" in text("usage"))
    print("ok   usage:", text("usage").replace("\n", " | "))
    driver.save_screenshot(os.path.join(OUT, "ui.png"))
    driver.find_element(By.ID, "usage-charts").screenshot(os.path.join(OUT, "usage-charts.png"))
    # The charts are drawn, and visibly so: the rate line, the backlog bars, the usage bars
    # (one per key and window), each element's screenshot holding its colour.
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#rate-chart polyline"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#backlog-chart rect"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".usage-chart")) == 2)
    units = sorted(driver.execute_script("return [...document.querySelectorAll('.usage-chart')].map(c => c.dataset.unit)"))
    assert units == ["GB", "KB"], units
    values = driver.execute_script("return [...document.querySelectorAll(\".usage-chart[data-unit='KB'] rect\")].map(r => +r.dataset.value)")
    assert any(abs(v - 1234.867890123) < 1e-6 for v in values), values
    # Every chart: a time axis with ticks, and its one unit.
    charts = driver.execute_script("""return [...document.querySelectorAll('svg.chart')].map(s => ({
        id: s.id || s.dataset.unit, unit: (s.querySelector('text.unit') || {}).textContent,
        ticks: [...s.querySelectorAll('text.tick')].map(t => t.textContent)}))""")
    for c in charts:
        assert c["unit"] and c["ticks"] and all(re.fullmatch(r"\d\d:\d\d:\d\d( \+\d+)?", t) for t in c["ticks"]), c
        print(f"ok   chart {c['id']} in {c['unit']}, time axis {c['ticks']}")
    series = driver.execute_script("return [...Array(40).keys()].map(colour)")
    assert len(set(series)) == 40, "colours repeat"
    for chart, colour in (("rate-chart", (0x3b, 0x7d, 0xd8)), ("backlog-chart", (0x3b, 0x7d, 0xd8)),
                          ("usage-chart", (0x3b, 0x7d, 0xd8))):
        path = os.path.join(OUT, chart + ".png")
        css = "#" + chart if chart != "usage-chart" else ".usage-chart[data-unit='KB']"
        driver.find_element(By.CSS_SELECTOR, css).screenshot(path)
        with Image.open(path) as img:
            raw = img.convert("RGB").tobytes()
        px = (raw[i:i + 3] for i in range(0, len(raw), 3))
        drawn = sum(1 for p in px if all(abs(a - b) < 40 for a, b in zip(p, colour)))
        assert drawn > 30, f"{chart}: only {drawn} pixels of the chart colour in {path}"
        print(f"ok   {chart} drawn ({drawn} coloured pixels, {path})")
    # Replay asks first: cancelled, nothing moves.
    driver.find_element(By.ID, "replay").click()
    wait.until(lambda d: d.find_element(By.ID, "replay-confirm").is_displayed())
    assert "12 dead-lettered records" in text("replay-question"), text("replay-question")
    driver.save_screenshot(os.path.join(OUT, "ui-replay-confirm.png"))
    driver.find_element(By.ID, "replay-no").click()
    time.sleep(1)
    assert len(req("GET", base + "/admin/dead-letters", token="adm")["records"]) == 12
    print("ok   replay asks first; cancelled, nothing replayed")
    # Confirmed: the dead letters go back for delivery.
    driver.find_element(By.ID, "replay").click()
    wait.until(lambda d: d.find_element(By.ID, "replay-confirm").is_displayed())
    driver.find_element(By.ID, "replay-yes").click()
    wait.until(lambda d: "replayed 12 records" in text("replay-result"))
    until("dead letters replayed", lambda: not req("GET", base + "/admin/dead-letters", token="adm")["records"])
    wait.until(lambda d: "bad" not in text("dead"))
    print("ok   replay:", text("replay-result"))
    driver.save_screenshot(os.path.join(OUT, "ui-after-replay.png"))
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    print("ok   no console errors; screenshots in", OUT)
    assert status["window_end"] - status["window_start"] == 2
finally:
    if driver:
        driver.quit()
    for p in reversed(procs):
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
