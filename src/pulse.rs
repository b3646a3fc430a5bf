//! The pulse: request decoding and validation. Where a pulse is stored (its field, shard,
//! dedupe digest and record id) is the key layout's business: `store::keys`.
//! Nothing in this module does I/O; everything is unit- and property-tested.

use serde::Deserialize;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::amount::Amount;

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
}

/// Limits that validation enforces, taken from the configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_field_len: usize,
    pub max_amount: Amount,
    /// Significant fractional digits accepted (`AMOUNT_DECIMALS`); more is a 422, never rounded.
    pub decimals: u32,
    pub allowed_units: Option<Vec<String>>,
}

/// One problem with one field of one pulse.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
}

impl Limits {
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

    /// Decodes and validates a batch: a JSON array, or NDJSON (one object per line). The batch
    /// is all or nothing: every bad item is listed with its index. With an `Idempotency-Key`,
    /// item `i` without its own id gets an id derived from the key and `i` ([`derived_id`]),
    /// so a retried batch counts once.
    pub fn decode_batch(
        &self,
        body: &[u8],
        ndjson: bool,
        idempotency_key: Option<&str>,
        max_items: usize,
    ) -> Result<Vec<Pulse>, DecodeError> {
        let items: Vec<&RawValue> = if ndjson {
            let mut v = Vec::new();
            for (i, line) in body.split(|&b| b == b'\n').enumerate() {
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                if v.len() == max_items {
                    return Err(DecodeError::TooManyItems { max: max_items });
                }
                let item: &RawValue = serde_json::from_slice(line).map_err(|e| {
                    DecodeError::Malformed(format!("line {}: {}", i + 1, clean(&e)))
                })?;
                v.push(item);
            }
            v
        } else {
            // Stop at the cap while parsing: a huge array is refused without holding it.
            let mut de = serde_json::Deserializer::from_slice(body);
            let v = serde::de::DeserializeSeed::deserialize(CappedSeq(max_items), &mut de)
                .map_err(|e| {
                    if e.to_string().starts_with(TOO_MANY) {
                        DecodeError::TooManyItems { max: max_items }
                    } else {
                        malformed(&e)
                    }
                })?;
            de.end().map_err(|e| malformed(&e))?;
            v
        };
        if items.is_empty() {
            return Err(DecodeError::Invalid(vec![FieldError {
                index: None,
                field: "body".into(),
                message: "batch must contain at least one pulse".into(),
            }]));
        }
        let mut pulses = Vec::with_capacity(items.len());
        let mut errors = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let not_object = |m: String| FieldError {
                index: Some(i),
                field: "item".into(),
                message: m,
            };
            if !item.get().starts_with('{') {
                errors.push(not_object("must be a JSON object".into()));
                continue;
            }
            let w: Wire<'_> = match serde_json::from_str(item.get()) {
                Ok(w) => w,
                Err(e) => {
                    errors.push(not_object(clean(&e)));
                    continue;
                }
            };
            let item_key = idempotency_key.map(|k| derived_id(k, i));
            match self.validate(&w, item_key.as_deref()) {
                Ok(p) => pulses.push(p),
                Err(errs) => errors.extend(errs.into_iter().map(|e| FieldError {
                    index: Some(i),
                    ..e
                })),
            }
        }
        if errors.is_empty() {
            Ok(pulses)
        } else {
            Err(DecodeError::Invalid(errors))
        }
    }
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

/// The id of item `i` of a batch sent with `Idempotency-Key: key`. A NUL separates them: ids
/// and keys refuse control characters, so a derived id can never equal a literal `pulse_id`
/// (`key#0` could) nor another key's derived id.
pub fn derived_id(key: &str, i: usize) -> String {
    format!("{key}\u{0}{i}")
}

const TOO_MANY: &str = "too many items";

/// A JSON array of raw items that fails as soon as it holds more than `.0` items.
struct CappedSeq(usize);

impl<'de> serde::de::DeserializeSeed<'de> for CappedSeq {
    type Value = Vec<&'de RawValue>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for CappedSeq {
    type Value = Vec<&'de RawValue>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array of pulses")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut v = Vec::with_capacity(self.0.min(1024));
        while let Some(item) = seq.next_element::<&'de RawValue>()? {
            if v.len() == self.0 {
                return Err(serde::de::Error::custom(TOO_MANY));
            }
            v.push(item);
        }
        Ok(v)
    }
}

fn clean(e: &serde_json::Error) -> String {
    e.to_string()
}

fn malformed(e: &serde_json::Error) -> DecodeError {
    DecodeError::Malformed(clean(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits {
            max_field_len: 64,
            max_amount: Amount::parse_decimal("1e15", 12, Amount::from_units(u128::MAX)).unwrap(),
            decimals: 9,
            allowed_units: None,
        }
    }

    fn invalid(body: &str) -> Vec<FieldError> {
        match limits().decode_one(body.as_bytes(), None) {
            Err(DecodeError::Invalid(e)) => e,
            other => panic!("expected Invalid for {body}, got {other:?}"),
        }
    }

    #[test]
    fn a_good_pulse_decodes() {
        let p = limits()
            .decode_one(
                br#"{"tenant_id":"t-1","product_sku":"SKU-7","used_amount":307.5,"use_unit":"KB"}"#,
                None,
            )
            .unwrap();
        assert_eq!(p.tenant_id, "t-1");
        assert_eq!(p.used_amount.to_string(), "307.5");
        assert_eq!(p.pulse_id, None);
    }

    #[test]
    fn use_unity_is_an_alias() {
        let p = limits()
            .decode_one(
                br#"{"tenant_id":"t","product_sku":"s","used_amount":1,"use_unity":"MB"}"#,
                None,
            )
            .unwrap();
        assert_eq!(p.use_unit, "MB");
    }

    #[test]
    fn each_bad_field_is_named() {
        let e = invalid(r#"{"tenant_id":"","product_sku":5,"used_amount":-1}"#);
        let fields: Vec<_> = e.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["tenant_id", "product_sku", "use_unit", "used_amount"]
        );
        assert!(e[3].message.contains("negative"));
    }

    #[test]
    fn amounts_out_of_range_are_refused() {
        let base = |a: &str| {
            format!(r#"{{"tenant_id":"t","product_sku":"s","use_unit":"u","used_amount":{a}}}"#)
        };
        assert!(invalid(&base("1e400"))[0].message.contains("at most"));
        assert!(invalid(&base("2e15"))[0].message.contains("at most"));
        assert!(
            invalid(&base("0.0000000001"))[0]
                .message
                .contains("9 fractional digits")
        );
        assert!(invalid(&base("\"12x\""))[0].message.contains("number"));
        assert!(invalid(&base("\"NaN\""))[0].message.contains("number"));
        assert!(invalid(&base("true"))[0].message.contains("number"));
        let p = limits().decode_one(base("0").as_bytes(), None).unwrap();
        assert_eq!(p.used_amount, Amount::ZERO);
        let p = limits()
            .decode_one(base("\"12.50\"").as_bytes(), None)
            .unwrap();
        assert_eq!(p.used_amount.to_string(), "12.5");
    }

    #[test]
    fn control_characters_and_long_strings_are_refused() {
        let e =
            invalid(r#"{"tenant_id":"a\u0000b","product_sku":"s","use_unit":"u","used_amount":1}"#);
        assert_eq!(e[0].field, "tenant_id");
        let long = "x".repeat(65);
        let e = invalid(&format!(
            r#"{{"tenant_id":"{long}","product_sku":"s","use_unit":"u","used_amount":1}}"#
        ));
        assert!(e[0].message.contains("at most 64"));
    }

    #[test]
    fn malformed_json_is_not_invalid() {
        for body in [
            "",
            "{",
            "[]",
            "null",
            r#"{"tenant_id":"a","tenant_id":"b"}"#,
        ] {
            assert!(
                matches!(
                    limits().decode_one(body.as_bytes(), None),
                    Err(DecodeError::Malformed(_))
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn allow_list_applies() {
        let l = Limits {
            allowed_units: Some(vec!["KB".into(), "MB".into()]),
            ..limits()
        };
        let r = l.decode_one(
            br#"{"tenant_id":"t","product_sku":"s","used_amount":1,"use_unit":"TB"}"#,
            None,
        );
        match r {
            Err(DecodeError::Invalid(e)) => assert!(e[0].message.contains("KB, MB")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_batch_lists_every_bad_index() {
        let body = br#"[{"tenant_id":"t","product_sku":"s","used_amount":1,"use_unit":"u"},
                        {"tenant_id":"t","product_sku":"s","used_amount":-1,"use_unit":"u"},
                        {"product_sku":"s","used_amount":1,"use_unit":"u"}]"#;
        match limits().decode_batch(body, false, None, 100) {
            Err(DecodeError::Invalid(e)) => {
                let idx: Vec<_> = e.iter().map(|e| e.index.unwrap()).collect();
                assert_eq!(idx, [1, 2]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ndjson_batches_and_idempotency_keys() {
        let body = b"{\"tenant_id\":\"t\",\"product_sku\":\"s\",\"used_amount\":1,\"use_unit\":\"u\"}\n\n{\"tenant_id\":\"t\",\"product_sku\":\"s\",\"used_amount\":2,\"use_unit\":\"u\",\"pulse_id\":\"own\"}\n";
        let p = limits().decode_batch(body, true, Some("k"), 100).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].pulse_id.as_deref(), Some(derived_id("k", 0).as_str()));
        // A literal id that looks like the old `<key>#<i>` form is a different pulse.
        assert_ne!(derived_id("k", 0), "k#0");
        assert_eq!(p[1].pulse_id.as_deref(), Some("own"));
        assert_eq!(
            limits().decode_batch(body, true, None, 1),
            Err(DecodeError::TooManyItems { max: 1 })
        );
    }

    #[test]
    fn a_json_array_stops_at_the_item_cap_while_parsing() {
        let item = r#"{"tenant_id":"t","product_sku":"s","used_amount":1,"use_unit":"u"}"#;
        // Four items, then garbage: refused for size at the fourth, before the garbage is read.
        let body = format!("[{item},{item},{item},{item}, this is not JSON");
        assert_eq!(
            limits().decode_batch(body.as_bytes(), false, None, 3),
            Err(DecodeError::TooManyItems { max: 3 })
        );
        let body = format!("[{item},{item},{item}]");
        assert_eq!(
            limits()
                .decode_batch(body.as_bytes(), false, None, 3)
                .unwrap()
                .len(),
            3
        );
        assert!(matches!(
            limits().decode_batch(format!("[{item}] x").as_bytes(), false, None, 3),
            Err(DecodeError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = limits().decode_one(&body, None);
            let _ = limits().decode_batch(&body, false, None, 10);
            let _ = limits().decode_batch(&body, true, Some("k"), 10);
        }

        #[test]
        fn hostile_json_never_panics_and_never_counts(
            depth in 1usize..2000,
            giant in 0usize..200_000,
            number in "[0-9]{1,400}(\\.[0-9]{0,50})?(e[+-]?[0-9]{1,5})?",
            junk in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let l = limits();
            // Deep nesting, anywhere.
            let nested = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
            let body = format!(r#"{{"tenant_id":"t","product_sku":{nested},"used_amount":1,"use_unit":"u"}}"#);
            prop_assert!(l.decode_one(body.as_bytes(), None).is_err());
            let batch = format!("[{}]", body);
            prop_assert!(l.decode_batch(batch.as_bytes(), false, None, 10).is_err());
            // Giant strings are refused by length, not by running out of memory.
            let body = format!(r#"{{"tenant_id":"{}","product_sku":"s","used_amount":1,"use_unit":"u"}}"#, "x".repeat(giant));
            let r = l.decode_one(body.as_bytes(), None);
            prop_assert_eq!(r.is_ok(), (1..=64).contains(&giant));
            // Huge or long numbers are finite and within bounds, or refused.
            let body = format!(r#"{{"tenant_id":"t","product_sku":"s","used_amount":{number},"use_unit":"u"}}"#);
            if let Ok(p) = l.decode_one(body.as_bytes(), None) {
                prop_assert!(p.used_amount <= l.max_amount);
            }
            // Invalid UTF-8 inside a string, and duplicate keys.
            let mut body = br#"{"tenant_id":""#.to_vec();
            body.extend_from_slice(&junk);
            body.extend_from_slice(br#"","product_sku":"s","used_amount":1,"use_unit":"u"}"#);
            if std::str::from_utf8(&junk).is_err() {
                prop_assert!(matches!(l.decode_one(&body, None), Err(DecodeError::Malformed(_))));
            }
            let dup = br#"{"tenant_id":"a","tenant_id":"b","product_sku":"s","used_amount":1,"use_unit":"u"}"#;
            prop_assert!(matches!(l.decode_one(dup, None), Err(DecodeError::Malformed(_))));
        }
    }
}
