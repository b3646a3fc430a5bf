//! The request bodies' schemas in the published contract: a [`Pulse`] as clients send it, and
//! the two batch bodies. Bounds are the settings' defaults (`MAX_FIELD_LEN`, `MAX_AMOUNT`,
//! `AMOUNT_DECIMALS`, `MAX_BATCH_ITEMS`), read from their one declaration.

use utoipa::openapi::schema::{
    AdditionalProperties, AllOfBuilder, AnyOfBuilder, ArrayBuilder, ObjectBuilder, OneOfBuilder,
    Schema, SchemaType, Type,
};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use super::Pulse;
use crate::config::env;

/// A setting's default as a number (they are digits).
fn default_of(s: crate::config::Setting) -> u64 {
    s.default
        .parse()
        .expect("a numeric setting's default is digits")
}

/// Text without control characters, `MAX_FIELD_LEN` at most.
fn text(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(default_of(env::MAX_FIELD_LEN) as usize))
        .pattern(Some(r"^[^\u0000-\u001F\u007F-\u009F]+$"))
        .description(Some(description))
}

/// `null` or the given text field (optional fields may be sent as null).
fn nullable(o: ObjectBuilder) -> ObjectBuilder {
    o.schema_type(SchemaType::from_iter([Type::String, Type::Null]))
}

fn amount() -> OneOfBuilder {
    let max = default_of(env::MAX_AMOUNT);
    let decimals = default_of(env::AMOUNT_DECIMALS);
    let int_digits = max.to_string().len() - 1;
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Number)
                .minimum(Some(0.0))
                .maximum(Some(max as f64))
                .multiple_of(Some(10f64.powi(-(decimals as i32)))),
        )
        .item(ObjectBuilder::new().schema_type(Type::String).pattern(Some(format!(
            r"^(0|[1-9]\d{{0,{}}})(\.\d{{1,{decimals}}})?$",
            int_digits - 1
        ))))
        .description(Some(format!(
            "An exact decimal, at most MAX_AMOUNT (default 10^{int_digits}) with at most AMOUNT_DECIMALS (default {decimals}) fractional digits: a JSON number (12, 12.50, 1.5e3, 1E-9) or a decimal string (\"12.50\"). Bounds shown are the defaults."
        )))
}

fn pulse_id() -> OneOfBuilder {
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .item(text("").description(None::<String>))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0.0))
                .maximum(Some(1e40)),
        )
}

const TIMESTAMP: &str = "Optional `timestamp` (when the usage happened): RFC 3339 with an offset (\"2026-11-30T23:59:59.250Z\", \"...+01:00\") or Unix seconds (integer or decimal), kept to the millisecond; within [now - LATE_MAX_AGE, now + MAX_FUTURE_SKEW] by the Redis clock (with a pulse_id or Idempotency-Key also within DEDUPE_TTL), 422 otherwise; the pulse counts in the window holding it (a window already delivered: an amendment, or 422 with LATE_PULSES=refuse). Absent: the time it reaches Redis. (Described here rather than typed, since whether a value is accepted depends on the time of the request.)";

/// A usage pulse as clients send it. `use_unit` (or `use_unity`, the earlier service's
/// spelling) is required.
impl PartialSchema for Pulse {
    fn schema() -> RefOr<Schema> {
        let fields = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("tenant_id", text("The tenant billed"))
            .property("product_sku", text("The product"))
            .property("used_amount", amount())
            .property("use_unit", nullable(text("The unit")))
            .property(
                "use_unity",
                nullable(text("Alias of use_unit (the earlier service's spelling); use_unit wins when both are given")),
            )
            .property("pulse_id", pulse_id())
            .required("tenant_id")
            .required("product_sku")
            .required("used_amount")
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .examples([serde_json::json!({"tenant_id": "t-1", "product_sku": "SKU-7", "used_amount": 307.5, "use_unit": "KB", "pulse_id": "evt-123"})]);
        let not_null = |f: &str| {
            ObjectBuilder::new()
                .required(f)
                .property(f, ObjectBuilder::new().schema_type(Type::String))
        };
        AllOfBuilder::new()
            .item(fields)
            .item(
                AnyOfBuilder::new()
                    .item(not_null("use_unit"))
                    .item(not_null("use_unity")),
            )
            .description(Some(format!("A usage pulse. A re-send with the same pulse_id (per tenant) within DEDUPE_TTL is recognised and not counted again. {TIMESTAMP}")))
            .into()
    }
}

impl ToSchema for Pulse {}

/// 1 to `MAX_BATCH_ITEMS` items.
fn items(of: impl Into<utoipa::openapi::schema::ArrayItems>) -> ArrayBuilder {
    ArrayBuilder::new()
        .items(of)
        .min_items(Some(1))
        .max_items(Some(default_of(env::MAX_BATCH_ITEMS) as usize))
}

/// A batch body: 1 to `MAX_BATCH_ITEMS` (default 10,000) pulses, all or nothing.
pub struct Batch;

impl PartialSchema for Batch {
    fn schema() -> RefOr<Schema> {
        items(RefOr::Ref(Ref::from_schema_name("Pulse"))).into()
    }
}

impl ToSchema for Batch {}

/// A partial batch body: 1 to `MAX_BATCH_ITEMS` items of any JSON; the valid pulses are
/// counted, the others refused one by one.
pub struct AnyBatch;

impl PartialSchema for AnyBatch {
    fn schema() -> RefOr<Schema> {
        items(ObjectBuilder::new().schema_type(SchemaType::AnyValue))
            .description(Some("Items that are valid pulses (see Pulse) are counted; any other item is refused on its own"))
            .into()
    }
}

impl ToSchema for AnyBatch {}
