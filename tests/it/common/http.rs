//! Talking to the service: the client, pulse bodies, posts, polling, metrics.

use std::time::{Duration, Instant};

use super::{Dec, money};

/// The port of a base URL such as `http://127.0.0.1:1234`.
pub fn port_of(base: &str) -> u16 {
    base.rsplit(':').next().unwrap().parse().unwrap()
}

pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A pulse body. The amount goes on the wire as serde_json writes an `f64` — its shortest
/// decimal text — and [`dec`] gives exactly that decimal for the books.
pub fn pulse(t: &str, s: &str, u: &str, a: f64) -> serde_json::Value {
    serde_json::json!({"tenant_id": t, "product_sku": s, "use_unit": u, "used_amount": a})
}

/// The exact decimal a test amount is sent as (the JSON text of the `f64`).
pub fn dec(a: f64) -> Dec {
    money::parse(&serde_json::to_string(&a).unwrap()).unwrap()
}

/// A pulse whose amount is given as decimal text, sent verbatim as a JSON number.
pub fn pulse_text(t: &str, s: &str, u: &str, amount: &str) -> String {
    format!(
        r#"{{"tenant_id":{},"product_sku":{},"use_unit":{},"used_amount":{amount}}}"#,
        serde_json::to_string(t).unwrap(),
        serde_json::to_string(s).unwrap(),
        serde_json::to_string(u).unwrap()
    )
}

/// POSTs JSON text as it is (amounts written digit for digit, bodies no `Value` can hold) and
/// returns status and body (`Null` when it is not JSON).
pub async fn post_raw(c: &reqwest::Client, url: &str, body: String) -> (u16, serde_json::Value) {
    let r = c
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// POSTs a JSON body to the service and returns status, headers and body.
pub async fn post(
    c: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let r = c.post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, headers, body)
}

/// Polls `f` until it returns true or the timeout passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A metric's value from a replica's `/metrics`: the first sample line starting with `series`
/// (a name, or a name with labels).
pub async fn metric(c: &reqwest::Client, base: &str, series: &str) -> Option<f64> {
    let text = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Sends a request and reads its JSON answer (a test fails on a transport error or a body that
/// is not JSON).
pub trait JsonReply {
    fn json_reply(self) -> impl std::future::Future<Output = serde_json::Value>;
}

impl JsonReply for reqwest::RequestBuilder {
    async fn json_reply(self) -> serde_json::Value {
        self.send().await.unwrap().json().await.unwrap()
    }
}
