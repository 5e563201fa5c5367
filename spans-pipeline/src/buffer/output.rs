//! The output side: write `is_segment` and `sentry.segment.id` into each span's JSON, and
//! wrap a segment's spans into `buffered-segments` messages.
//!
//! Spans are patched by copying the raw JSON text of every untouched field, so a span is
//! never fully parsed and re-serialized: only the top-level object and its `attributes` are
//! walked. Rules (Sentry's `_build_flushed_segments`): `is_segment` is always overwritten with
//! `span_id == segment span id`; `attributes` becomes `{}` first when missing or not an
//! object; `attributes["sentry.segment.id"]` is set to the segment span id only when missing
//! or falsy, never overwritten otherwise. Everything else is kept as it was.

use std::io::Write as _;

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
pub struct SpanPatcher<'s> {
    segment_span_id: &'s str,
    segment_attribute: String,
}

impl<'s> SpanPatcher<'s> {
    /// A patcher for the segment whose span id (or salt) is `segment_span_id`.
    pub fn new(segment_span_id: &'s str) -> Self {
        Self {
            segment_span_id,
            segment_attribute: segment_attribute(segment_span_id),
        }
    }

    /// Patches one stored payload; see [`patch_span`].
    pub fn patch(&self, payload: &[u8]) -> OutputSpan {
        match try_patch(payload, self.segment_span_id, &self.segment_attribute) {
            Some(span) => span,
            None => OutputSpan {
                span_id: String::new(),
                organization_id: None,
                is_segment: false,
                payload: payload.to_vec(),
            },
        }
    }
}

/// Top-level fields of a span as Relay writes it, with room to spare: the entries are
/// collected once per span, and growing the vector cost more than walking the JSON.
const USUAL_FIELDS: usize = 32;

fn try_patch(payload: &[u8], segment_span_id: &str, segment_attribute: &str) -> Option<OutputSpan> {
    let mut entries = Vec::with_capacity(USUAL_FIELDS);
    let mut span_id = None;
    let mut organization_id = None;
    for entry in sonic_rs::to_object_iter(payload) {
        let (key, value) = entry.ok()?;
        if key == "span_id" {
            span_id = value.as_str().map(str::to_owned);
        } else if key == "organization_id" {
            organization_id = value.as_u64();
        }
        entries.push((key, value));
    }
    let span_id = span_id.unwrap_or_default();
    let is_segment = !span_id.is_empty() && span_id == segment_span_id;

    let mut out = Vec::with_capacity(payload.len() + 96);
    out.push(b'{');
    let mut wrote_is_segment = false;
    let mut wrote_attributes = false;
    for (key, value) in &entries {
        if out.len() > 1 {
            out.push(b',');
        }
        write_key(&mut out, key);
        match key.as_ref() {
            "is_segment" => {
                wrote_is_segment = true;
                write_bool(&mut out, is_segment);
            }
            "attributes" => {
                wrote_attributes = true;
                write_attributes(&mut out, value.as_raw_str(), segment_attribute);
            }
            _ => out.extend_from_slice(value.as_raw_str().as_bytes()),
        }
    }
    if !wrote_is_segment {
        if out.len() > 1 {
            out.push(b',');
        }
        write_key(&mut out, "is_segment");
        write_bool(&mut out, is_segment);
    }
    if !wrote_attributes {
        out.push(b',');
        write_key(&mut out, "attributes");
        write_attributes(&mut out, "null", segment_attribute);
    }
    out.push(b'}');
    Some(OutputSpan {
        span_id,
        organization_id,
        is_segment,
        payload: out,
    })
}

fn segment_attribute(segment_span_id: &str) -> String {
    let value = sonic_rs::to_string(segment_span_id).unwrap_or_else(|_| "\"\"".to_owned());
    format!(r#"{{"type":"string","value":{value}}}"#)
}

fn write_key(out: &mut Vec<u8>, key: &str) {
    // Keys almost never need escaping; those are copied as they are.
    if !key.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        return;
    }
    match sonic_rs::to_string(key) {
        Ok(quoted) => out.extend_from_slice(quoted.as_bytes()),
        Err(_) => out.extend_from_slice(b"\"\""),
    }
    out.push(b':');
}

fn write_bool(out: &mut Vec<u8>, value: bool) {
    out.extend_from_slice(if value { b"true" } else { b"false" });
}

/// Writes `attributes` with `sentry.segment.id` filled in when missing or falsy.
fn write_attributes(out: &mut Vec<u8>, raw: &str, segment_attribute: &str) {
    out.push(b'{');
    let mut wrote_any = false;
    let mut has_segment_id = false;
    let is_object = raw.trim_start().starts_with('{');
    if is_object {
        for entry in sonic_rs::to_object_iter(raw) {
            let Ok((key, value)) = entry else { break };
            if wrote_any {
                out.push(b',');
            }
            wrote_any = true;
            write_key(out, &key);
            if key == SEGMENT_ID_ATTRIBUTE {
                has_segment_id = true;
                if is_falsy(value.as_raw_str()) {
                    out.extend_from_slice(segment_attribute.as_bytes());
                    continue;
                }
            }
            out.extend_from_slice(value.as_raw_str().as_bytes());
        }
    }
    if !has_segment_id {
        if wrote_any {
            out.push(b',');
        }
        write_key(out, SEGMENT_ID_ATTRIBUTE);
        out.extend_from_slice(segment_attribute.as_bytes());
    }
    out.push(b'}');
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
pub fn segment_messages<'s>(
    spans: impl Iterator<Item = &'s [u8]> + Clone,
    max_segment_bytes: u64,
) -> Vec<Vec<u8>> {
    let total: u64 = spans.clone().map(|span| span.len() as u64).sum();
    if max_segment_bytes == 0 || total <= max_segment_bytes {
        return vec![message(spans, false)];
    }
    let mut messages = Vec::new();
    let mut chunk: Vec<&[u8]> = Vec::new();
    let mut chunk_bytes = 0u64;
    for span in spans {
        let size = span.len() as u64;
        if !chunk.is_empty() && chunk_bytes + size > max_segment_bytes {
            messages.push(message(chunk.drain(..), true));
            chunk_bytes = 0;
        }
        chunk.push(span);
        chunk_bytes += size;
    }
    if !chunk.is_empty() {
        messages.push(message(chunk.into_iter(), true));
    }
    messages
}

fn message<'s>(spans: impl Iterator<Item = &'s [u8]>, skip_enrichment: bool) -> Vec<u8> {
    let mut out = Vec::new();
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
    fn flush_ids_differ_across_calls() {
        let a = messages(&[30], 1000);
        let b = messages(&[30], 1000);
        assert_ne!(a[0]["flush_id"].as_str(), b[0]["flush_id"].as_str());
    }
}
