//! The pulse: request decoding and validation. Where a pulse is stored (its field, shard,
//! dedupe digest and record id) is the key layout's business: `store::keys`.
//! Nothing in this module does I/O; everything is unit- and property-tested.

use serde::Deserialize;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::amount::Amount;

mod batch;
mod schema;
#[cfg(test)]
use batch::derived_id;
pub use schema::{AnyBatch, Batch};

/// A validated usage pulse.
#[derive(Debug, Clone, PartialEq)]
pub struct Pulse {
    pub tenant_id: String,
    pub product_sku: String,
    pub use_unit: String,
    /// Exact amount (invariant 11): never a binary float.
    pub used_amount: Amount,
    /// Client-chosen id; a pulse sent again with the same id (per tenant) is counted once.
    pub pulse_id: Option<String>,
    /// When the usage happened (`timestamp`), Unix milliseconds; absent: when it reaches Redis.
    pub timestamp_ms: Option<i64>,
}

/// Decodes and validates request bodies into pulses, within the limits of the configuration
/// (`MAX_FIELD_LEN`, `MAX_AMOUNT`, `AMOUNT_DECIMALS`, `ALLOWED_UNITS`).
#[derive(Debug, Clone)]
pub struct Decoder {
    pub max_field_len: usize,
    pub max_amount: Amount,
    /// Significant fractional digits accepted (`AMOUNT_DECIMALS`); more is a 422, never rounded.
    pub decimals: u32,
    pub allowed_units: Option<Vec<String>>,
}

/// How a batch body is written: a JSON array, or NDJSON (one object per line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Json,
    Ndjson,
}

/// One invalid field (of one pulse, or of the request).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// Index in a batch; absent for a single pulse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub field: String,
    pub message: String,
}

/// Why a body could not be turned into pulses.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// Not JSON, or not the expected shape (400).
    Malformed(String),
    /// JSON, but fields are missing or invalid (422).
    Invalid(Vec<FieldError>),
    /// More items than allowed in a batch (413).
    TooManyItems { max: usize },
}

/// The wire form. Fields are kept loose so that every problem is reported with its field name,
/// instead of serde's first error without one.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    tenant_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    product_sku: Option<&'a RawValue>,
    #[serde(borrow, default)]
    used_amount: Option<&'a RawValue>,
    #[serde(borrow, default)]
    use_unit: Option<&'a RawValue>,
    /// The earlier service's README spelling.
    #[serde(borrow, default)]
    use_unity: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pulse_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    timestamp: Option<&'a RawValue>,
}

impl Decoder {
    fn string(
        &self,
        raw: Option<&RawValue>,
        field: &str,
        required: bool,
        errs: &mut Vec<FieldError>,
    ) -> Option<String> {
        let mut fail = |m: &str| {
            errs.push(FieldError {
                index: None,
                field: field.to_string(),
                message: m.to_string(),
            })
        };
        let raw = match raw {
            None => {
                if required {
                    fail("is required");
                }
                return None;
            }
            Some(r) => r,
        };
        let text = raw.get();
        let s: String = if text.starts_with('"') {
            match serde_json::from_str(text) {
                Ok(s) => s,
                Err(_) => {
                    fail("must be a valid string");
                    return None;
                }
            }
        } else if let Some(id) = (field == "pulse_id").then(|| integer_text(text)).flatten() {
            // Numeric ids are common in clients; they name the same pulse as their decimal
            // text, whatever the JSON form (`258`, `258.0` and `2.58e2` are one id).
            id
        } else if text == "null" && !required {
            return None;
        } else {
            fail("must be a string");
            return None;
        };
        if s.is_empty() {
            fail("must not be empty");
            return None;
        }
        if s.chars().count() > self.max_field_len {
            fail(&format!(
                "must be at most {} characters",
                self.max_field_len
            ));
            return None;
        }
        if s.chars().any(char::is_control) {
            fail("must not contain control characters");
            return None;
        }
        Some(s)
    }

    fn amount(&self, raw: Option<&RawValue>, errs: &mut Vec<FieldError>) -> Option<Amount> {
        let Some(raw) = raw else {
            errs.push(FieldError {
                index: None,
                field: "used_amount".into(),
                message: "is required".into(),
            });
            return None;
        };
        match Amount::parse_json(raw.get(), self.decimals, self.max_amount) {
            Ok(a) => Some(a),
            Err(e) => {
                errs.push(FieldError {
                    index: None,
                    field: "used_amount".into(),
                    message: e.to_string(),
                });
                None
            }
        }
    }

    /// A `timestamp`: RFC 3339 with an offset (`"2026-11-30T23:59:59.250Z"`, `"…+01:00"`) or
    /// Unix seconds (integer or decimal, as a number or a string), kept to the millisecond
    /// (finer digits are truncated). `null` is absent.
    fn timestamp(&self, raw: Option<&RawValue>, errs: &mut Vec<FieldError>) -> Option<i64> {
        let raw = raw.filter(|r| r.get() != "null")?;
        match parse_timestamp(raw.get()) {
            Some(ms) => Some(ms),
            None => {
                errs.push(FieldError {
                    index: None,
                    field: "timestamp".into(),
                    message:
                        "must be RFC 3339 with an offset (2026-11-30T23:59:59.250Z) or Unix seconds"
                            .into(),
                });
                None
            }
        }
    }

    /// Validates one decoded wire pulse; `header_id` is an `Idempotency-Key` to use as its id.
    fn validate<'a>(
        &self,
        w: &Wire<'a>,
        header_id: Option<&str>,
    ) -> Result<Pulse, Vec<FieldError>> {
        let mut errs = Vec::new();
        let tenant_id = self.string(w.tenant_id, "tenant_id", true, &mut errs);
        let product_sku = self.string(w.product_sku, "product_sku", true, &mut errs);
        // `null` is the same as absent for the optional unit spellings.
        let present = |r: Option<&'a RawValue>| r.filter(|r| r.get() != "null");
        let (unit_raw, unit_name) = match (present(w.use_unit), present(w.use_unity)) {
            (Some(u), Some(alias)) => {
                // use_unit wins, but the alias must still be a valid unit (found by
                // Schemathesis: an alias with control characters used to pass unseen).
                self.string(Some(alias), "use_unity", false, &mut errs);
                (Some(u), "use_unit")
            }
            (Some(u), None) => (Some(u), "use_unit"),
            (None, Some(u)) => (Some(u), "use_unity"),
            (None, None) => (None, "use_unit"),
        };
        let use_unit = self.string(unit_raw, unit_name, true, &mut errs);
        let used_amount = self.amount(w.used_amount, &mut errs);
        let mut pulse_id = self.string(w.pulse_id, "pulse_id", false, &mut errs);
        let timestamp_ms = self.timestamp(w.timestamp, &mut errs);
        if let (Some(unit), Some(allowed)) = (&use_unit, &self.allowed_units)
            && !allowed.iter().any(|a| a == unit)
        {
            errs.push(FieldError {
                index: None,
                field: unit_name.into(),
                message: format!("must be one of: {}", allowed.join(", ")),
            });
        }
        if pulse_id.is_none() {
            pulse_id = header_id.map(str::to_string);
        }
        match (tenant_id, product_sku, use_unit, used_amount) {
            (Some(tenant_id), Some(product_sku), Some(use_unit), Some(used_amount))
                if errs.is_empty() =>
            {
                Ok(Pulse {
                    tenant_id,
                    product_sku,
                    use_unit,
                    used_amount,
                    pulse_id,
                    timestamp_ms,
                })
            }
            _ => Err(errs),
        }
    }

    /// Checks an `Idempotency-Key` header value like a pulse id.
    pub fn idempotency_key(&self, key: &str) -> Result<(), FieldError> {
        let bad = |m: &str| FieldError {
            index: None,
            field: "Idempotency-Key".into(),
            message: m.into(),
        };
        if key.is_empty() {
            return Err(bad("must not be empty"));
        }
        if key.len() > self.max_field_len {
            return Err(bad("is too long"));
        }
        if key.chars().any(char::is_control) {
            return Err(bad("must not contain control characters"));
        }
        Ok(())
    }

    /// Decodes and validates a single-pulse body.
    pub fn decode_one(
        &self,
        body: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<Pulse, DecodeError> {
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(DecodeError::Malformed("expected a JSON object".into()));
        }
        let wire: Wire<'_> = serde_json::from_slice(body).map_err(|e| malformed(&e))?;
        self.validate(&wire, idempotency_key)
            .map_err(DecodeError::Invalid)
    }
}

/// RFC 3339 text as Unix milliseconds. A leap second (`23:59:60`, which RFC 3339 allows) is the
/// last millisecond of its minute (`23:59:59.999`), whatever fraction follows it.
fn rfc3339_ms(s: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    // "YYYY-MM-DDTHH:MM:60…": seconds at bytes 17..19.
    let leap = s.len() > 19 && s.get(16..19) == Some(":60");
    let t = if leap {
        let rest = s.get(19..)?;
        let zone = rest.trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
        if rest.starts_with('.') && !rest[1..].starts_with(|c: char| c.is_ascii_digit()) {
            return None;
        }
        let text = format!("{}59.999{zone}", s.get(..17)?);
        time::OffsetDateTime::parse(&text, &Rfc3339).ok()?
    } else {
        time::OffsetDateTime::parse(s, &Rfc3339).ok()?
    };
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok()
}

/// A timestamp's JSON text as Unix milliseconds (see [`Decoder::timestamp`]); `None` when it is
/// neither form, negative, or past the year 9999.
pub fn parse_timestamp(text: &str) -> Option<i64> {
    const MAX_MS: i64 = 253_402_300_799_999;
    let s: std::borrow::Cow<'_, str> = if text.starts_with('"') {
        std::borrow::Cow::Owned(serde_json::from_str::<String>(text).ok()?)
    } else {
        std::borrow::Cow::Borrowed(text)
    };
    let s = s.trim();
    if s.len() > 64 {
        return None;
    }
    let ms = if s.contains('T') || s.contains('t') {
        rfc3339_ms(s)?
    } else {
        // Unix seconds: digits, an optional fraction; exact (no float), truncated to the ms.
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        if int.is_empty()
            || int.len() > 12
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
            || (s.contains('.') && frac.is_empty())
        {
            return None;
        }
        let ms_frac: String = frac.chars().chain("000".chars()).take(3).collect();
        int.parse::<i64>().ok()? * 1000 + ms_frac.parse::<i64>().ok()?
    };
    (0..=MAX_MS).contains(&ms).then_some(ms)
}

/// The decimal text of a JSON number that is an integer from 0 to 10^40 (`258.0` → `258`), as
/// the published contract says numeric pulse ids are.
fn integer_text(text: &str) -> Option<String> {
    if !text.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let max = format!("1{}", "0".repeat(40));
    crate::amount::canonical(text)
        .filter(|t| t.bytes().all(|b| b.is_ascii_digit()) && (t.len() <= 40 || *t == max))
}

pub(super) fn clean(e: &serde_json::Error) -> String {
    e.to_string()
}

pub(super) fn malformed(e: &serde_json::Error) -> DecodeError {
    DecodeError::Malformed(clean(e))
}

#[cfg(test)]
mod tests;
