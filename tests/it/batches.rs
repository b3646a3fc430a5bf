//! Per-item batch answers: `?detail=items` says what became of every item; the partial route
//! counts the valid items together and refuses the others one by one; `Idempotency-Key`
//! retries stay exact in both.

use crate::common::*;
use serde_json::json;

async fn send(
    c: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let mut r = c
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        r = r.header("idempotency-key", k);
    }
    let r = r.send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or_default())
}

fn statuses(r: &serde_json::Value) -> Vec<(u64, String)> {
    r["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["index"].as_u64().unwrap(),
                i["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_item_of_a_batch_is_accounted_for() {
    let redis = RedisServer::start();
    let a = TestApp::spawn(settings(&redis, &[])).await;
    let b = TestApp::spawn(settings(&redis, &[])).await;
    let c = http();
    // All or nothing, with detail: counted and re-sent items, with their window.
    let body = json!([
        {"tenant_id": "t", "product_sku": "S", "use_unit": "u", "used_amount": 1, "pulse_id": "p1"},
        {"tenant_id": "t", "product_sku": "S", "use_unit": "u", "used_amount": 2},
    ])
    .to_string();
    let (s, r) = send(
        &c,
        &format!("{}/ingest/batch?detail=items", a.base),
        None,
        &body,
    )
    .await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(
        statuses(&r),
        vec![(0, "counted".into()), (1, "counted".into())]
    );
    assert!(r["items"][0]["window_start"].as_u64().unwrap() > 0);
    let (s, r) = send(
        &c,
        &format!("{}/ingest/batch?detail=items", b.base),
        None,
        &body,
    )
    .await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(
        statuses(&r),
        vec![(0, "duplicate".into()), (1, "counted".into())]
    );
    let (s, r) = send(
        &c,
        &format!("{}/ingest/batch?detail=everything", a.base),
        None,
        &body,
    )
    .await;
    assert_eq!(
        (s, &r["fields"][0]["field"]),
        (422, &json!("detail")),
        "{r}"
    );
    // Partial: invalid items refused one by one, a duplicate recognised, the valid counted.
    let mixed = json!([
        {"tenant_id": "t", "product_sku": "S", "use_unit": "u", "used_amount": 4, "pulse_id": "p1"},
        {"tenant_id": "", "product_sku": "S", "use_unit": "u", "used_amount": 8},
        {"tenant_id": "t", "product_sku": "S", "use_unit": "u", "used_amount": 16},
        "not a pulse",
        {"tenant_id": "t", "product_sku": "S", "use_unit": "u", "used_amount": -1},
        {"tenant_id": "t", "product_sku": "S", "use_unit": "u", "used_amount": 32, "timestamp": "1999-01-01T00:00:00Z"},
        {"tenant_id": "t", "product_sku": "S", "use_unit": "u", "used_amount": 64},
    ])
    .to_string();
    let url = |app: &TestApp| format!("{}/ingest/batch/partial", app.base);
    let (s, r) = send(&c, &url(&a), Some("upload-9"), &mixed).await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(
        statuses(&r),
        vec![
            (0, "duplicate".into()),
            (1, "refused".into()),
            (2, "counted".into()),
            (3, "refused".into()),
            (4, "refused".into()),
            (5, "refused".into()),
            (6, "counted".into()),
        ]
    );
    assert_eq!(r["items"][1]["errors"][0]["field"], "tenant_id", "{r}");
    assert_eq!(r["items"][5]["errors"][0]["field"], "timestamp", "{r}");
    assert_eq!((&r["accepted"], &r["duplicates"]), (&json!(2), &json!(1)));
    // The same upload retried on the other replica: exact (ids derive from the key and index).
    let (s, r) = send(&c, &url(&b), Some("upload-9"), &mixed).await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(
        (&r["accepted"], &r["duplicates"]),
        (&json!(0), &json!(3)),
        "{r}"
    );
    // Nothing valid: nothing counted, every item refused with its problems.
    let (s, r) = send(&c, &url(&a), None, r#"[{"tenant_id":""}, 7]"#).await;
    assert_eq!((s, &r["accepted"]), (202, &json!(0)), "{r}");
    assert_eq!(
        statuses(&r),
        vec![(0, "refused".into()), (1, "refused".into())]
    );
    // Not a batch at all is still a 400.
    let (s, _) = send(&c, &url(&a), None, "{").await;
    assert_eq!(s, 400);
    assert_eq!(
        redis.totals("pulses")[&("t".into(), "S".into(), "u".into())],
        dec(1.0 + 2.0 + 2.0 + 16.0 + 64.0)
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
