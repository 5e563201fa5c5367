//! A span as the buffer sees it: the few fields that decide where it goes, borrowed from the
//! Kafka message, plus the message bytes themselves, kept unmodified for the output.
//!
//! Decoding validates what Sentry's consumer validates (a UTF-8 JSON object, the `ingest-spans`
//! v1 required fields and their types) and names the offending field in the error, so a bad message goes to the
//! dead-letter queue with a useful reason instead of stalling the consumer. Fields the buffer
//! does not use are skipped without being materialised.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

/// Why a message is not a valid span.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpanError {
    /// The message is not a JSON object.
    #[error("span is not a json object: {0}")]
    Malformed(String),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field has the wrong type or value.
    #[error("invalid field `{field}`: {reason}")]
    InvalidField {
        /// The field's name (`attributes.sentry.segment.id` for the segment id attribute).
        field: &'static str,
        /// What was wrong with it.
        reason: String,
    },
}

/// A decoded span. String fields borrow from the message bytes when they contain no escapes.
#[derive(Clone, Debug, PartialEq)]
pub struct Span<'a> {
    /// Trace id (part of every key).
    pub trace_id: Cow<'a, str>,
    /// The span's own id.
    pub span_id: Cow<'a, str>,
    /// Parent span id; `None` makes the span a segment root.
    pub parent_span_id: Option<Cow<'a, str>>,
    /// Segment id assigned by Relay (`attributes["sentry.segment.id"].value`), if any.
    pub segment_id: Option<Cow<'a, str>>,
    /// Project id (part of every key).
    pub project_id: u64,
    /// Organization id.
    pub organization_id: u64,
    /// `parent_span_id is None or is_segment`.
    pub is_segment_span: bool,
    /// Kafka partition the span was read from: its flush queue shard.
    pub partition: u16,
    /// The message value, unmodified.
    pub payload: &'a [u8],
}

impl<'a> Span<'a> {
    /// Decodes and validates one `ingest-spans` message read from `partition`.
    pub fn decode(payload: &'a [u8], partition: u16) -> Result<Self, SpanError> {
        // The whole message must be UTF-8, not only the fields read here: the output step
        // parses every field, and a message it cannot parse would leave the flush unable to
        // name the span. Checking once here is the check the parser would otherwise repeat.
        let text = std::str::from_utf8(payload).map_err(|error| {
            SpanError::Malformed(format!("invalid utf-8 at byte {}", error.valid_up_to()))
        })?;
        let mut failed_field = None;
        let mut deserializer = sonic_rs::Deserializer::from_str(text);
        let fields = SpanSeed {
            failed_field: &mut failed_field,
        }
        .deserialize(&mut deserializer)
        .and_then(|fields| deserializer.end().map(|()| fields));
        let fields = match fields {
            Ok(fields) => fields,
            Err(error) => {
                return Err(match failed_field {
                    Some(field) => SpanError::InvalidField {
                        field,
                        reason: error.to_string(),
                    },
                    None => SpanError::Malformed(error.to_string()),
                });
            }
        };
        fields.into_span(payload, partition)
    }

    /// `"<project_id>:<trace_id>"`, the trace's hash tag content.
    pub fn project_and_trace(&self) -> String {
        crate::buffer::keys::project_and_trace(self.project_id, &self.trace_id)
    }

    /// The id this span is grouped under: its own id for a segment span, else the
    /// Relay-assigned segment id, else the parent id. An empty id counts as missing, as in
    /// Sentry's `segment_id or parent_span_id or span_id`.
    pub fn effective_parent_id(&self) -> &str {
        if self.is_segment_span {
            return &self.span_id;
        }
        [self.segment_id.as_deref(), self.parent_span_id.as_deref()]
            .into_iter()
            .flatten()
            .find(|id| !id.is_empty())
            .unwrap_or(&self.span_id)
    }
}

/// Where a decoded span's fields sit in its message bytes, so the span can be rebuilt
/// later without parsing the message again: the consumer validates each message in its decode
/// step and the buffer needs the same fields when it writes the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanLayout {
    trace_id: std::ops::Range<usize>,
    span_id: std::ops::Range<usize>,
    parent_span_id: Option<std::ops::Range<usize>>,
    segment_id: Option<std::ops::Range<usize>>,
    project_id: u64,
    organization_id: u64,
    is_segment_span: bool,
}

impl SpanLayout {
    /// The layout of `span`, or `None` when one of its ids is not a slice of its bytes (it was
    /// unescaped into a copy): such a span is decoded again when needed.
    pub fn of(span: &Span<'_>) -> Option<Self> {
        let range = |text: &Cow<'_, str>| match text {
            Cow::Borrowed(text) => {
                let start = (text.as_ptr() as usize).checked_sub(span.payload.as_ptr() as usize)?;
                let end = start + text.len();
                (end <= span.payload.len()).then_some(start..end)
            }
            Cow::Owned(_) => None,
        };
        let optional = |text: &Option<Cow<'_, str>>| match text {
            Some(text) => range(text).map(Some),
            None => Some(None),
        };
        Some(Self {
            trace_id: range(&span.trace_id)?,
            span_id: range(&span.span_id)?,
            parent_span_id: optional(&span.parent_span_id)?,
            segment_id: optional(&span.segment_id)?,
            project_id: span.project_id,
            organization_id: span.organization_id,
            is_segment_span: span.is_segment_span,
        })
    }

    /// The span these bytes decoded to, rebuilt from the layout; `None` if `payload` is not
    /// the message the layout was taken from.
    pub fn span<'a>(&self, payload: &'a [u8], partition: u16) -> Option<Span<'a>> {
        let text = |range: &std::ops::Range<usize>| {
            payload
                .get(range.clone())
                .and_then(|bytes| std::str::from_utf8(bytes).ok())
                .map(Cow::Borrowed)
        };
        let optional = |range: &Option<std::ops::Range<usize>>| match range {
            Some(range) => text(range).map(Some),
            None => Some(None),
        };
        Some(Span {
            trace_id: text(&self.trace_id)?,
            span_id: text(&self.span_id)?,
            parent_span_id: optional(&self.parent_span_id)?,
            segment_id: optional(&self.segment_id)?,
            project_id: self.project_id,
            organization_id: self.organization_id,
            is_segment_span: self.is_segment_span,
            partition,
            payload,
        })
    }
}

#[derive(Default)]
struct SpanFields<'a> {
    organization_id: Option<u64>,
    project_id: Option<u64>,
    trace_id: Option<Cow<'a, str>>,
    span_id: Option<Cow<'a, str>>,
    parent_span_id: Option<Cow<'a, str>>,
    is_segment: bool,
    segment_id: Option<Cow<'a, str>>,
    legacy_segment_id: Option<Cow<'a, str>>,
    start_timestamp: bool,
    end_timestamp: bool,
    received: bool,
    retention_days: bool,
    status: bool,
}

impl<'a> SpanFields<'a> {
    fn into_span(self, payload: &'a [u8], partition: u16) -> Result<Span<'a>, SpanError> {
        let present = [
            ("start_timestamp", self.start_timestamp),
            ("end_timestamp", self.end_timestamp),
            ("received", self.received),
            ("retention_days", self.retention_days),
            ("status", self.status),
        ];
        if let Some((field, _)) = present.iter().find(|(_, present)| !present) {
            return Err(SpanError::MissingField(field));
        }
        let parent_span_id = self.parent_span_id;
        let trace_id = self.trace_id.ok_or(SpanError::MissingField("trace_id"))?;
        // The trace id sits inside the `{<project>:<trace>}` hash tag of every key: a brace in
        // it would move keys of one trace to other cluster slots and fail the whole batch.
        if trace_id.contains(['{', '}']) {
            return Err(SpanError::InvalidField {
                field: "trace_id",
                reason: "contains a brace".to_owned(),
            });
        }
        let span_id = self.span_id.ok_or(SpanError::MissingField("span_id"))?;
        // An empty id names no node: it could not be told apart in the redirect map, and the
        // flush, which names spans by id, would never clean it up.
        if span_id.is_empty() {
            return Err(SpanError::InvalidField {
                field: "span_id",
                reason: "is empty".to_owned(),
            });
        }
        Ok(Span {
            trace_id,
            span_id,
            is_segment_span: parent_span_id.is_none() || self.is_segment,
            parent_span_id,
            // `""` names no segment: Sentry's truthiness test treats it as missing.
            segment_id: self
                .segment_id
                .filter(|id| !id.is_empty())
                .or(self.legacy_segment_id.filter(|id| !id.is_empty())),
            project_id: self
                .project_id
                .ok_or(SpanError::MissingField("project_id"))?,
            organization_id: self
                .organization_id
                .ok_or(SpanError::MissingField("organization_id"))?,
            partition,
            payload,
        })
    }
}

struct SpanSeed<'f> {
    failed_field: &'f mut Option<&'static str>,
}

impl<'de> DeserializeSeed<'de> for SpanSeed<'_> {
    type Value = SpanFields<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for SpanSeed<'_> {
    type Value = SpanFields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a span object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = SpanFields::default();
        let failed = self.failed_field;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            let mut value = |name: &'static str| {
                *failed = Some(name);
                name
            };
            match key.0.as_ref() {
                "organization_id" => {
                    value("organization_id");
                    fields.organization_id = Some(map.next_value()?);
                }
                "project_id" => {
                    value("project_id");
                    fields.project_id = Some(map.next_value()?);
                }
                "trace_id" => {
                    value("trace_id");
                    fields.trace_id = Some(map.next_value::<Text<'de>>()?.0);
                }
                "span_id" => {
                    value("span_id");
                    fields.span_id = Some(map.next_value::<Text<'de>>()?.0);
                }
                "parent_span_id" => {
                    value("parent_span_id");
                    fields.parent_span_id = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0);
                }
                "is_segment" => {
                    value("is_segment");
                    fields.is_segment = map.next_value::<Option<bool>>()?.unwrap_or(false);
                }
                "segment_id" => {
                    value("segment_id");
                    fields.legacy_segment_id = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0);
                }
                "attributes" => {
                    value("attributes.sentry.segment.id");
                    fields.segment_id = map
                        .next_value::<Option<Attributes<'de>>>()?
                        .and_then(|a| a.0);
                }
                "start_timestamp" => {
                    value("start_timestamp");
                    fields.start_timestamp = map.next_value::<Number>().map(|_| true)?;
                }
                "end_timestamp" => {
                    value("end_timestamp");
                    fields.end_timestamp = map.next_value::<Number>().map(|_| true)?;
                }
                "received" => {
                    value("received");
                    fields.received = map.next_value::<Number>().map(|_| true)?;
                }
                "retention_days" => {
                    value("retention_days");
                    fields.retention_days = map.next_value::<u16>().map(|_| true)?;
                }
                "status" => {
                    value("status");
                    fields.status = map.next_value::<Text<'de>>().map(|_| true)?;
                }
                "name" => {
                    value("name");
                    map.next_value::<Option<Text<'de>>>()?;
                }
                _ => {
                    *failed = None;
                    map.next_value::<IgnoredAny>()?;
                }
            }
            *failed = None;
        }
        Ok(fields)
    }
}

/// A JSON string, borrowed from the input unless it had escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// A finite JSON number (integers are accepted, as Python's float fields accept them).
struct Number;

impl<'de> serde::Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = <f64 as serde::Deserialize>::deserialize(deserializer)?;
        if value.is_finite() {
            Ok(Number)
        } else {
            Err(de::Error::custom("not a finite number"))
        }
    }
}

/// The `attributes` object, reduced to `sentry.segment.id`'s value.
struct Attributes<'a>(Option<Cow<'a, str>>);

impl<'de> serde::Deserialize<'de> for Attributes<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AttributesVisitor;
        impl<'de> Visitor<'de> for AttributesVisitor {
            type Value = Attributes<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an attributes object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut segment_id = None;
                while let Some(key) = map.next_key::<Text<'de>>()? {
                    if key.0 == "sentry.segment.id" {
                        segment_id = map
                            .next_value::<Option<Attribute<'de>>>()?
                            .and_then(|a| a.0);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Attributes(segment_id))
            }
        }
        deserializer.deserialize_map(AttributesVisitor)
    }
}

/// One `{type, value}` attribute, reduced to a string value.
struct Attribute<'a>(Option<Cow<'a, str>>);

impl<'de> serde::Deserialize<'de> for Attribute<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AttributeVisitor;
        impl<'de> Visitor<'de> for AttributeVisitor {
            type Value = Attribute<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an attribute object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut value = None;
                while let Some(key) = map.next_key::<Text<'de>>()? {
                    if key.0 == "value" {
                        value = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Attribute(value.filter(|v| !v.is_empty())))
            }
        }
        deserializer.deserialize_map(AttributeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"{"organization_id":1,"project_id":12,"trace_id":"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","span_id":"aaaaaaaaaaaaaaaa","parent_span_id":"cccccccccccccccc","start_timestamp":1699999999.0,"end_timestamp":1700000000,"received":1700000000.5,"retention_days":90,"name":"GET","status":"ok","attributes":{"other":{"type":"string","value":"x"}},"links":null}"#;

    #[test]
    fn a_layout_rebuilds_the_span_it_was_taken_from() {
        let span = Span::decode(VALID.as_bytes(), 3).unwrap();
        let layout = SpanLayout::of(&span).unwrap();

        assert_eq!(layout.span(VALID.as_bytes(), 3), Some(span));
    }

    #[test]
    fn an_escaped_id_has_no_layout() {
        let message = VALID.replace(
            r#""span_id":"aaaaaaaaaaaaaaaa""#,
            r#""span_id":"aaaaaaa\u0061aaaaaaaa""#,
        );
        let span = Span::decode(message.as_bytes(), 0).unwrap();

        assert_eq!(SpanLayout::of(&span), None);
    }

    fn with(field: &str, value: &str) -> String {
        let mut object: sonic_rs::Value = sonic_rs::from_str(VALID).unwrap();
        let value: sonic_rs::Value = sonic_rs::from_str(value).unwrap();
        use sonic_rs::JsonValueMutTrait;
        object.as_object_mut().unwrap().insert(field, value);
        sonic_rs::to_string(&object).unwrap()
    }

    fn without(field: &str) -> String {
        let mut object: sonic_rs::Value = sonic_rs::from_str(VALID).unwrap();
        use sonic_rs::JsonValueMutTrait;
        object.as_object_mut().unwrap().remove(&field);
        sonic_rs::to_string(&object).unwrap()
    }

    #[test]
    fn decodes_a_valid_span_borrowing_its_ids() {
        let span = Span::decode(VALID.as_bytes(), 3).unwrap();
        assert_eq!(span.span_id, "aaaaaaaaaaaaaaaa");
        assert!(matches!(span.span_id, Cow::Borrowed(_)));
        assert_eq!(span.parent_span_id.as_deref(), Some("cccccccccccccccc"));
        assert_eq!(span.project_id, 12);
        assert_eq!(span.organization_id, 1);
        assert_eq!(span.partition, 3);
        assert!(!span.is_segment_span);
        assert_eq!(span.payload, VALID.as_bytes());
        assert_eq!(
            span.project_and_trace(),
            "12:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
        );
    }

    #[test]
    fn a_span_without_parent_or_flagged_is_a_segment_span() {
        let is_segment = |json: String| Span::decode(json.as_bytes(), 0).unwrap().is_segment_span;
        assert!(is_segment(without("parent_span_id")));
        assert!(is_segment(with("parent_span_id", "null")));
        assert!(is_segment(with("is_segment", "true")));
        assert!(!is_segment(with("is_segment", "null")));
    }

    #[test]
    fn reads_the_segment_id_attribute() {
        let json = with(
            "attributes",
            r#"{"sentry.segment.id":{"type":"string","value":"dddddddddddddddd"}}"#,
        );
        let span = Span::decode(json.as_bytes(), 0).unwrap();
        assert_eq!(span.segment_id.as_deref(), Some("dddddddddddddddd"));
        assert_eq!(span.effective_parent_id(), "dddddddddddddddd");
        let null_attribute = with("attributes", r#"{"sentry.segment.id":null}"#);
        let null_span = Span::decode(null_attribute.as_bytes(), 0).unwrap();
        assert_eq!(null_span.segment_id, None);
        let null_attributes = with("attributes", "null");
        assert!(Span::decode(null_attributes.as_bytes(), 0).is_ok());
    }

    #[test]
    fn an_empty_or_null_segment_id_counts_as_missing() {
        for attributes in [
            r#"{"sentry.segment.id":{"type":"string","value":""}}"#,
            r#"{"sentry.segment.id":{"type":"string","value":null}}"#,
            r#"{"sentry.segment.id":{"type":"string"}}"#,
        ] {
            let json = with("attributes", attributes);
            let span = Span::decode(json.as_bytes(), 0).unwrap();

            assert_eq!(span.segment_id, None, "{attributes}");
            assert_eq!(
                span.effective_parent_id(),
                "cccccccccccccccc",
                "{attributes}"
            );
        }
        let legacy = with("segment_id", r#""""#);
        let span = Span::decode(legacy.as_bytes(), 0).unwrap();
        assert_eq!(span.segment_id, None);
        assert_eq!(span.effective_parent_id(), "cccccccccccccccc");
    }

    #[test]
    fn an_empty_parent_id_counts_as_missing_for_grouping() {
        let json = with("parent_span_id", r#""""#);
        let span = Span::decode(json.as_bytes(), 0).unwrap();

        // Not a segment span (Sentry tests `parent_span_id is None`), grouped under itself.
        assert!(!span.is_segment_span);
        assert_eq!(span.effective_parent_id(), "aaaaaaaaaaaaaaaa");
    }

    #[test]
    fn rejects_missing_required_fields_by_name() {
        for field in [
            "organization_id",
            "project_id",
            "trace_id",
            "span_id",
            "start_timestamp",
            "end_timestamp",
            "received",
            "retention_days",
            "status",
        ] {
            let json = without(field);
            let error = Span::decode(json.as_bytes(), 0).unwrap_err();
            assert_eq!(error, SpanError::MissingField(field), "{field}");
        }
        assert!(Span::decode(without("name").as_bytes(), 0).is_ok());
    }

    #[test]
    fn rejects_wrong_types_naming_the_field() {
        for (field, value) in [
            ("trace_id", "null"),
            ("span_id", "null"),
            ("end_timestamp", r#""1700000000""#),
            ("project_id", "-1"),
            ("organization_id", "1.5"),
            ("retention_days", r#""90""#),
            ("status", "3"),
            ("is_segment", r#""yes""#),
            ("parent_span_id", "7"),
        ] {
            let json = with(field, value);
            let error = Span::decode(json.as_bytes(), 0).unwrap_err();
            match error {
                SpanError::InvalidField { field: named, .. } => assert_eq!(named, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let json = with("attributes", r#"{"sentry.segment.id":{"value":5}}"#);
        let error = Span::decode(json.as_bytes(), 0).unwrap_err();
        assert!(
            error.to_string().contains("attributes.sentry.segment.id"),
            "{error}"
        );
    }

    #[test]
    fn rejects_a_trace_id_that_would_break_the_hash_tag() {
        for trace in [r#""a}b""#, r#""{a""#] {
            let json = with("trace_id", trace);
            let error = Span::decode(json.as_bytes(), 0).unwrap_err();
            assert!(
                matches!(
                    error,
                    SpanError::InvalidField {
                        field: "trace_id",
                        ..
                    }
                ),
                "{error}"
            );
        }
    }

    #[test]
    fn rejects_an_empty_span_id() {
        let error = Span::decode(with("span_id", "\"\"").as_bytes(), 0).unwrap_err();
        assert!(
            matches!(
                error,
                SpanError::InvalidField {
                    field: "span_id",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn rejects_non_objects() {
        assert!(Span::decode(b"{\"span_id\":", 0).is_err());
        for input in ["", "[]", "nope", "{} x"] {
            assert!(
                matches!(
                    Span::decode(input.as_bytes(), 0),
                    Err(SpanError::Malformed(_))
                ),
                "{input}"
            );
        }
    }

    #[test]
    fn rejects_bytes_that_are_not_utf8_anywhere_with_their_offset() {
        let unknown_field = VALID.replace(r#""links":null"#, "\"links\":\"a\u{0}b\"");
        let mut bytes = unknown_field.into_bytes();
        let at = bytes.iter().position(|&b| b == 0).unwrap();
        bytes[at] = 0xff;

        let error = Span::decode(&bytes, 0).unwrap_err();

        assert_eq!(
            error,
            SpanError::Malformed(format!("invalid utf-8 at byte {at}"))
        );
    }

    #[test]
    fn effective_parent_prefers_segment_id_then_parent_then_own_id() {
        let mut span = Span::decode(VALID.as_bytes(), 0).unwrap();
        span.segment_id = Some("c".into());
        span.parent_span_id = Some("b".into());
        assert_eq!(span.effective_parent_id(), "c");
        span.segment_id = None;
        assert_eq!(span.effective_parent_id(), "b");
        span.parent_span_id = None;
        assert_eq!(span.effective_parent_id(), "aaaaaaaaaaaaaaaa");
        span.parent_span_id = Some("b".into());
        span.segment_id = Some("c".into());
        span.is_segment_span = true;
        assert_eq!(span.effective_parent_id(), "aaaaaaaaaaaaaaaa");
    }
}
