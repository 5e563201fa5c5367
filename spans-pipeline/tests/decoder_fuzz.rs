//! Bad input at the front door: property tests of the span decoder, the consumer's decode step
//! and the batch grouping, over arbitrary bytes, well-formed JSON with wrongly typed fields and
//! randomly mutated valid spans.
//!
//! A Kafka message is untrusted input. Whatever its bytes, decoding must end in either a span
//! or a typed error (one that names the field when a field is at fault), the consumer's step
//! must turn every error into an invalid message for the dead-letter queue (never a panic, never
//! a rejection that would stall the partition), and grouping must place every decoded span in
//! exactly one subsegment however the ids collide or loop. Whatever the decoder accepts, the
//! output step must be able to patch at flush time and name by the same span id.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, UNIX_EPOCH};

use proptest::prelude::*;
use rill::backends::kafka::KafkaPayload;
use rill::{Message, Partition, SubmitError, Topic};
use spans_pipeline::buffer::{build_subsegments, patch_span};
use spans_pipeline::consumer::{KillSwitchHandle, decode_span};
use spans_pipeline::span::{Span, SpanError};

/// A valid `ingest-spans` message with every field the decoder looks at.
const VALID: &str = r#"{"organization_id":1,"project_id":12,"trace_id":"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","span_id":"aaaaaaaaaaaaaaaa","parent_span_id":"cccccccccccccccc","segment_id":"dddddddddddddddd","is_segment":false,"start_timestamp":1699999999.0,"end_timestamp":1700000000,"received":1700000000.5,"retention_days":90,"name":"GET","status":"ok","attributes":{"sentry.segment.id":{"type":"string","value":"dddddddddddddddd"}},"data":{"k":[1,2,{"x":null}]}}"#;

/// The fields the decoder types, the name its error uses, and the JSON kinds it accepts.
const TYPED_FIELDS: [(&str, &str, &[Kind]); 14] = [
    ("organization_id", "organization_id", &[Kind::Unsigned]),
    ("project_id", "project_id", &[Kind::Unsigned]),
    ("trace_id", "trace_id", &[Kind::String]),
    ("span_id", "span_id", &[Kind::String]),
    (
        "parent_span_id",
        "parent_span_id",
        &[Kind::Null, Kind::String],
    ),
    ("segment_id", "segment_id", &[Kind::Null, Kind::String]),
    ("is_segment", "is_segment", &[Kind::Null, Kind::Bool]),
    (
        "start_timestamp",
        "start_timestamp",
        &[Kind::Unsigned, Kind::Negative, Kind::Fraction],
    ),
    (
        "end_timestamp",
        "end_timestamp",
        &[Kind::Unsigned, Kind::Negative, Kind::Fraction],
    ),
    (
        "received",
        "received",
        &[Kind::Unsigned, Kind::Negative, Kind::Fraction],
    ),
    ("retention_days", "retention_days", &[Kind::SmallUnsigned]),
    ("name", "name", &[Kind::Null, Kind::String]),
    ("status", "status", &[Kind::String]),
    (
        "attributes",
        "attributes.sentry.segment.id",
        &[Kind::Null, Kind::Object],
    ),
];

/// The kinds of JSON value a wrongly typed field is drawn from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Null,
    Bool,
    /// An integer in `0..=65535`.
    SmallUnsigned,
    /// A non-negative integer above 65535.
    Unsigned,
    Negative,
    Fraction,
    String,
    Array,
    Object,
}

impl Kind {
    const ALL: [Self; 9] = [
        Self::Null,
        Self::Bool,
        Self::SmallUnsigned,
        Self::Unsigned,
        Self::Negative,
        Self::Fraction,
        Self::String,
        Self::Array,
        Self::Object,
    ];

    /// Whether a field accepting `accepted` takes a value of this kind.
    fn fits(self, accepted: &[Self]) -> bool {
        accepted.contains(&self)
            || (self == Self::SmallUnsigned && accepted.contains(&Self::Unsigned))
    }

    /// JSON text of a value of this kind.
    fn value(self) -> BoxedStrategy<String> {
        match self {
            Self::Null => Just("null".to_owned()).boxed(),
            Self::Bool => any::<bool>().prop_map(|b| b.to_string()).boxed(),
            Self::SmallUnsigned => (0..=65_535u32).prop_map(|n| n.to_string()).boxed(),
            Self::Unsigned => (65_536..=u64::MAX).prop_map(|n| n.to_string()).boxed(),
            Self::Negative => (i64::MIN..0).prop_map(|n| n.to_string()).boxed(),
            Self::Fraction => (-1e12..1e12f64)
                .prop_map(|x| format!("{}.5", x.trunc()))
                .boxed(),
            Self::String => any::<String>()
                .prop_map(|s| sonic_rs::to_string(&s).unwrap())
                .boxed(),
            Self::Array => prop::collection::vec(0..100u8, 0..4)
                .prop_map(|items| sonic_rs::to_string(&items).unwrap())
                .boxed(),
            Self::Object => Just(r#"{"sentry.segment.id":{"value":7}}"#.to_owned()).boxed(),
        }
    }
}

/// `VALID` with `field` set to the JSON text `value`.
fn with_field(field: &str, value: &str) -> String {
    with_field_in(VALID, field, value)
}

/// The JSON object `json` with `field` set to the JSON text `value`.
fn with_field_in(json: &str, field: &str, value: &str) -> String {
    use sonic_rs::JsonValueMutTrait;
    let mut object: sonic_rs::Value = sonic_rs::from_str(json).unwrap();
    let value: sonic_rs::Value = sonic_rs::from_str(value).unwrap();
    object.as_object_mut().unwrap().insert(field, value);
    sonic_rs::to_string(&object).unwrap()
}

/// A wrongly typed value for one of the typed fields: `(field, name in errors, JSON text)`.
fn wrongly_typed_field() -> impl Strategy<Value = (&'static str, &'static str, String)> {
    (0..TYPED_FIELDS.len(), 0..Kind::ALL.len())
        .prop_filter("the kind must be wrong for the field", |&(field, kind)| {
            !Kind::ALL[kind].fits(TYPED_FIELDS[field].2)
        })
        .prop_flat_map(|(field, kind)| {
            let (field, named, _) = TYPED_FIELDS[field];
            Kind::ALL[kind]
                .value()
                .prop_map(move |value| (field, named, value))
        })
}

/// One random edit of a byte string.
#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Insert { at: usize, byte: u8 },
    Delete { at: usize },
    Truncate { at: usize },
}

impl Mutation {
    fn apply(&self, bytes: &mut Vec<u8>) {
        let position = |at: usize, len: usize| if len == 0 { 0 } else { at % len };
        match *self {
            Self::Flip { at, bit } => {
                let at = position(at, bytes.len());
                if let Some(byte) = bytes.get_mut(at) {
                    *byte ^= 1 << (bit % 8);
                }
            }
            Self::Insert { at, byte } => {
                let at = position(at, bytes.len() + 1);
                bytes.insert(at, byte);
            }
            Self::Delete { at } => {
                if !bytes.is_empty() {
                    let at = position(at, bytes.len());
                    bytes.remove(at);
                }
            }
            Self::Truncate { at } => {
                let at = position(at, bytes.len() + 1);
                bytes.truncate(at);
            }
        }
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Delete { at }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

/// Names an error may give: the typed fields and the required ones.
fn is_known_field(name: &str) -> bool {
    TYPED_FIELDS.iter().any(|&(_, named, _)| named == name)
}

/// Decodes `bytes` and checks the contract: a span that keeps the bytes, or a typed error
/// naming a known field; and the consumer's step agrees, sending errors to the DLQ.
fn check_decoding(bytes: &[u8]) -> Result<(), TestCaseError> {
    let decoded = Span::decode(bytes, 5);
    match &decoded {
        Ok(span) => {
            prop_assert_eq!(span.payload, bytes);
            prop_assert_eq!(span.partition, 5);
            // What the decoder accepts, the output step can patch and name at flush time
            // (flush cleanup finds a span's redirect entry by that name).
            let patched = patch_span(bytes, &span.span_id);
            prop_assert_eq!(&patched.span_id, &span.span_id);
            prop_assert_eq!(patched.is_segment, !span.span_id.is_empty());
            let braces = ['{', '}'];
            prop_assert!(!span.trace_id.contains(braces), "{}", span.trace_id);
        }
        Err(SpanError::MissingField(field)) => prop_assert!(is_known_field(field), "{field}"),
        Err(SpanError::InvalidField { field, reason }) => {
            prop_assert!(is_known_field(field), "{field}");
            prop_assert!(!reason.is_empty());
        }
        Err(SpanError::Malformed(reason)) => prop_assert!(!reason.is_empty()),
        Err(other) => prop_assert!(false, "unknown error kind {other:?}"),
    }
    let message = Message::broker(
        KafkaPayload::new(None, Some(bytes.to_vec())),
        Partition::new(Topic::new("ingest-spans"), 5),
        42,
        Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
    );
    match (decode_span(&KillSwitchHandle::default(), message), decoded) {
        (Ok(step), Ok(_)) => prop_assert_eq!(step.payload().payload.value(), Some(bytes)),
        (Err(SubmitError::InvalidMessage(invalid)), Err(error)) => {
            prop_assert_eq!(invalid.offset(), Some(42));
            prop_assert_eq!(invalid.reason(), error.to_string());
        }
        (step, decoded) => prop_assert!(
            false,
            "the step and the decoder disagree: {:?} / {decoded:?}",
            step.map(|m| m.offset())
        ),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_give_a_span_or_a_typed_error(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check_decoding(&bytes)?;
    }

    #[test]
    fn arbitrary_json_objects_give_a_span_or_a_typed_error(
        fields in prop::collection::btree_map(
            prop::sample::select(TYPED_FIELDS.iter().map(|f| f.0).chain(["other"]).collect::<Vec<_>>()),
            prop::sample::select(Kind::ALL.to_vec()).prop_flat_map(Kind::value),
            0..16,
        )
    ) {
        let body: Vec<String> = fields
            .iter()
            .map(|(field, value)| format!("\"{field}\":{value}"))
            .collect();
        check_decoding(format!("{{{}}}", body.join(",")).as_bytes())?;
    }

    #[test]
    fn a_wrongly_typed_field_is_named_in_the_error((field, named, value) in wrongly_typed_field()) {
        let json = with_field(field, &value);
        match Span::decode(json.as_bytes(), 0) {
            Err(SpanError::InvalidField { field: reported, .. }) => prop_assert_eq!(reported, named),
            other => prop_assert!(false, "{field} = {value}: {other:?}"),
        }
        check_decoding(json.as_bytes())?;
    }

    #[test]
    fn any_string_id_decodes_and_is_named_alike_at_output(
        span_id in any::<String>().prop_filter("an empty span id is refused", |id| !id.is_empty()),
        trace_id in "[^{}]*",
    ) {
        let json = with_field("span_id", &sonic_rs::to_string(&span_id).unwrap());
        let json = with_field_in(&json, "trace_id", &sonic_rs::to_string(&trace_id).unwrap());
        let span = Span::decode(json.as_bytes(), 0).unwrap();
        prop_assert_eq!(span.span_id.as_ref(), span_id.as_str());
        prop_assert_eq!(span.trace_id.as_ref(), trace_id.as_str());
        check_decoding(json.as_bytes())?;
    }

    #[test]
    fn mutated_valid_spans_give_a_span_or_a_typed_error(mutations in prop::collection::vec(mutation(), 1..6)) {
        let mut bytes = VALID.as_bytes().to_vec();
        for mutation in &mutations {
            mutation.apply(&mut bytes);
        }
        check_decoding(&bytes)?;
    }
}

#[test]
fn every_typed_field_accepts_its_own_kinds() {
    // The fixture the wrong types are measured against decodes, and so does each accepted
    // kind, so a failure above is about the type and nothing else.
    assert!(Span::decode(VALID.as_bytes(), 0).is_ok());
    for (field, _, accepted) in TYPED_FIELDS {
        for kind in accepted {
            let value = match kind {
                Kind::Null => "null",
                Kind::Bool => "true",
                Kind::SmallUnsigned => "30",
                Kind::Unsigned => "18446744073709551615",
                Kind::Negative => "-3",
                Kind::Fraction => "2.5",
                Kind::String => "\"x\"",
                Kind::Object => "{}",
                Kind::Array => "[]",
            };
            let json = with_field(field, value);
            assert!(
                Span::decode(json.as_bytes(), 0).is_ok(),
                "{field} = {value}"
            );
        }
    }
}

/// A span of the grouping property: ids from a tiny alphabet, so parents, duplicates, cycles
/// and self-parenting are common.
#[derive(Clone, Debug)]
struct GroupedSpan {
    trace: u8,
    project: u64,
    span_id: u8,
    parent: Option<u8>,
    segment_id: Option<u8>,
    is_segment: bool,
}

fn grouped_span() -> impl Strategy<Value = GroupedSpan> {
    (
        0..3u8,
        1..3u64,
        0..12u8,
        prop::option::weighted(0.85, 0..12u8),
        prop::option::weighted(0.15, 0..12u8),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(trace, project, span_id, parent, segment_id, is_segment)| GroupedSpan {
                trace,
                project,
                span_id,
                parent,
                segment_id,
                is_segment,
            },
        )
}

/// Owned strings the generated spans borrow from.
struct Ids {
    traces: Vec<String>,
    spans: Vec<String>,
}

impl Ids {
    fn new() -> Self {
        Self {
            traces: (0..3).map(|t| format!("{t:032x}")).collect(),
            spans: (0..12).map(|s| format!("{s:016x}")).collect(),
        }
    }

    fn span<'a>(&'a self, spec: &GroupedSpan) -> Span<'a> {
        let id = |i: u8| self.spans[usize::from(i)].as_str().into();
        Span {
            trace_id: self.traces[usize::from(spec.trace)].as_str().into(),
            span_id: id(spec.span_id),
            parent_span_id: spec.parent.map(id),
            segment_id: spec.segment_id.map(id),
            project_id: spec.project,
            organization_id: 1,
            is_segment_span: spec.parent.is_none() || spec.is_segment,
            partition: 0,
            payload: b"{}",
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn grouping_keeps_every_span_exactly_once(
        specs in prop::collection::vec(grouped_span(), 0..60),
        max_spans_per_evalsha in 0..5usize,
    ) {
        let ids = Ids::new();
        let spans: Vec<Span<'_>> = specs.iter().map(|spec| ids.span(spec)).collect();

        let subsegments = build_subsegments(&spans, max_spans_per_evalsha);

        let mut seen = vec![0usize; spans.len()];
        for subsegment in &subsegments {
            prop_assert!(!subsegment.spans.is_empty());
            if max_spans_per_evalsha > 0 {
                prop_assert!(subsegment.spans.len() <= max_spans_per_evalsha);
            }
            for span in &subsegment.spans {
                prop_assert_eq!(&span.project_and_trace(), &subsegment.project_and_trace);
                let index = spans
                    .iter()
                    .position(|candidate| std::ptr::eq(candidate, *span))
                    .unwrap();
                seen[index] += 1;
            }
        }
        prop_assert!(seen.iter().all(|&count| count == 1), "{seen:?}");
    }
}
