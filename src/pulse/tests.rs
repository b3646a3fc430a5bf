//! Decoding and validation: every bad input named, nothing panics.

use super::*;
use proptest::prelude::*;

fn limits() -> Decoder {
    Decoder {
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
    let e = invalid(r#"{"tenant_id":"a\u0000b","product_sku":"s","use_unit":"u","used_amount":1}"#);
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
    let l = Decoder {
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
    match limits().decode_batch(body, BodyFormat::Json, None, 100) {
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
    let p = limits()
        .decode_batch(body, BodyFormat::Ndjson, Some("k"), 100)
        .unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].pulse_id.as_deref(), Some(derived_id("k", 0).as_str()));
    // A literal id that looks like the old `<key>#<i>` form is a different pulse.
    assert_ne!(derived_id("k", 0), "k#0");
    assert_eq!(p[1].pulse_id.as_deref(), Some("own"));
    assert_eq!(
        limits().decode_batch(body, BodyFormat::Ndjson, None, 1),
        Err(DecodeError::TooManyItems { max: 1 })
    );
}

#[test]
fn a_json_array_stops_at_the_item_cap_while_parsing() {
    let item = r#"{"tenant_id":"t","product_sku":"s","used_amount":1,"use_unit":"u"}"#;
    // Four items, then garbage: refused for size at the fourth, before the garbage is read.
    let body = format!("[{item},{item},{item},{item}, this is not JSON");
    assert_eq!(
        limits().decode_batch(body.as_bytes(), BodyFormat::Json, None, 3),
        Err(DecodeError::TooManyItems { max: 3 })
    );
    let body = format!("[{item},{item},{item}]");
    assert_eq!(
        limits()
            .decode_batch(body.as_bytes(), BodyFormat::Json, None, 3)
            .unwrap()
            .len(),
        3
    );
    assert!(matches!(
        limits().decode_batch(format!("[{item}] x").as_bytes(), BodyFormat::Json, None, 3),
        Err(DecodeError::Malformed(_))
    ));
}

proptest! {
    #[test]
    fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = limits().decode_one(&body, None);
        let _ = limits().decode_batch(&body, BodyFormat::Json, None, 10);
        let _ = limits().decode_batch(&body, BodyFormat::Ndjson, Some("k"), 10);
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
        prop_assert!(l.decode_batch(batch.as_bytes(), BodyFormat::Json, None, 10).is_err());
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

#[test]
fn timestamps_in_every_form_read_to_the_millisecond() {
    use super::parse_timestamp as p;
    let base = 1_796_083_199_000; // 2026-11-30T23:59:59Z
    assert_eq!(p("\"2026-11-30T23:59:59Z\""), Some(base));
    assert_eq!(p("\"2026-11-30T23:59:59.250Z\""), Some(base + 250));
    assert_eq!(
        p("\"2026-11-30T23:59:59.2509Z\""),
        Some(base + 250),
        "truncated, not rounded"
    );
    assert_eq!(p("\"2026-12-01T00:59:59.250+01:00\""), Some(base + 250));
    assert_eq!(p("\"2026-12-01T05:44:59+05:45\""), Some(base));
    assert_eq!(p("1796083199"), Some(base));
    assert_eq!(p("1796083199.2509"), Some(base + 250));
    assert_eq!(p("\"1796083199.25\""), Some(base + 250));
    // A leap second (RFC 3339 allows :60) is the last millisecond of its minute.
    assert_eq!(p("\"2026-11-30T23:59:60Z\""), Some(base + 999));
    assert_eq!(p("\"2026-11-30T23:59:60.5Z\""), Some(base + 999));
    assert_eq!(p("\"2026-12-01T00:59:60+01:00\""), Some(base + 999));
    for bad in [
        "\"2026-11-30T23:59:60.Z\"",
        "\"2026-11-30T23:59:61Z\"",
        "\"2026-11-30 23:59:59\"",
        "\"2026-11-30T23:59:59\"",
        "\"yesterday\"",
        "-5",
        "1e9",
        "1796083199.",
        "true",
        "[1]",
        "\"\"",
    ] {
        assert_eq!(p(bad), None, "{bad}");
    }
}
