//! Compressed request bodies and the producer's output, end to end.

use std::io::Write;

use crate::common::*;

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

async fn send(
    c: &reqwest::Client,
    url: &str,
    encoding: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let r = c
        .post(url)
        .header("content-type", "application/json")
        .header("content-encoding", encoding)
        .body(body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_and_zstd_bodies_count_and_a_bomb_is_refused_unallocated() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(settings(&redis, &[("MAX_BODY_BYTES", "1048576")])).await;
    let c = http();
    let batch = serde_json::to_vec(&serde_json::json!([
        pulse("t", "s", "KB", 1.5),
        pulse("t", "s", "KB", 2.5)
    ]))
    .unwrap();
    let (s, b) = send(
        &c,
        &format!("{}/ingest/batch", app.base),
        "gzip",
        gzip(&batch),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    let one = serde_json::to_vec(&pulse("t", "s", "KB", 4.0)).unwrap();
    let (s, b) = send(
        &c,
        &format!("{}/ingest", app.base),
        "zstd",
        zstd::bulk::compress(&one, 3).unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(
        redis.totals("pulses")[&("t".into(), "s".into(), "KB".into())],
        dec(8.0)
    );
    // 64 MiB of spaces inside an array compress to ~64 KiB: refused for its decompressed size.
    let mut bomb = b"[".to_vec();
    bomb.extend(std::iter::repeat_n(b' ', 64 << 20));
    bomb.push(b']');
    let small = gzip(&bomb);
    assert!(small.len() < 200_000);
    // The service answers 413 as soon as the decompressed size passes the limit and does not
    // read the rest: on a busy machine the client may see the connection reset while it is
    // still sending, before it reads the answer. A client retries such a transport error; one
    // of a few attempts gets the 413 itself.
    let mut refused = None;
    for _ in 0..5 {
        let r = c
            .post(format!("{}/ingest/batch", app.base))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(small.clone())
            .send()
            .await;
        if let Ok(r) = r {
            let close = r
                .headers()
                .get("connection")
                .and_then(|v| v.to_str().ok())
                .map(str::to_ascii_lowercase);
            refused = Some((r.status().as_u16(), close));
            break;
        }
    }
    // The rest of that body was never read: the connection is closed, and said to be, so the
    // client does not send its next request down it.
    assert_eq!(refused, Some((413, Some("close".to_string()))));
    // Every spelling the check accepts is decoded: x-gzip is gzip (RFC 9110), codings are
    // case-insensitive, identity is none — each counts, none is a bodiless 415.
    for (enc, body) in [
        ("x-gzip", gzip(&one)),
        ("GZIP", gzip(&one)),
        ("Zstd", zstd::bulk::compress(&one, 3).unwrap()),
        ("identity", one.clone()),
    ] {
        let (s, b) = send(&c, &format!("{}/ingest", app.base), enc, body).await;
        assert_eq!(s, 202, "{enc}: {b}");
    }
    assert_eq!(
        redis.totals("pulses")[&("t".into(), "s".into(), "KB".into())],
        dec(24.0)
    );
    // An encoding we do not take is named.
    let (s, b) = send(&c, &format!("{}/ingest", app.base), "br", one.clone()).await;
    assert_eq!(s, 415);
    assert!(b["error"].as_str().unwrap().contains("\"br\""), "{b}");
    // A corrupt stream is malformed input, not a server error.
    let (s, _) = send(
        &c,
        &format!("{}/ingest", app.base),
        "gzip",
        b"not gzip at all".to_vec(),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(
        redis.totals("pulses")[&("t".into(), "s".into(), "KB".into())],
        dec(24.0)
    );
    app.stop().await.unwrap();
}

/// The producer compresses on request, and writes no progress-bar control characters when its
/// output is a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_compresses_and_prints_plain_lines_to_a_file() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(settings(&redis, &[])).await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.json");
    let out = dir.path().join("out.txt");
    let file = std::fs::File::create(&out).unwrap();
    let status = producer_command(&[
        "--url",
        &app.base,
        "--mode",
        "rate",
        "--rate",
        "200",
        "--duration",
        "6s",
        "--batch",
        "10",
        "--compress",
        "zstd",
        "--ids",
        "--ledger",
        ledger.to_str().unwrap(),
    ])
    .stdout(file.try_clone().unwrap())
    .stderr(file)
    .status()
    .await
    .unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(status.success(), "{text}");
    assert!(
        !text.contains('\r') && !text.contains('\u{1b}'),
        "control characters in: {text:?}"
    );
    assert!(
        text.contains("requests") && text.contains("p99"),
        "progress lines: {text}"
    );
    let l: serde_json::Value = serde_json::from_slice(&std::fs::read(&ledger).unwrap()).unwrap();
    assert!(l["pulses"].as_u64().unwrap() > 0);
    let sent: Dec = l["totals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| money::parse(&k["used_amount"].to_string()).unwrap())
        .sum();
    let found: Dec = redis.totals("pulses").values().sum();
    assert_eq!(sent, found, "compressed batches counted exactly");
    app.stop().await.unwrap();
}
