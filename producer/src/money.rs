//! Exact amounts for the producer, its ledger and the reference Processor: `BigDecimal`
//! throughout, read from and written to JSON as numbers without ever passing through a float.

use std::str::FromStr;

pub use bigdecimal::BigDecimal as Dec;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serializer};
use serde_json::value::RawValue;

/// Canonical decimal text: no exponent, no trailing zeros.
pub fn canonical(d: &Dec) -> String {
    let n = d.normalized();
    let (_, scale) = n.as_bigint_and_exponent();
    let s = if scale < 0 {
        n.with_scale(0).to_plain_string()
    } else {
        n.to_plain_string()
    };
    if s == "-0" { "0".into() } else { s }
}

/// Parses decimal text exactly (a JSON number's text, or a decimal string).
pub fn parse(text: &str) -> Option<Dec> {
    if text.len() > 200 {
        return None;
    }
    Dec::from_str(text).ok()
}

/// `#[serde(with = "money::number")]`: a JSON number written verbatim from the exact decimal,
/// and read from the number's (or a string's) text.
pub mod number {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Dec, s: S) -> Result<S::Ok, S::Error> {
        let raw = RawValue::from_string(canonical(d)).map_err(serde::ser::Error::custom)?;
        serde::Serialize::serialize(&raw, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Dec, D::Error> {
        let raw: Box<RawValue> = Deserialize::deserialize(d)?;
        let text = raw.get();
        let text = if text.starts_with('"') {
            serde_json::from_str::<String>(text).map_err(D::Error::custom)?
        } else {
            text.to_string()
        };
        parse(&text).ok_or_else(|| D::Error::custom(format!("not a decimal: {text}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_round_trip_through_json_exactly() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct T {
            #[serde(with = "number")]
            a: Dec,
        }
        for text in ["123456789.123456789", "0.1", "1000000000000000", "0"] {
            let t: T = serde_json::from_str(&format!(r#"{{"a":{text}}}"#)).unwrap();
            assert_eq!(
                serde_json::to_string(&t).unwrap(),
                format!(r#"{{"a":{text}}}"#)
            );
        }
        let t: T = serde_json::from_str(r#"{"a":"12.50"}"#).unwrap();
        assert_eq!(canonical(&t.a), "12.5");
        let t: T = serde_json::from_str(r#"{"a":1.5e3}"#).unwrap();
        assert_eq!(canonical(&t.a), "1500");
    }
}
