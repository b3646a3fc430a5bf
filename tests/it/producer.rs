//! The producer end to end: duplicates and malformed input against two real replicas, sealed
//! and delivered to the reference Processor, and `verify` — which passes when the books balance
//! and names what is missing, extra or off when they do not.

use std::time::Duration;

use crate::common::*;
use pulse_producer::processor::Faults;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_when_the_books_balance_and_names_every_difference() {
    let redis = RedisServer::start();
    let (_p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut v = settings(&redis, &[("WINDOW", "2s"), ("SHARDS", "4")]);
    v.insert("PROCESSOR_URL".into(), format!("{purl}/batches"));
    let a = Ingestor::spawn(&v, dir.path(), "a").await;
    let b = Ingestor::spawn(&v, dir.path(), "b").await;
    let ledger = dir.path().join("ledger.json");
    let ledger_s = ledger.to_str().unwrap();
    let report_path = dir.path().join("report.json");
    let report_s = report_path.to_str().unwrap();
    let (code, out) = producer(&[
        "--url",
        &format!("{},{}", a.base, b.base),
        "--mode",
        "max",
        "--concurrency",
        "8",
        "--count",
        "3000",
        "--duration",
        "30s",
        "--tenants",
        "200",
        "--duplicate-ratio",
        "0.1",
        "--malformed-ratio",
        "0.05",
        "--ledger",
        ledger_s,
        "--report-json",
        report_s,
    ])
    .await;
    assert_eq!(code, 0, "no malformed body was accepted: {out}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["malformed_accepted"], 0, "{report}");
    assert!(
        report["status_4xx"]["422"].as_u64() > Some(0)
            && report["status_4xx"]["400"].as_u64() > Some(0),
        "malformed bodies got 4xx: {report}"
    );
    // The last window ends and is delivered.
    let c = http();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ok = eventually(Duration::from_secs(20), || async {
        pending(&a.base).await["pending_windows"] == 0
            && producer(&["verify", "--ledger", ledger_s, "--processor", &purl])
                .await
                .0
                == 0
    })
    .await;
    let (code, out) = producer(&["verify", "--ledger", ledger_s, "--processor", &purl]).await;
    assert!(ok && code == 0, "books balance: {out}");
    assert!(out.contains("books balance"), "{out}");

    // Take one key away from the Processor: verify fails and names it.
    let l: serde_json::Value = serde_json::from_slice(&std::fs::read(&ledger).unwrap()).unwrap();
    let gone = l["totals"][0].clone();
    let r: serde_json::Value = c
        .post(format!("{purl}/admin/remove"))
        .json(&gone)
        .json_reply()
        .await;
    assert!(r["removed"].as_u64().unwrap() >= 1);
    // An extra key nobody sent, and a second record that puts another key off.
    let off = l["totals"][1].clone();
    let extra = json!([
        {"record_id": "extra-1", "tenant_id": "nobody", "product_sku": "X", "use_unit": "KB", "used_amount": 1.0,
         "window_start": "2026-01-01T00:00:00Z", "window_end": "2026-01-01T01:00:00Z"},
        {"record_id": "off-1", "tenant_id": off["tenant_id"], "product_sku": off["product_sku"], "use_unit": off["use_unit"],
         "used_amount": 0.5, "window_start": "2026-01-01T00:00:00Z", "window_end": "2026-01-01T01:00:00Z"}
    ]);
    let s = c
        .post(format!("{purl}/batches"))
        .header("idempotency-key", "test")
        .json(&extra)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s, 200);
    let (code, out) = producer(&["verify", "--ledger", ledger_s, "--processor", &purl]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("do NOT balance"), "{out}");
    let name = |k: &serde_json::Value| {
        format!(
            "({}, {}, {})",
            k["tenant_id"], k["product_sku"], k["use_unit"]
        )
    };
    assert!(
        out.contains(&format!("missing {}", name(&gone))),
        "names the missing key: {out}"
    );
    assert!(
        out.contains("extra   (\"nobody\", \"X\", \"KB\")"),
        "names the extra key: {out}"
    );
    assert!(
        out.contains(&format!("off     {}", name(&off))),
        "names the key that is off: {out}"
    );
}

/// `verify --ingestor` checks the books against what the service still holds (its live usage
/// API), before anything is delivered — how the benchmarks check them without reading Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_against_the_live_usage_api_balances_and_sees_a_pulse_nobody_recorded() {
    let app = TestApp::start(&[("SHARDS", "4"), ("WINDOW", "2s")]).await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.json");
    let ledger_s = ledger.to_str().unwrap();
    let (code, out) = producer(&[
        "--url",
        &app.base,
        "--mode",
        "max",
        "--count",
        "1500",
        "--tenants",
        "50",
        "--amounts",
        "fine",
        "--ledger",
        ledger_s,
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    // Some windows are sealed by now (2 s each) and none delivered (no Processor): all count.
    let args = ["verify", "--ledger", ledger_s, "--ingestor", &app.base];
    let verify_usage = || producer(&args);
    let (code, out) = verify_usage().await;
    assert_eq!(code, 0, "books balance against the live usage: {out}");
    assert!(out.contains("books balance"), "{out}");
    // A pulse the ledger never saw, for a tenant it knows.
    let l: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ledger).unwrap()).unwrap();
    let t = &l["totals"][0];
    let body = pulse_text(
        t["tenant_id"].as_str().unwrap(),
        t["product_sku"].as_str().unwrap(),
        t["use_unit"].as_str().unwrap(),
        "0.000000001",
    );
    let r = app
        .client
        .post(format!("{}/ingest", app.base))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let (code, out) = verify_usage().await;
    assert_eq!(code, 1, "a nanounit off is off: {out}");
    assert!(out.contains("off     "), "{out}");
    app.stop().await.unwrap();
}
