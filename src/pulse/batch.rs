//! Batches: a JSON array (refused at the item cap while parsing, never held whole) or NDJSON,
//! all or nothing, with every bad index listed; item ids derived from an `Idempotency-Key`.

use serde_json::value::RawValue;

use super::{BodyFormat, DecodeError, Decoder, FieldError, Pulse, Wire, clean, malformed};

/// A batch decoded item by item: the valid pulses with their indexes, and the problems of the
/// others.
pub type Items = (Vec<(usize, Pulse)>, Vec<FieldError>);

impl Decoder {
    /// Decodes and validates a batch: a JSON array, or NDJSON (one object per line). The batch
    /// is all or nothing: every bad item is listed with its index. With an `Idempotency-Key`,
    /// item `i` without its own id gets an id derived from the key and `i` ([`derived_id`]),
    /// so a retried batch counts once.
    pub fn decode_batch(
        &self,
        body: &[u8],
        format: BodyFormat,
        idempotency_key: Option<&str>,
        max_items: usize,
    ) -> Result<Vec<Pulse>, DecodeError> {
        let (pulses, errors) = self.decode_items(body, format, idempotency_key, max_items)?;
        if errors.is_empty() {
            Ok(pulses.into_iter().map(|(_, p)| p).collect())
        } else {
            Err(DecodeError::Invalid(errors))
        }
    }

    /// Decodes a batch item by item: the valid pulses with their indexes, and every problem of
    /// the others (for `POST /ingest/batch/partial`, which counts the valid ones). Only a body
    /// that is no batch at all (malformed, too many items, empty) is an error.
    pub fn decode_items(
        &self,
        body: &[u8],
        format: BodyFormat,
        idempotency_key: Option<&str>,
        max_items: usize,
    ) -> Result<Items, DecodeError> {
        let items: Vec<&RawValue> = if format == BodyFormat::Ndjson {
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
                Ok(p) => pulses.push((i, p)),
                Err(errs) => errors.extend(errs.into_iter().map(|e| FieldError {
                    index: Some(i),
                    ..e
                })),
            }
        }
        Ok((pulses, errors))
    }
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
