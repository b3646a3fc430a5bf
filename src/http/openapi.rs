//! The published contracts, generated from the handlers' annotations (utoipa), so they cannot
//! drift from the code: the ingest API (`GET /openapi.json`, `docs/openapi.json`) and the
//! Processor contract — what we POST and what each answer means
//! (`docs/processor-openapi.json`). `pulse-ingestor openapi [--processor]` prints them.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::Report;
use super::error::ErrorBody;
use super::ingest::Accepted;
use crate::flush::policy::{Rejected, RejectedRecord};
use crate::processor::Record;
use crate::pulse::{Batch, FieldError, Pulse};

struct Security;

impl Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// The ingest API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "pulse-ingestor",
        description = "Usage pulses in; one exact aggregated record per (tenant, SKU, unit) and window out to the billing Processor. A 2xx means counted exactly once. 503 always carries Retry-After; retry with the same pulse_id or Idempotency-Key.",
        license(name = "MIT")
    ),
    paths(
        super::ingest::one,
        super::ingest::batch,
        super::ingest::partial,
        super::health::healthz,
        super::health::readyz,
        super::health::metrics,
        super::admin::flush,
        super::admin::pending,
        super::admin::dead_letters,
        super::admin::replay,
        super::admin::set_aside,
        super::admin::set_aside_log,
        super::admin::rejections,
        openapi_json,
        super::usage::usage,
        super::status::status,
        super::usage::ui,
    ),
    components(schemas(Pulse, Batch, Accepted, ErrorBody, FieldError, Report)),
    modifiers(&Security),
    tags(
        (name = "ingest", description = "Sending pulses"),
        (name = "operations", description = "Health, metrics and the contract"),
        (name = "usage", description = "Live usage and the page (GET /ui)"),
        (name = "admin", description = "Operators (Authorization: Bearer ADMIN_TOKEN when it is set)"),
    )
)]
pub struct ApiDoc;

/// The Processor contract: what pulse-ingestor POSTs to `PROCESSOR_URL`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "pulse-ingestor Processor contract",
        description = "What pulse-ingestor POSTs to PROCESSOR_URL, and what each answer means. Delivery is at-least-once; upsert by record_id and it is exactly-once. Redirects are never followed.",
        license(name = "MIT")
    ),
    paths(crate::flush::policy::classify),
    components(schemas(Record, Rejected, RejectedRecord))
)]
pub struct ProcessorDoc;

/// The contract of this API.
#[utoipa::path(
    get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document", content_type = "application/json", body = Report))
)]
pub async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented paths are exactly the routes the router serves.
    #[test]
    fn the_contract_lists_every_route_the_router_serves() {
        let api = serde_json::to_value(ApiDoc::openapi()).unwrap();
        assert_eq!(api["openapi"], "3.1.0");
        let documented: std::collections::BTreeSet<String> =
            api["paths"].as_object().unwrap().keys().cloned().collect();
        let served: std::collections::BTreeSet<String> = super::super::api_routes()
            .into_iter()
            .chain(super::super::admin_routes())
            .map(|(path, _)| path.to_string())
            .chain(["/metrics".to_string()])
            .collect();
        assert_eq!(documented, served);
        let processor = serde_json::to_value(ProcessorDoc::openapi()).unwrap();
        assert!(processor["components"]["schemas"]["Record"].is_object());
    }

    /// Every length and item bound the contract states for pulses and tenants is the setting's
    /// default (the schemas take them from the settings; a bound typed into a parameter's
    /// attribute is held to it). Operator routes have bounds of their own.
    #[test]
    fn the_contract_states_the_settings_defaults_as_bounds() {
        fn walk(v: &serde_json::Value, key: &str, found: &mut Vec<u64>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, x) in m {
                        if k == key {
                            found.extend(x.as_u64());
                        }
                        walk(x, key, found);
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, key, found)),
                _ => {}
            }
        }
        let mut api = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = api["paths"].as_object_mut().unwrap();
        paths.retain(|p, _| !p.starts_with("/admin"));
        let schemas = api["components"]["schemas"].as_object_mut().unwrap();
        schemas.retain(|name, _| name != "SetAside");
        let default = |s: crate::config::Setting| s.default.parse::<u64>().unwrap();
        for (key, setting) in [
            ("maxLength", crate::config::env::MAX_FIELD_LEN),
            ("maxItems", crate::config::env::MAX_BATCH_ITEMS),
        ] {
            let mut found = Vec::new();
            walk(&api, key, &mut found);
            assert!(!found.is_empty(), "{key} is stated");
            assert!(
                found.iter().all(|&n| n == default(setting)),
                "{key}: {found:?}, default {}",
                setting.default
            );
        }
    }

    /// `docs/*.json` are what the code generates (regenerate with `pulse-ingestor openapi
    /// [--processor] > docs/...`).
    #[test]
    fn the_published_contracts_are_current() {
        for (path, doc) in [
            ("docs/openapi.json", ApiDoc::openapi()),
            ("docs/processor-openapi.json", ProcessorDoc::openapi()),
        ] {
            let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
            let committed: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            let generated = serde_json::to_value(&doc).unwrap();
            assert!(
                committed == generated,
                "{path} is stale: regenerate it with `pulse-ingestor openapi{} > {path}`",
                if path.contains("processor") {
                    " --processor"
                } else {
                    ""
                }
            );
        }
    }
}
