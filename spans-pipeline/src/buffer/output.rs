//! The output side: write `is_segment` and `sentry.segment.id` into each span's JSON, and
//! wrap a segment's spans into `buffered-segments` messages.
//!
//! A span is patched by editing its stored bytes, never by parsing and re-serializing it: one
//! pass over the top-level object (and its `attributes`) finds where the edits go, and the
//! output is the payload copied in a few large slices with the edits in between, so every
//! untouched byte (field order, number formatting, escapes, whitespace) is kept as it was.
//! Rules (Sentry's `_build_flushed_segments`): `is_segment` is always overwritten with
//! `span_id == segment span id` (added when missing); `attributes` becomes an object first when
//! missing or not an object; `attributes["sentry.segment.id"]` is set to the segment span id
//! only when missing or falsy, never overwritten otherwise.

use std::borrow::Cow;
use std::io::Write as _;
use std::ops::Range;

use sonic_rs::JsonValueTrait;

use crate::buffer::segment::OutputSpan;

const SEGMENT_ID_ATTRIBUTE: &str = "sentry.segment.id";

/// Patches one stored payload for output in the segment whose span id is `segment_span_id`.
///
/// A payload that is not a JSON object is passed through unchanged with `is_segment` false.
pub fn patch_span(payload: &[u8], segment_span_id: &str) -> OutputSpan {
    SpanPatcher::new(segment_span_id).patch(payload)
}

/// Patches the spans of one segment; the segment id attribute is rendered once.
#[derive(Debug)]
pub(crate) struct SpanPatcher<'s> {
    segment_span_id: &'s str,
    segment_attribute: String,
}

impl<'s> SpanPatcher<'s> {
    /// A patcher for the segment whose span id (or salt) is `segment_span_id`.
    pub(crate) fn new(segment_span_id: &'s str) -> Self {
        Self {
            segment_span_id,
            segment_attribute: segment_attribute(segment_span_id),
        }
    }

    /// Patches one stored payload; see [`patch_span`].
    pub(crate) fn patch(&self, payload: &[u8]) -> OutputSpan {
        self.patch_object(payload).unwrap_or_else(|| OutputSpan {
            span_id: String::new(),
            organization_id: None,
            is_segment: false,
            payload: payload.to_vec(),
        })
    }

    /// Patches one stored payload if it is a JSON object; `None` for anything else, which
    /// must not be produced (every reader downstream expects each span to be an object).
    pub(crate) fn patch_object(&self, payload: &[u8]) -> Option<OutputSpan> {
        let edits = Edits::find(payload)?;
        // The walk above stops at the object's closing brace and does not look past it; a
        // whole-document parse also refuses trailing bytes.
        sonic_rs::from_slice::<serde::de::IgnoredAny>(payload).ok()?;
        Some(edits.apply(payload, self))
    }
}

/// One change to the payload's bytes: `range` (empty for an insertion) becomes `text`.
#[derive(Debug)]
struct Edit {
    range: Range<usize>,
    text: EditText,
}

#[derive(Debug, Clone, Copy)]
enum EditText {
    /// The `is_segment` value: `true` or `false`.
    IsSegment,
    /// The segment id attribute value, in place of a falsy one.
    SegmentIdValue,
    /// A `"sentry.segment.id"` entry inserted at the end of a non-empty `attributes` object.
    SegmentIdEntryAfterOthers,
    /// A `"sentry.segment.id"` entry as the only one of an empty `attributes` object.
    SegmentIdEntry,
    /// An `attributes` object holding only the segment id, in place of a non-object.
    AttributesObject,
}

/// What one pass over a span's JSON found: the fields the output needs and the edits, in
/// payload order.
#[derive(Debug)]
struct Edits {
    span_id: Option<String>,
    organization_id: Option<u64>,
    edits: Vec<Edit>,
    /// Where the top-level object's closing brace is (fields missing entirely go there).
    closing_brace: usize,
    has_is_segment: bool,
    has_attributes: bool,
    has_fields: bool,
}

impl Edits {
    /// Walks the top-level object; `None` when the payload is not a JSON object.
    fn find(payload: &[u8]) -> Option<Self> {
        let closing_brace = payload.iter().rposition(|b| !b.is_ascii_whitespace())?;
        if payload[closing_brace] != b'}' {
            return None;
        }
        let mut found = Self {
            span_id: None,
            organization_id: None,
            edits: Vec::new(),
            closing_brace,
            has_is_segment: false,
            has_attributes: false,
            has_fields: false,
        };
        for entry in sonic_rs::to_object_iter(payload) {
            let (key, value) = entry.ok()?;
            found.has_fields = true;
            match key.as_ref() {
                "span_id" => found.span_id = value.as_str().map(str::to_owned),
                "organization_id" => found.organization_id = value.as_u64(),
                "is_segment" => {
                    found.has_is_segment = true;
                    let range = range_in(payload, value.as_raw_cow())?;
                    found.edits.push(Edit {
                        range,
                        text: EditText::IsSegment,
                    });
                }
                "attributes" => {
                    found.has_attributes = true;
                    let raw = value.as_raw_cow();
                    let range = range_in(payload, raw.clone())?;
                    found.find_attribute_edits(payload, &raw, range)?;
                }
                _ => {}
            }
        }
        Some(found)
    }

    /// The edits inside one `attributes` value at `range` of the payload.
    fn find_attribute_edits(
        &mut self,
        payload: &[u8],
        raw: &str,
        range: Range<usize>,
    ) -> Option<()> {
        if !raw.starts_with('{') {
            self.edits.push(Edit {
                range,
                text: EditText::AttributesObject,
            });
            return Some(());
        }
        let mut has_entries = false;
        let mut has_segment_id = false;
        for entry in sonic_rs::to_object_iter(raw) {
            let (key, value) = entry.ok()?;
            has_entries = true;
            if key == SEGMENT_ID_ATTRIBUTE {
                has_segment_id = true;
                let value = value.as_raw_cow();
                if !has_truthy_value(&value) {
                    self.edits.push(Edit {
                        range: range_in(payload, value)?,
                        text: EditText::SegmentIdValue,
                    });
                }
            }
        }
        if !has_segment_id {
            // Before the object's closing brace (the raw value ends with it).
            let at = range.end - 1;
            self.edits.push(Edit {
                range: at..at,
                text: if has_entries {
                    EditText::SegmentIdEntryAfterOthers
                } else {
                    EditText::SegmentIdEntry
                },
            });
        }
        Some(())
    }

    fn apply(self, payload: &[u8], patcher: &SpanPatcher<'_>) -> OutputSpan {
        let span_id = self.span_id.unwrap_or_default();
        let is_segment = !span_id.is_empty() && span_id == patcher.segment_span_id;
        let mut out = Vec::with_capacity(payload.len() + 96);
        let mut copied = 0;
        for edit in &self.edits {
            out.extend_from_slice(&payload[copied..edit.range.start]);
            write_edit(&mut out, edit.text, is_segment, &patcher.segment_attribute);
            copied = edit.range.end;
        }
        out.extend_from_slice(&payload[copied..self.closing_brace]);
        let mut has_fields = self.has_fields;
        if !self.has_is_segment {
            if has_fields {
                out.push(b',');
            }
            has_fields = true;
            out.extend_from_slice(b"\"is_segment\":");
            write_edit(
                &mut out,
                EditText::IsSegment,
                is_segment,
                &patcher.segment_attribute,
            );
        }
        if !self.has_attributes {
            if has_fields {
                out.push(b',');
            }
            out.extend_from_slice(b"\"attributes\":");
            write_edit(
                &mut out,
                EditText::AttributesObject,
                is_segment,
                &patcher.segment_attribute,
            );
        }
        out.extend_from_slice(&payload[self.closing_brace..]);
        OutputSpan {
            span_id,
            organization_id: self.organization_id,
            is_segment,
            payload: out,
        }
    }
}

fn write_edit(out: &mut Vec<u8>, text: EditText, is_segment: bool, segment_attribute: &str) {
    const ENTRY: &[u8] = b"\"sentry.segment.id\":";
    match text {
        EditText::IsSegment => {
            out.extend_from_slice(if is_segment { b"true" } else { b"false" });
        }
        EditText::SegmentIdValue => out.extend_from_slice(segment_attribute.as_bytes()),
        EditText::SegmentIdEntryAfterOthers => {
            out.push(b',');
            out.extend_from_slice(ENTRY);
            out.extend_from_slice(segment_attribute.as_bytes());
        }
        EditText::SegmentIdEntry => {
            out.extend_from_slice(ENTRY);
            out.extend_from_slice(segment_attribute.as_bytes());
        }
        EditText::AttributesObject => {
            out.push(b'{');
            out.extend_from_slice(ENTRY);
            out.extend_from_slice(segment_attribute.as_bytes());
            out.push(b'}');
        }
    }
}

/// Where a value's raw text lies in the payload it was parsed from. Values parsed from a byte
/// slice borrow from it, so this is always `Some` for them; an owned copy has no position.
fn range_in(payload: &[u8], raw: Cow<'_, str>) -> Option<Range<usize>> {
    let Cow::Borrowed(raw) = raw else {
        return None;
    };
    let start = (raw.as_ptr() as usize).checked_sub(payload.as_ptr() as usize)?;
    let end = start.checked_add(raw.len())?;
    (end <= payload.len()).then_some(start..end)
}

fn segment_attribute(segment_span_id: &str) -> String {
    let value = sonic_rs::to_string(segment_span_id).unwrap_or_else(|_| "\"\"".to_owned());
    format!(r#"{{"type":"string","value":{value}}}"#)
}

/// Whether an attribute carries a truthy `value`, as Sentry's `attribute_value` reads it: an
/// attribute that is not an object, has no `value`, or a falsy one (`null`, `""`) counts as
/// missing, and the segment's id is written in its place.
fn has_truthy_value(attribute: &str) -> bool {
    let mut value = None;
    for entry in sonic_rs::to_object_iter(attribute) {
        let Ok((key, raw)) = entry else {
            return false;
        };
        if key == "value" {
            // The last occurrence wins, as in a Python dict.
            value = Some(raw.as_raw_cow().into_owned());
        }
    }
    value.is_some_and(|raw| !is_falsy(&raw))
}

/// Python truthiness of a JSON value: `null`, `false`, `0`, `""`, `[]` and `{}` are falsy.
fn is_falsy(raw: &str) -> bool {
    let compact: String = raw.chars().filter(|c| !c.is_whitespace()).collect();
    matches!(
        compact.as_str(),
        "null" | "false" | "0" | "0.0" | "\"\"" | "[]" | "{}"
    )
}

/// Builds the messages of one segment; see [`crate::buffer::FlushedSegment::to_messages`].
pub(crate) fn segment_messages<'s>(
    spans: impl Iterator<Item = &'s [u8]> + Clone,
    max_segment_bytes: u64,
) -> Vec<Vec<u8>> {
    let spans: Vec<&[u8]> = spans.collect();
    segment_chunk_messages(&spans, max_segment_bytes)
        .into_iter()
        .map(|(_, message)| message)
        .collect()
}

/// The messages of [`segment_messages`], each with the range of `spans` it holds, so that a
/// message refused for its size can be cut again.
pub(crate) fn segment_chunk_messages(
    spans: &[&[u8]],
    max_segment_bytes: u64,
) -> Vec<(Range<usize>, Vec<u8>)> {
    let skip_enrichment = is_oversized(spans, max_segment_bytes);
    segment_chunks(spans, max_segment_bytes)
        .into_iter()
        .map(|chunk| {
            let message = chunk_message(&spans[chunk.clone()], skip_enrichment);
            (chunk, message)
        })
        .collect()
}

/// How the spans of one segment are cut into messages: the whole segment when its spans add up
/// to at most `max_segment_bytes` (or the limit is 0), else greedy chunks in order, a chunk
/// ending before the span that would take it over the limit (a bigger span alone), as Sentry's
/// `to_messages` does. An oversized segment always gives several chunks or one single-span
/// chunk marked `skip_enrichment`; see [`segment_messages`].
pub(crate) fn segment_chunks(spans: &[&[u8]], max_segment_bytes: u64) -> Vec<Range<usize>> {
    if !is_oversized(spans, max_segment_bytes) {
        return std::iter::once(0..spans.len()).collect();
    }
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut chunk_bytes = 0u64;
    for (index, span) in spans.iter().enumerate() {
        let size = span.len() as u64;
        if index > start && chunk_bytes + size > max_segment_bytes {
            chunks.push(start..index);
            start = index;
            chunk_bytes = 0;
        }
        chunk_bytes += size;
    }
    if start < spans.len() {
        chunks.push(start..spans.len());
    }
    chunks
}

/// Whether the spans add up to more than a non-zero `max_segment_bytes`.
fn is_oversized(spans: &[&[u8]], max_segment_bytes: u64) -> bool {
    let total: u64 = spans.iter().map(|span| span.len() as u64).sum();
    max_segment_bytes != 0 && total > max_segment_bytes
}

/// Bytes a message of spans adding up to `span_bytes` can take beyond them: a comma per span
/// (every output span is longer than 64 bytes: it carries at least `is_segment` and the segment
/// id attribute) and the envelope (`flush_id`, `spans`, `skip_enrichment`).
pub(crate) fn message_overhead(span_bytes: u64) -> u64 {
    span_bytes / 64 + 128
}

/// One `{"flush_id", "spans"}` message of `spans`, with `"skip_enrichment": true` when it holds
/// only part of its segment; a fresh `flush_id` each call.
pub(crate) fn chunk_message(spans: &[&[u8]], skip_enrichment: bool) -> Vec<u8> {
    message(spans.iter().copied(), skip_enrichment)
}

fn message<'s>(spans: impl Iterator<Item = &'s [u8]> + Clone, skip_enrichment: bool) -> Vec<u8> {
    let size: usize = spans.clone().map(|span| span.len() + 1).sum();
    let mut out = Vec::with_capacity(size + 80);
    let flush_id = uuid::Uuid::new_v4().simple();
    let _ = write!(out, r#"{{"flush_id":"{flush_id}","spans":["#);
    for (i, span) in spans.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(span);
    }
    out.push(b']');
    if skip_enrichment {
        out.extend_from_slice(br#","skip_enrichment":true"#);
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use sonic_rs::JsonContainerTrait;

    use super::*;

    fn patched(payload: &str, segment: &str) -> sonic_rs::Value {
        let span = patch_span(payload.as_bytes(), segment);
        sonic_rs::from_slice(&span.payload).unwrap()
    }

    #[test]
    fn only_json_objects_are_patched() {
        let patcher = SpanPatcher::new("a");
        for garbage in [
            &b"not json"[..],
            b"[1,2]",
            b"\"text\"",
            b"",
            br#"{"span_id":"a""#,
            br#"{"span_id":"a"}}"#,
            br#"{"span_id":"a"} {"b":1}"#,
            br#"{"span_id":tru}"#,
            br#"{"span_id":"a","x":[1,2}"#,
            br#"{"span_id":"a","x":{"y":}}"#,
            b"{\"span_id\":\"\xff\"}",
            br#"garbage}"#,
        ] {
            assert!(
                patcher.patch_object(garbage).is_none(),
                "{}",
                garbage.escape_ascii()
            );
        }
        for object in [&b"{}"[..], br#" {"span_id":"a","x":{"y":[1,{"z":null}]}} "#] {
            let patched = patcher.patch_object(object).unwrap();
            let value: sonic_rs::Value = sonic_rs::from_slice(&patched.payload).unwrap();
            assert!(value.is_object());
        }
    }

    #[test]
    fn marks_the_root_and_adds_the_segment_id() {
        let root = patched(r#"{"span_id":"b","is_segment":false,"x":[1, 2]}"#, "b");
        assert_eq!(root["is_segment"].as_bool(), Some(true));
        assert_eq!(root["x"].as_array().unwrap().len(), 2);
        assert_eq!(
            root["attributes"]["sentry.segment.id"]["value"].as_str(),
            Some("b")
        );
        assert_eq!(
            root["attributes"]["sentry.segment.id"]["type"].as_str(),
            Some("string")
        );
        let child = patched(r#"{"span_id":"a"}"#, "b");
        assert_eq!(child["is_segment"].as_bool(), Some(false));
        assert_eq!(
            child["attributes"]["sentry.segment.id"]["value"].as_str(),
            Some("b")
        );
    }

    #[test]
    fn is_segment_is_always_overwritten() {
        let flagged_child = patched(r#"{"span_id":"a","is_segment":true}"#, "b");
        assert_eq!(flagged_child["is_segment"].as_bool(), Some(false));
    }

    #[test]
    fn replaces_null_or_non_object_attributes() {
        for attributes in ["null", "[]", "3", r#""x""#] {
            let span = patched(
                &format!(r#"{{"span_id":"b","attributes":{attributes}}}"#),
                "b",
            );
            assert_eq!(
                span["attributes"]["sentry.segment.id"]["value"].as_str(),
                Some("b"),
                "{attributes}"
            );
        }
    }

    #[test]
    fn never_overwrites_an_existing_segment_id_but_fills_a_falsy_one() {
        let kept = patched(
            r#"{"span_id":"a","attributes":{"k":{"type":"string","value":"v"},"sentry.segment.id":{"type":"string","value":"c"}}}"#,
            "b",
        );
        assert_eq!(
            kept["attributes"]["sentry.segment.id"]["value"].as_str(),
            Some("c")
        );
        assert_eq!(kept["attributes"]["k"]["value"].as_str(), Some("v"));
        let filled = patched(
            r#"{"span_id":"a","attributes":{"sentry.segment.id":null}}"#,
            "b",
        );
        assert_eq!(
            filled["attributes"]["sentry.segment.id"]["value"].as_str(),
            Some("b")
        );
    }

    #[test]
    fn a_segment_id_attribute_with_an_empty_or_null_value_is_filled() {
        for attribute in [
            r#"{"type":"string","value":""}"#,
            r#"{"type":"string","value":null}"#,
            r#"{"type":"string"}"#,
            r#""dddddddddddddddd""#,
            "{}",
        ] {
            let span = patched(
                &format!(
                    r#"{{"span_id":"a","attributes":{{"sentry.segment.id":{attribute},"k":1}}}}"#
                ),
                "b",
            );

            assert_eq!(
                span["attributes"]["sentry.segment.id"]["value"].as_str(),
                Some("b"),
                "{attribute}"
            );
            assert_eq!(span["attributes"]["k"].as_u64(), Some(1), "{attribute}");
        }
    }

    #[test]
    fn preserves_every_other_field_verbatim() {
        let input =
            r#"{"span_id":"a","name":"caf\u00e9 \"q\"","n":1.50,"links":null,"_meta":{"x":{}}}"#;
        let span = patch_span(input.as_bytes(), "b");
        let text = String::from_utf8(span.payload).unwrap();
        assert!(text.contains(r#""name":"caf\u00e9 \"q\"""#), "{text}");
        assert!(text.contains(r#""n":1.50"#), "{text}");
        assert!(text.contains(r#""_meta":{"x":{}}"#), "{text}");
    }

    #[test]
    fn keeps_the_stored_bytes_and_edits_only_what_changes() {
        let input =
            r#"{ "span_id" : "b", "is_segment":false , "attributes": {"k": 1 } , "n": 1e3 }"#;
        let span = patch_span(input.as_bytes(), "b");
        assert_eq!(
            String::from_utf8(span.payload).unwrap(),
            r#"{ "span_id" : "b", "is_segment":true , "attributes": {"k": 1 ,"sentry.segment.id":{"type":"string","value":"b"}} , "n": 1e3 }"#
        );
        let bare = patch_span(br#"{"span_id":"a"}"#, "b");
        assert_eq!(
            String::from_utf8(bare.payload).unwrap(),
            r#"{"span_id":"a","is_segment":false,"attributes":{"sentry.segment.id":{"type":"string","value":"b"}}}"#
        );
        let empty = patch_span(b"{}", "b");
        assert_eq!(
            String::from_utf8(empty.payload).unwrap(),
            r#"{"is_segment":false,"attributes":{"sentry.segment.id":{"type":"string","value":"b"}}}"#
        );
        let empty_attributes =
            patch_span(br#"{"span_id":"a","is_segment":true,"attributes":{}}"#, "b");
        assert_eq!(
            String::from_utf8(empty_attributes.payload).unwrap(),
            r#"{"span_id":"a","is_segment":false,"attributes":{"sentry.segment.id":{"type":"string","value":"b"}}}"#
        );
    }

    #[test]
    fn every_occurrence_of_a_repeated_field_is_patched() {
        let span = patched(
            r#"{"span_id":"a","is_segment":true,"is_segment":true,"attributes":{"sentry.segment.id":""}}"#,
            "b",
        );
        let text = span.to_string();
        assert_eq!(text.matches(r#""is_segment":false"#).count(), 2, "{text}");
        assert_eq!(
            span["attributes"]["sentry.segment.id"]["value"].as_str(),
            Some("b")
        );
    }

    #[test]
    fn a_non_object_payload_passes_through() {
        let span = patch_span(b"not json", "b");
        assert_eq!(span.payload, b"not json");
        assert!(!span.is_segment);
    }

    fn messages(sizes: &[usize], limit: u64) -> Vec<sonic_rs::Value> {
        let spans: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let pad = "x".repeat(size.saturating_sub(14));
                format!(r#"{{"i":{i},"p":"{pad}"}}"#).into_bytes()
            })
            .collect();
        segment_messages(spans.iter().map(Vec::as_slice), limit)
            .iter()
            .map(|m| sonic_rs::from_slice(m).unwrap())
            .collect()
    }

    #[test]
    fn a_segment_under_the_limit_is_one_message() {
        let out = messages(&[50, 50], 10_000);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["spans"].as_array().unwrap().len(), 2);
        assert!(out[0].get("skip_enrichment").is_none());
        assert_eq!(out[0]["flush_id"].as_str().unwrap().len(), 32);
    }

    #[test]
    fn an_oversized_segment_is_chunked_in_order_with_fresh_flush_ids() {
        let out = messages(&[128; 5], 500);
        let counts: Vec<usize> = out
            .iter()
            .map(|m| m["spans"].as_array().unwrap().len())
            .collect();
        assert_eq!(counts, [3, 2]);
        let order: Vec<u64> = out
            .iter()
            .flat_map(|m| {
                m["spans"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["i"].as_u64().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(order, [0, 1, 2, 3, 4]);
        assert!(
            out.iter()
                .all(|m| m["skip_enrichment"].as_bool() == Some(true))
        );
        assert_ne!(out[0]["flush_id"].as_str(), out[1]["flush_id"].as_str());
    }

    #[test]
    fn a_single_large_span_is_one_skip_enrichment_message() {
        let out = messages(&[100], 10);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["skip_enrichment"].as_bool(), Some(true));
    }

    #[test]
    fn chunk_ranges_cover_every_span_once_in_order() {
        let spans: Vec<Vec<u8>> = [128, 128, 600, 128, 128, 128]
            .iter()
            .map(|&size| vec![b'x'; size])
            .collect();
        let spans: Vec<&[u8]> = spans.iter().map(Vec::as_slice).collect();

        assert_eq!(segment_chunks(&spans, 500), [0..2, 2..3, 3..6]);
        let whole = std::iter::once(0..6).collect::<Vec<_>>();
        assert_eq!(segment_chunks(&spans, 0), whole);
        assert_eq!(segment_chunks(&spans, 10_000), whole);
        let messages = segment_chunk_messages(&spans, 10_000);
        assert_eq!(messages.len(), 1);
        assert!(messages[0].1.len() as u64 <= 1240 + message_overhead(1240));
    }

    #[test]
    fn flush_ids_differ_across_calls() {
        let a = messages(&[30], 1000);
        let b = messages(&[30], 1000);
        assert_ne!(a[0]["flush_id"].as_str(), b[0]["flush_id"].as_str());
    }
}
