//! Exact money (invariant 11): an amount is a decimal from the request to the Processor.
//!
//! Amounts are parsed from their JSON text with `bigdecimal` (never through `f64`), checked
//! against `AMOUNT_DECIMALS` and `MAX_AMOUNT`, and carried as an integer count of 10^-12 units
//! ([`SCALE`]). Redis adds them with `HINCRBY` on two integer limbs per key — `lo` (an
//! increment's is below [`LIMB`] = 10^15; the total's is kept below 4 × 10^18 + 10^15 by moving
//! 4 × 10^18 into `hi` now and then) and `hi` (multiples of [`LIMB`]) — so a key's window total
//! is exact up to [`MAX_TOTAL`] whatever `AMOUNT_DECIMALS` is (see `store/scripts/seal_lib.lua`). Totals are printed back as canonical
//! decimal text: no exponent, no trailing zeros.

use std::fmt;
use std::str::FromStr;

use bigdecimal::{BigDecimal, ToPrimitive};

/// Fractional digits the service counts in internally; `AMOUNT_DECIMALS` may not exceed it.
pub const SCALE: u32 = 12;
const ONE: u128 = 10u128.pow(SCALE);
/// The low limb's modulus in Redis: 10^15 internal units (1,000 whole units).
pub const LIMB: u128 = 1_000_000_000_000_000;
/// The largest `hi` limb a commit may produce: 2^62 (Redis' `HINCRBY` works up to 2^63 - 1).
pub const MAX_HI: u128 = 1 << 62;
/// The largest window total of one key the service guarantees exact: 2^62 × 10^15 internal
/// units, ≈ 4.6 × 10^21 whole units.
pub const MAX_TOTAL: Amount = Amount(MAX_HI * LIMB);
/// Longest amount text accepted (bounds parsing work for hostile bodies).
const MAX_TEXT: usize = 80;

/// A non-negative exact amount, in 10^-12 units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(u128);

/// Why a text is not an acceptable amount; each message names what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("must be a number or a decimal string")]
    NotANumber,
    #[error("must not be negative")]
    Negative,
    #[error("has more than {0} fractional digits (trailing zeros aside); it is not rounded")]
    TooManyDecimals(u32),
    #[error("must be at most {0}")]
    TooLarge(Amount),
    #[error("must be written in at most {MAX_TEXT} characters")]
    TooLong,
}

impl Amount {
    pub const ZERO: Amount = Amount(0);

    /// From a count of 10^-12 units.
    pub const fn from_units(units: u128) -> Self {
        Amount(units)
    }

    /// The count of 10^-12 units.
    pub const fn units(self) -> u128 {
        self.0
    }

    /// Parses a JSON value's text: a JSON number in any JSON form (`12`, `12.50`, `1.5e3`,
    /// `1E-9`) or a string holding one (`"12.50"`). At most `decimals` significant fractional
    /// digits, and at most `max`.
    pub fn parse_json(raw: &str, decimals: u32, max: Amount) -> Result<Self, AmountError> {
        let text = if raw.starts_with('"') {
            let s: String = serde_json::from_str(raw).map_err(|_| AmountError::NotANumber)?;
            // A decimal string holds what a JSON number would: nothing else (no "NaN", "+1",
            // spaces or hex).
            if !is_json_number(&s) {
                return Err(AmountError::NotANumber);
            }
            std::borrow::Cow::Owned(s)
        } else if is_json_number(raw) {
            std::borrow::Cow::Borrowed(raw)
        } else {
            return Err(AmountError::NotANumber);
        };
        Self::parse_decimal(&text, decimals, max)
    }

    /// Parses decimal text (exponent allowed) exactly.
    pub fn parse_decimal(text: &str, decimals: u32, max: Amount) -> Result<Self, AmountError> {
        if text.len() > MAX_TEXT {
            return Err(AmountError::TooLong);
        }
        if let Some(units) = plain_units(text, decimals) {
            if units > max.0 {
                return Err(AmountError::TooLarge(max));
            }
            return Ok(Amount(units));
        }
        Self::parse_general(text, decimals, max)
    }

    /// [`Self::parse_decimal`] by `bigdecimal`: any decimal text, exponents included.
    fn parse_general(text: &str, decimals: u32, max: Amount) -> Result<Self, AmountError> {
        let d = BigDecimal::from_str(text).map_err(|_| AmountError::NotANumber)?;
        let d = d.normalized();
        if d.sign() == bigdecimal::num_bigint::Sign::Minus {
            return Err(AmountError::Negative);
        }
        let (_, scale) = d.as_bigint_and_exponent();
        if scale > i64::from(decimals) {
            return Err(AmountError::TooManyDecimals(decimals));
        }
        // Far above any maximum: refuse before scaling (the exponent may be huge).
        if scale < -40 {
            return Err(AmountError::TooLarge(max));
        }
        let (units, _) = d.with_scale(i64::from(SCALE)).into_bigint_and_exponent();
        let units = units.to_u128().ok_or(AmountError::TooLarge(max))?;
        if units > max.0 {
            return Err(AmountError::TooLarge(max));
        }
        Ok(Amount(units))
    }

    pub fn checked_add(self, o: Amount) -> Option<Amount> {
        self.0.checked_add(o.0).map(Amount)
    }

    /// The two Redis limbs: (`hi`, `lo`) with `lo < LIMB`.
    pub fn limbs(self) -> (u128, u64) {
        (self.0 / LIMB, (self.0 % LIMB) as u64)
    }

    /// Rebuilds an amount from the limbs Redis holds (`lo` may be any value a script left).
    pub fn from_limbs(hi: u128, lo: u128) -> Option<Amount> {
        hi.checked_mul(LIMB)?.checked_add(lo).map(Amount)
    }
}

/// The common case without `bigdecimal` (which allocates a few times per amount): plain decimal
/// text — digits, optionally a point and digits; no sign, no exponent — with at most 24 integer
/// digits and at most `decimals` fractional digits once trailing zeros are set aside, as exact
/// 10^-12 units. `None` for anything else, which the general parser then decides (and refuses
/// or accepts exactly as before: the two agree wherever this answers, see the tests).
fn plain_units(text: &str, decimals: u32) -> Option<u128> {
    let (int, frac) = match text.split_once('.') {
        // "1." is not plain decimal text: the general parser decides.
        Some((_, "")) => return None,
        Some((i, f)) => (i, f.trim_end_matches('0')),
        None => (text, ""),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty()
        || int.len() > 24
        || frac.len() > decimals.min(SCALE) as usize
        || !digits(int)
        || !digits(frac)
    {
        return None;
    }
    let mut units: u128 = 0;
    for b in int.bytes() {
        units = units * 10 + u128::from(b - b'0');
    }
    let mut f: u128 = 0;
    for b in frac.bytes() {
        f = f * 10 + u128::from(b - b'0');
    }
    // 24 integer digits × 10^12 < 10^36 < u128::MAX: no overflow.
    Some(units * ONE + f * 10u128.pow(SCALE - frac.len() as u32))
}

impl fmt::Display for Amount {
    /// Canonical decimal text: no exponent, no trailing zeros (`20000`, `140.000007`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (int, frac) = (self.0 / ONE, self.0 % ONE);
        if frac == 0 {
            return write!(f, "{int}");
        }
        let digits = format!("{frac:0width$}", width = SCALE as usize);
        write!(f, "{int}.{}", digits.trim_end_matches('0'))
    }
}

/// The JSON number grammar: `-? int frac? exp?`.
fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if b.first() == Some(&b'-') {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > start
    };
    let int_start = i;
    if !digits(&mut i) {
        return false;
    }
    // No leading zeros: `0`, `0.5`, but not `00.1` or `01`.
    if b[int_start] == b'0' && i - int_start > 1 {
        return false;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == b.len()
}

/// Canonical decimal text of any decimal text (`19999.99999999972`, `1e+20`), exactly as
/// written: no rounding, no exponent, no trailing zeros.
pub fn canonical(text: &str) -> Option<String> {
    if text.len() > MAX_TEXT {
        return None;
    }
    let d = BigDecimal::from_str(text.trim()).ok()?.normalized();
    let (_, scale) = d.as_bigint_and_exponent();
    if !(-40..=40).contains(&scale) {
        return None;
    }
    let s = if scale < 0 {
        d.with_scale(0).to_plain_string()
    } else {
        d.to_plain_string()
    };
    Some(if s == "-0" { "0".into() } else { s })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: Amount = Amount(1_000_000_000_000_000 * ONE);

    fn p(s: &str) -> Result<Amount, AmountError> {
        Amount::parse_json(s, 9, MAX)
    }

    proptest! {
        /// The fast path for plain decimals answers exactly what the general parser does.
        #[test]
        fn plain_decimals_parse_as_the_general_parser_does(
            int in "[0-9]{1,26}",
            frac in proptest::option::of("[0-9]{0,16}"),
            decimals in 0u32..=12,
        ) {
            let text = match &frac { Some(f) => format!("{int}.{f}"), None => int.clone() };
            let max = Amount(MAX_HI * LIMB);
            if let (Some(units), Ok(general)) =
                (plain_units(&text, decimals), Amount::parse_general(&text, decimals, max))
            {
                prop_assert_eq!(Amount(units), general);
            }
            prop_assert_eq!(
                Amount::parse_decimal(&text, decimals, max),
                Amount::parse_general(&text, decimals, max)
            );
        }
    }

    #[test]
    fn every_json_form_parses_exactly() {
        for (text, want) in [
            ("12", "12"),
            ("12.50", "12.5"),
            ("1.5e3", "1500"),
            ("1E-9", "0.000000001"),
            ("\"12.50\"", "12.5"),
            ("0", "0"),
            ("-0", "0"),
            ("123456789.123456789", "123456789.123456789"),
            ("0.100000000000000000000", "0.1"),
            ("999999999999999.99", "999999999999999.99"),
        ] {
            assert_eq!(p(text).unwrap().to_string(), want, "{text}");
        }
    }

    #[test]
    fn what_is_not_exact_or_allowed_is_refused() {
        assert_eq!(p("0.0000000001"), Err(AmountError::TooManyDecimals(9)));
        assert_eq!(p("-1"), Err(AmountError::Negative));
        assert_eq!(p("1e400"), Err(AmountError::TooLarge(MAX)));
        assert_eq!(p("2e15"), Err(AmountError::TooLarge(MAX)));
        for bad in [
            "\"NaN\"", "\"\"", "true", "null", "\"1,5\"", "\" 1\"", "\"+1\"", "\"0x10\"", "1.",
            "[1]", "\"00.1\"", "\"01\"", "007",
        ] {
            assert_eq!(p(bad), Err(AmountError::NotANumber), "{bad}");
        }
        // Too long to read is said as such, not as "too large".
        let long = format!("1.{}", "0".repeat(79));
        assert_eq!(p(&long), Err(AmountError::TooLong));
    }

    #[test]
    fn sums_print_canonically() {
        let a = p("999999999999999.99").unwrap();
        let b = p("0.01").unwrap();
        assert_eq!(a.checked_add(b).unwrap().to_string(), "1000000000000000");
        let tenth = p("0.1").unwrap();
        let sum = (0..200_000).fold(Amount::ZERO, |s, _| s.checked_add(tenth).unwrap());
        assert_eq!(sum.to_string(), "20000");
    }

    #[test]
    fn decimal_text_is_kept_as_written() {
        assert_eq!(canonical("19999.99999999972").unwrap(), "19999.99999999972");
        assert_eq!(canonical("307.5").unwrap(), "307.5");
        assert_eq!(canonical("1e+20").unwrap(), "100000000000000000000");
        assert_eq!(canonical("20").unwrap(), "20");
        assert_eq!(canonical("0.00").unwrap(), "0");
        assert!(canonical("nan").is_none());
    }

    proptest! {
        #[test]
        fn limbs_round_trip(units in 0u128..(MAX_HI * LIMB)) {
            let a = Amount(units);
            let (hi, lo) = a.limbs();
            prop_assert!(u128::from(lo) < LIMB);
            prop_assert_eq!(Amount::from_limbs(hi, u128::from(lo)), Some(a));
        }

        #[test]
        fn text_round_trips(int in 0u64..1_000_000_000_000_000, frac in 0u64..1_000_000_000) {
            let text = format!("{int}.{frac:09}");
            let a = Amount::parse_decimal(&text, 9, MAX).unwrap();
            let back = Amount::parse_decimal(&a.to_string(), 9, MAX).unwrap();
            prop_assert_eq!(a, back);
            prop_assert_eq!(canonical(&text).unwrap(), a.to_string());
        }
    }
}
