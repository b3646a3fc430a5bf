//! The published contracts, generated from the handlers' annotations (utoipa), so they cannot
//! drift from the code: the ingest API (`GET /openapi.json`, `docs/openapi.json`) and the
//! Processor contract — what we POST and what each answer means
//! (`docs/processor-openapi.json`). `pulse-ingestor openapi [--processor]` prints them.

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// A usage pulse. `use_unit` (or `use_unity`, the earlier service's spelling) is required.
pub struct Pulse;

fn text_field(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        // MAX_FIELD_LEN's default.
        .max_length(Some(256))
        .pattern(Some(r"^[^\u0000-\u001F\u007F-\u009F]+$"))
        .description(Some(description))
}

/// `null` or the given text field (optional fields may be sent as null).
fn nullable(o: ObjectBuilder) -> ObjectBuilder {
    o.schema_type(utoipa::openapi::schema::SchemaType::from_iter([
        Type::String,
        Type::Null,
    ]))
}

impl utoipa::PartialSchema for Pulse {
    fn schema() -> RefOr<Schema> {
        let fields = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("tenant_id", text_field("The tenant billed"))
            .property("product_sku", text_field("The product"))
            .property("used_amount", amount_schema())
            .property("use_unit", nullable(text_field("The unit")))
            .property(
                "use_unity",
                nullable(text_field("Alias of use_unit (the earlier service's spelling); use_unit wins when both are given")),
            )
            .property("pulse_id", pulse_id_schema())
            .required("tenant_id")
            .required("product_sku")
            .required("used_amount")
            .additional_properties(Some(utoipa::openapi::schema::AdditionalProperties::FreeForm(true)))
            .examples([serde_json::json!({"tenant_id": "t-1", "product_sku": "SKU-7", "used_amount": 307.5, "use_unit": "KB", "pulse_id": "evt-123"})]);
        let not_null = |f: &str| {
            ObjectBuilder::new()
                .required(f)
                .property(f, ObjectBuilder::new().schema_type(Type::String))
        };
        let unit = utoipa::openapi::schema::AnyOfBuilder::new()
            .item(not_null("use_unit"))
            .item(not_null("use_unity"));
        utoipa::openapi::schema::AllOfBuilder::new()
            .item(fields)
            .item(unit)
            .description(Some("A usage pulse. A re-send with the same pulse_id (per tenant) within DEDUPE_TTL is recognised and not counted again. Optional `timestamp` (when the usage happened): RFC 3339 with an offset (\"2026-11-30T23:59:59.250Z\", \"...+01:00\") or Unix seconds (integer or decimal), kept to the millisecond; within [now - LATE_MAX_AGE, now + MAX_FUTURE_SKEW] by the Redis clock (with a pulse_id or Idempotency-Key also within DEDUPE_TTL), 422 otherwise; the pulse counts in the window holding it (a window already delivered: an amendment, or 422 with LATE_PULSES=refuse). Absent: the time it reaches Redis. (Described here rather than typed, since whether a value is accepted depends on the time of the request.)"))
            .into()
    }
}

impl ToSchema for Pulse {
    fn name() -> std::borrow::Cow<'static, str> {
        "Pulse".into()
    }
}

/// A batch: 1 to `MAX_BATCH_ITEMS` (default 10,000) pulses, all or nothing.
pub struct Batch;

impl utoipa::PartialSchema for Batch {
    fn schema() -> RefOr<Schema> {
        utoipa::openapi::schema::ArrayBuilder::new()
            .items(RefOr::Ref(utoipa::openapi::Ref::from_schema_name("Pulse")))
            .min_items(Some(1))
            .max_items(Some(10_000))
            .into()
    }
}

impl ToSchema for Batch {
    fn name() -> std::borrow::Cow<'static, str> {
        "Batch".into()
    }
}

/// A partial batch: 1 to `MAX_BATCH_ITEMS` items of any JSON; the valid pulses are counted,
/// the others refused one by one.
pub struct AnyBatch;

impl utoipa::PartialSchema for AnyBatch {
    fn schema() -> RefOr<Schema> {
        utoipa::openapi::schema::ArrayBuilder::new()
            .items(ObjectBuilder::new().schema_type(utoipa::openapi::schema::SchemaType::AnyValue))
            .min_items(Some(1))
            .max_items(Some(10_000))
            .description(Some("Items that are valid pulses (see Pulse) are counted; any other item is refused on its own"))
            .into()
    }
}

impl ToSchema for AnyBatch {
    fn name() -> std::borrow::Cow<'static, str> {
        "AnyBatch".into()
    }
}

fn amount_schema() -> impl Into<RefOr<Schema>> {
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Number)
                .minimum(Some(0.0))
                .maximum(Some(1e15))
                .multiple_of(Some(1e-9)),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(r"^(0|[1-9]\d{0,14})(\.\d{1,9})?$")),
        )
        .description(Some(
            "An exact decimal, at most MAX_AMOUNT (default 10^15) with at most AMOUNT_DECIMALS (default 9) fractional digits: a JSON number (12, 12.50, 1.5e3, 1E-9) or a decimal string (\"12.50\"). Bounds shown are the defaults.",
        ))
}

fn pulse_id_schema() -> impl Into<RefOr<Schema>> {
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(256))
                .pattern(Some(r"^[^\u0000-\u001F\u007F-\u009F]+$")),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0.0))
                .maximum(Some(1e40)),
        )
}

/// The answer to an accepted request.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Accepted {
    /// `committed` (durable: in Redis) or `queued` (`ACK_MODE=enqueued`).
    status: String,
    /// Pulses counted by this request (durable).
    accepted: Option<u64>,
    /// Pulses recognised as re-sends of an id already counted (durable).
    duplicates: Option<u64>,
    /// Start (unix seconds) of the window the pulses were counted in, when it is one window.
    window_start: Option<u64>,
    /// Pulses queued (enqueued).
    pulses: Option<u64>,
    /// Stamped pulses: the windows their timestamps placed them in.
    windows: Option<Vec<u64>>,
    /// Stamped pulses that joined their sealed window before its delivery.
    late: Option<u64>,
    /// Stamped pulses counted in an amendment of a delivered window.
    amended: Option<u64>,
    /// Stamped pulses counted ahead, in a window not yet open.
    ahead: Option<u64>,
    /// `?detail=items` and the partial route: every item, in body order.
    items: Option<Vec<ItemAnswer>>,
}

/// What became of one item of a batch.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ItemAnswer {
    /// Index in the body.
    index: u64,
    /// `counted`, `duplicate` (a re-send of an id already counted) or `refused` (partial
    /// route: not a valid pulse; nothing of it counted).
    status: String,
    /// The window it went to (counted or duplicate).
    window_start: Option<u64>,
    /// Why it was refused.
    errors: Option<Vec<FieldError>>,
}

/// Every error body.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Error {
    /// What went wrong, about the client's input.
    error: String,
    /// More detail (malformed JSON).
    detail: Option<String>,
    /// Each invalid field (422).
    fields: Option<Vec<FieldError>>,
}

/// One invalid field.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct FieldError {
    /// Index in a batch; absent for a single pulse.
    index: Option<u64>,
    field: String,
    message: String,
}

/// A JSON object (operator answers, health).
pub struct Report;

impl utoipa::PartialSchema for Report {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some("A JSON object"))
            .into()
    }
}

impl ToSchema for Report {
    fn name() -> std::borrow::Cow<'static, str> {
        "Report".into()
    }
}

/// A record as the Processor receives it (the first four fields are the earlier service's).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Record {
    tenant_id: String,
    product_sku: String,
    /// The window's exact total for the key, a JSON number in canonical decimal form (no
    /// exponent, no trailing zeros): parse it as a decimal to read it without loss.
    #[schema(value_type = f64, minimum = 0.0)]
    used_amount: String,
    /// The same total as a string.
    #[schema(pattern = r"^\d+(\.\d+)?$")]
    used_amount_text: String,
    use_unit: String,
    /// Stable id of (window, shard, tenant, sku, unit, amendment): a re-delivery carries the
    /// same id. Upsert by it.
    record_id: String,
    /// RFC 3339, UTC.
    #[schema(format = DateTime)]
    window_start: String,
    #[schema(format = DateTime)]
    window_end: String,
    /// `sum`, or a meter's `count`, `max`, `min`, `latest`: each aggregation of a key is a
    /// record of its own.
    aggregation: String,
    /// For `latest`: when its value was measured (RFC 3339, ms); of a key's records for one
    /// window, the one with the latest `latest_at` holds the value.
    #[schema(format = DateTime)]
    latest_at: Option<String>,
    /// Present on an amendment: late pulses of this window counted after its delivery began,
    /// the n-th such record of the key. A window's total for a key is the sum of its records;
    /// book an amendment as an adjustment if the period's invoice is final.
    #[schema(minimum = 1)]
    amends: Option<u32>,
}

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

/// The error answers every `/admin` route shares.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum AdminErrors {
    /// ADMIN_TOKEN is set and the bearer token is missing or wrong
    #[response(status = 401)]
    Unauthorized(Error),
    /// Redis unavailable (or, for replay, a shard is being drained)
    #[response(status = 503, headers(("Retry-After" = u64, description = "Seconds")))]
    Unavailable(Error),
}

/// The refusals of the routes that act on one dead letter.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum DeadLetterErrors {
    /// Not the expected JSON body
    #[response(status = 400)]
    Malformed(Error),
    /// The bearer token is missing or wrong (setting aside: also when ADMIN_TOKEN is not set)
    #[response(status = 401)]
    Unauthorized(Error),
    /// No dead letter with that record_id
    #[response(status = 404)]
    NotFound(Error),
    /// Operator or reason missing or too long
    #[response(status = 422)]
    Invalid(Error),
    /// Redis unavailable, or the shard is being drained
    #[response(status = 503, headers(("Retry-After" = u64, description = "Seconds")))]
    Unavailable(Error),
}

/// The refusals both ingest routes share (their 202 differs).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum IngestErrors {
    /// Not JSON, not the expected shape, duplicate keys
    #[response(status = 400)]
    Malformed(Error),
    /// API keys on: X-API-Key missing or unknown
    #[response(status = 401)]
    NoApiKey(Error),
    /// API keys on: the key may not send for this tenant
    #[response(status = 403)]
    Forbidden(Error),
    /// The request (a body trickling in) took longer than REQUEST_TIMEOUT; nothing was queued
    #[response(status = 408)]
    Timeout,
    /// Body over MAX_BODY_BYTES, batch over MAX_BATCH_ITEMS, or more of a tenant's pulses than its rate limit can ever admit per request
    #[response(status = 413)]
    TooLarge(Error),
    /// Content type not accepted
    #[response(status = 415)]
    UnsupportedMediaType(Error),
    /// A field is missing or invalid (each is named; batch items with their index)
    #[response(status = 422)]
    Invalid(Error),
    /// The tenant is over its rate limit
    #[response(status = 429, headers(("Retry-After" = u64, description = "Seconds")))]
    TooManyRequests(Error),
    /// A bug: the handler panicked (counted; the service keeps running)
    #[response(status = 500)]
    Panicked(Error),
    /// Queue full, Redis unavailable or refusing writes, shutting down, or the commit outlasted REQUEST_TIMEOUT (may have been counted): retry with the same pulse_id or Idempotency-Key
    #[response(status = 503, headers(("Retry-After" = u64, description = "Seconds")))]
    Unavailable(Error),
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
        super::usage::status,
        super::usage::ui,
    ),
    components(schemas(Pulse, Batch, Accepted, Error, FieldError, Report)),
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
    paths(processor_batches),
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

/// A batch of aggregated records.
///
/// Headers: `Content-Type: application/json`, `Idempotency-Key` (derived from the batch's
/// record ids: a re-sent batch carries the same key), `Authorization: Bearer PROCESSOR_TOKEN`
/// when set. Answer 2xx only when the whole batch is stored — also for record ids already held.
#[utoipa::path(
    post, path = "/", tag = "processor",
    params(
        ("Idempotency-Key" = String, Header, description = "The batch's id, stable across re-sends"),
        ("Authorization" = Option<String>, Header, description = "Bearer PROCESSOR_TOKEN, when configured"),
    ),
    request_body(content = Vec<Record>, content_type = "application/json"),
    responses(
        (status = 200, description = "Stored (any 2xx): the records are deleted from Redis"),
        (status = 401, description = "Credentials refused (a token being rotated): retried later, counted in ingestor_processor_auth_failures_total"),
        (status = 403, description = "As 401"),
        (status = 408, description = "Retried with backoff"),
        (status = 409, description = "Permanent refusal, treated as 422. Answer 2xx for a duplicate instead"),
        (status = 422, description = "Permanent refusal of some records. Name them with a Rejected body: those are dead-lettered with your reasons and the rest of the batch is POSTed again as a batch of its own. An unstructured 400/409/422 (or one naming ids not in the batch) is narrowed down by halving the batch, within 64 extra POSTs; both halves refused alike means the whole batch is refused. Any other permanent status (404, 410, 413...) dead-letters the whole batch. Dead letters are kept and replayable record by record", body = Rejected),
        (status = 429, description = "Retried after Retry-After (capped by DELIVERY_MAX_BACKOFF)",
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "Any 5xx (or no answer, or a 3xx, which is never followed): retried with capped exponential backoff; the records stay in Redis"),
    )
)]
#[allow(dead_code)]
fn processor_batches() {}

/// A refusal naming the records it is about (at most 1 MiB of it is read).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct Rejected {
    rejected: Vec<RejectedRecord>,
}

/// One refused record.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct RejectedRecord {
    /// A record_id of the refused batch.
    record_id: String,
    /// Why (any JSON value): kept with the dead letter.
    reason: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_contracts_are_openapi_3_1_and_list_every_route() {
        let api = serde_json::to_value(ApiDoc::openapi()).unwrap();
        assert_eq!(api["openapi"], "3.1.0");
        for p in [
            "/ingest",
            "/ingest/batch",
            "/ingest/batch/partial",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
            "/admin/flush",
            "/admin/pending",
            "/admin/dead-letters",
            "/admin/dead-letters/replay",
            "/admin/dead-letters/set-aside",
            "/admin/rejections",
        ] {
            assert!(api["paths"].get(p).is_some(), "{p} documented");
        }
        let processor = serde_json::to_value(ProcessorDoc::openapi()).unwrap();
        assert!(processor["components"]["schemas"]["Record"].is_object());
    }
}
