//! What an ingest request answers: the 202 body ([`Accepted`], with [`ItemAnswer`]s when asked
//! for) and the request's [`Shape`], which decides what the answer says. The contract's schemas
//! are derived from these types.

use serde::Serialize;
use utoipa::ToSchema;

use crate::ingest::{Outcome, Refused};
use crate::pulse::FieldError;
use crate::store::LateRefusal;

/// The answer to an accepted request.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Accepted {
    pub status: AcceptedStatus,
    /// Pulses counted by this request (durable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted: Option<usize>,
    /// Pulses recognised as re-sends of an id already counted (durable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<usize>,
    /// Start (unix seconds) of the window the pulses were counted in, when it is one window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_start: Option<u64>,
    /// Pulses queued (enqueued).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pulses: Option<usize>,
    /// Stamped pulses: the windows their timestamps placed them in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<u64>>,
    /// Stamped pulses that joined their sealed window before its delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub late: Option<usize>,
    /// Stamped pulses counted in an amendment of a delivered window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amended: Option<usize>,
    /// Stamped pulses counted ahead, in a window not yet open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ahead: Option<usize>,
    /// Pulses refused after others of the request were counted (a request committed shard by
    /// shard on a cluster): each is named in `items`, which is then always present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<usize>,
    /// `?detail=items`, the partial route, and any answer with `refused`: every item, in body
    /// order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<ItemAnswer>>,
}

/// `committed` (durable: in Redis) or `queued` (`ACK_MODE=enqueued`).
#[derive(Debug, Default, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AcceptedStatus {
    #[default]
    Committed,
    Queued,
}

/// What became of one item of a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItemAnswer {
    /// Index in the body.
    pub index: usize,
    pub status: ItemStatus,
    /// The window it went to (counted or duplicate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_start: Option<u64>,
    /// Why it was refused (each problem without an index: it is the item's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

/// `counted`, `duplicate` (a re-send of an id already counted) or `refused` (partial route:
/// not a valid pulse; nothing of it counted).
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ItemStatus {
    Counted,
    Duplicate,
    Refused,
}

impl Accepted {
    /// Pulses queued, not yet committed (`ACK_MODE=enqueued`).
    pub fn queued(pulses: usize) -> Self {
        Accepted {
            status: AcceptedStatus::Queued,
            pulses: Some(pulses),
            ..Default::default()
        }
    }

    /// The 202 response carrying this answer. The common answers — `status` with `accepted`,
    /// `duplicates` and `window_start`, or `pulses` — are written directly (the derived
    /// serializer costs ~2,300 instructions a single pulse, ~5 % of the request); any other is
    /// serialized. Both write the same text (`the_common_answers_read_as_serialized`).
    pub fn into_response(self) -> axum::response::Response {
        use axum::http::{HeaderValue, StatusCode, header::CONTENT_TYPE};
        use axum::response::IntoResponse;
        let body = self.common_text().map_or_else(
            || serde_json::to_vec(&self).expect("plain fields always serialize"),
            String::into_bytes,
        );
        (
            StatusCode::ACCEPTED,
            [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body,
        )
            .into_response()
    }

    /// The text of an answer with no fields beyond the common ones; `None` otherwise.
    fn common_text(&self) -> Option<String> {
        let plain = self.windows.is_none()
            && self.late.is_none()
            && self.amended.is_none()
            && self.ahead.is_none()
            && self.refused.is_none()
            && self.items.is_none();
        if !plain {
            return None;
        }
        let mut out = String::with_capacity(96);
        out.push_str(match self.status {
            AcceptedStatus::Committed => r#"{"status":"committed""#,
            AcceptedStatus::Queued => r#"{"status":"queued""#,
        });
        let mut field = |name: &str, v: Option<u64>| {
            if let Some(v) = v {
                out.push_str(",\"");
                out.push_str(name);
                out.push_str("\":");
                out.push_str(itoa::Buffer::new().format(v));
            }
        };
        field("accepted", self.accepted.map(|v| v as u64));
        field("duplicates", self.duplicates.map(|v| v as u64));
        field("window_start", self.window_start);
        field("pulses", self.pulses.map(|v| v as u64));
        out.push('}');
        Some(out)
    }

    /// A durable commit's answer.
    pub fn committed(o: &Outcome, shape: &Shape) -> Self {
        let mut a = Accepted {
            accepted: Some(o.accepted),
            duplicates: Some(o.duplicates),
            window_start: o.window_start.filter(|_| !o.windows_mixed),
            items: shape.items(o),
            refused: (!o.refused.is_empty()).then_some(o.refused.len()),
            ..Default::default()
        };
        if !o.stamped_windows.is_empty() {
            a.windows = Some(o.stamped_windows.iter().copied().collect());
            if o.window_start.is_none() && o.stamped_windows.len() == 1 {
                a.window_start = o.stamped_windows.first().copied();
            }
            a.late = Some(o.late_joined);
            a.amended = Some(o.amended);
            a.ahead = Some(o.ahead);
        }
        a
    }
}

/// What kind of ingest request, and what its answer must say.
#[derive(Debug)]
pub enum Shape {
    One,
    /// All or nothing; `detail`: answer per item. `index`: each pulse's index in the body.
    Batch {
        detail: bool,
        index: Vec<usize>,
    },
    /// Item by item: `refused` lists the problems of the items not counted.
    Partial {
        index: Vec<usize>,
        refused: Vec<FieldError>,
    },
}

impl Shape {
    pub fn is_batch(&self) -> bool {
        !matches!(self, Shape::One)
    }

    pub fn detail(&self) -> bool {
        matches!(
            self,
            Shape::Batch { detail: true, .. } | Shape::Partial { .. }
        )
    }

    /// The body index of the request's `i`-th pulse.
    pub fn original(&self, i: usize) -> usize {
        match self {
            Shape::Batch { index, .. } | Shape::Partial { index, .. } => {
                index.get(i).copied().unwrap_or(i)
            }
            Shape::One => i,
        }
    }

    /// The `items` of the answer, in body order, when asked for or when some were refused.
    fn items(&self, o: &Outcome) -> Option<Vec<ItemAnswer>> {
        if !self.detail() && o.refused.is_empty() {
            return None;
        }
        let refused: std::collections::HashMap<usize, Refused> =
            o.refused.iter().copied().collect();
        let mut items: Vec<ItemAnswer> = o
            .items
            .iter()
            .enumerate()
            .map(|(i, it)| match refused.get(&i) {
                Some(&r) => {
                    let (field, message) = refusal(r, Counted::Others);
                    ItemAnswer {
                        index: self.original(i),
                        status: ItemStatus::Refused,
                        window_start: None,
                        errors: Some(vec![FieldError {
                            index: None,
                            field: field.into(),
                            message,
                        }]),
                    }
                }
                None => ItemAnswer {
                    index: self.original(i),
                    status: if it.counted {
                        ItemStatus::Counted
                    } else {
                        ItemStatus::Duplicate
                    },
                    window_start: Some(it.window_start),
                    errors: None,
                },
            })
            .collect();
        if let Shape::Partial { refused, .. } = self {
            let mut by_index: std::collections::BTreeMap<usize, Vec<FieldError>> =
                Default::default();
            for e in refused {
                by_index
                    .entry(e.index.unwrap_or(0))
                    .or_default()
                    .push(FieldError {
                        index: None,
                        ..e.clone()
                    });
            }
            items.extend(by_index.into_iter().map(|(index, errors)| ItemAnswer {
                index,
                status: ItemStatus::Refused,
                window_start: None,
                errors: Some(errors),
            }));
        }
        items.sort_by_key(|it| it.index);
        Some(items)
    }
}

/// Whether the other pulses of a request with a refused pulse were counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Nothing of the request was counted (a 422).
    Nothing,
    /// The request's other pulses were counted (a 202 naming the refused ones).
    Others,
}

/// The field and message of a pulse the write script refused.
pub fn refusal(r: Refused, counted: Counted) -> (&'static str, String) {
    let tail = match counted {
        Counted::Nothing => "nothing of this request was counted",
        Counted::Others => "this pulse was not counted (the request's other pulses were)",
    };
    match r {
        Refused::Overflow => (
            "used_amount",
            format!(
                "would take this key's total for the window past {}, the largest exact total; {tail}",
                crate::amount::MAX_TOTAL
            ),
        ),
        Refused::Late(LateRefusal::Closed) => (
            "timestamp",
            format!(
                "window closed: the window this timestamp falls in is already delivered (LATE_PULSES=refuse); {tail}"
            ),
        ),
        Refused::Late(LateRefusal::OlderThanDedupe) => (
            "timestamp",
            format!(
                "of a pulse with an id must be within the deployment's DEDUPE_TTL less MAX_FUTURE_SKEW of now: a re-send could not be recognised; {tail}"
            ),
        ),
        Refused::Late(LateRefusal::TooOld) => (
            "timestamp",
            format!(
                "too old: the window this timestamp falls in is final (older than the deployment's LATE_MAX_AGE for it); {tail}"
            ),
        ),
    }
}

#[cfg(test)]
mod answer_text {
    use super::*;

    #[test]
    fn the_common_answers_read_as_serialized() {
        let committed = |accepted, duplicates, window_start| Accepted {
            accepted: Some(accepted),
            duplicates: Some(duplicates),
            window_start,
            ..Default::default()
        };
        for a in [
            committed(1, 0, Some(1_700_000_000)),
            committed(0, 1, Some(0)),
            committed(1000, 24, None),
            committed(usize::MAX, 0, Some(u64::MAX)),
            Accepted::queued(7),
            Accepted::default(),
        ] {
            let text = a.common_text().expect("a common answer");
            assert_eq!(text, serde_json::to_string(&a).unwrap());
        }
        let with_windows = Accepted {
            windows: Some(vec![60]),
            ..committed(1, 0, Some(60))
        };
        assert_eq!(with_windows.common_text(), None);
    }
}
