//! Whether delivery works, as this replica last saw it: is a Processor configured, when did
//! it last accept a batch, what did the last failure say, and does its URL look wrong (a 404
//! or 405, a DNS or TLS failure: the endpoint, not the records). `/v1/status`, `/readyz` and
//! the page show it; the delivery (`flush/deliver.rs`) and the start-up check of the URL
//! write it.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// What this replica knows of delivery to the Processor.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct DeliverySnapshot {
    /// `PROCESSOR_URL` is set; unset, sealed windows stay in Redis.
    pub configured: bool,
    /// The Processor URL, without credentials.
    pub url: Option<String>,
    /// When the Processor last accepted a batch (Unix seconds, this replica's clock).
    pub last_success: Option<u64>,
    /// When a request to it last failed, and why.
    pub last_failure: Option<u64>,
    pub last_error: Option<String>,
    /// Set while the URL looks wrong (404/405, DNS, TLS): nothing is delivered until it is
    /// fixed; the records wait in Redis. Cleared by the next success.
    pub endpoint_problem: Option<String>,
}

/// Shared by the delivery and the HTTP layer.
#[derive(Debug, Default)]
pub struct DeliveryHealth(Mutex<DeliverySnapshot>);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The URL without user or password, for display.
pub fn display_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

impl DeliveryHealth {
    /// Health of deliveries to `url`.
    pub fn new(url: &str) -> Self {
        DeliveryHealth(Mutex::new(DeliverySnapshot {
            configured: true,
            url: Some(display_url(url)),
            ..Default::default()
        }))
    }

    fn update(&self, f: impl FnOnce(&mut DeliverySnapshot)) {
        if let Ok(mut s) = self.0.lock() {
            f(&mut s);
        }
    }

    /// The Processor accepted a batch (any answer at all also shows the endpoint works).
    pub fn succeeded(&self) {
        self.update(|s| {
            s.last_success = Some(now());
            s.endpoint_problem = None;
        });
    }

    /// A request failed (retryable or refused).
    pub fn failed(&self, error: &str) {
        self.update(|s| {
            s.last_failure = Some(now());
            s.last_error = Some(error.chars().take(300).collect());
        });
    }

    /// The endpoint looks wrong.
    pub fn endpoint_wrong(&self, why: &str) {
        self.failed(why);
        self.update(|s| s.endpoint_problem = Some(why.chars().take(300).collect()));
    }

    pub fn snapshot(&self) -> DeliverySnapshot {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_clears_an_endpoint_problem_and_credentials_are_never_shown() {
        let h = DeliveryHealth::new("https://user:secret@billing.example/batches");
        h.endpoint_wrong("404");
        assert_eq!(h.snapshot().endpoint_problem.as_deref(), Some("404"));
        h.succeeded();
        let s = h.snapshot();
        assert!(s.endpoint_problem.is_none() && s.last_success.is_some());
        assert_eq!(s.url.as_deref(), Some("https://billing.example/batches"));
    }
}
