//! Pre-processing of a batch: group spans into batch-local trees and cut them into
//! subsegments, one script call each.
//!
//! Spans arrive in any order. Within a batch, a span whose parent is also in the batch joins
//! the parent's tree, so the script merges a whole connected subtree in one call instead of
//! one call per span. Each tree is keyed by the parent of its top node (or by the root's own
//! id when the root is in the batch). A tree larger than `max_spans_per_evalsha` is split into
//! chunks sharing the parent, to bound how long one script call holds a Redis shard.

use std::collections::HashMap;

use blake2::Blake2b;
use blake2::digest::Digest;
use blake2::digest::consts::U16;

use crate::buffer::keys;
use crate::span::Span;

/// Spans of one project and trace, sharing a parent, written with one script call.
#[derive(Clone, Debug, PartialEq)]
pub struct Subsegment<'a> {
    /// `"<project_id>:<trace_id>"`.
    pub project_and_trace: String,
    /// The common parent (the root's own id when the root is in the subsegment).
    pub parent_span_id: String,
    /// The spans, in batch order.
    pub spans: Vec<&'a Span<'a>>,
    /// blake2b-128 hex of the concatenated span ids: names the payload key, deterministic so
    /// a replayed batch rewrites the same key.
    pub salt: String,
}

impl Subsegment<'_> {
    /// Sum of the uncompressed payload lengths.
    pub fn byte_count(&self) -> u64 {
        self.spans
            .iter()
            .map(|span| span.payload.len() as u64)
            .sum()
    }

    /// Whether a segment span (root) is among the spans.
    pub fn has_segment_span(&self) -> bool {
        self.spans.iter().any(|span| span.is_segment_span)
    }

    /// The flush queue shard: the Kafka partition of the first span.
    pub fn partition(&self) -> u16 {
        self.spans.first().map_or(0, |span| span.partition)
    }

    /// The span ids, in order.
    pub fn span_ids(&self) -> impl Iterator<Item = &str> {
        self.spans.iter().map(|span| span.span_id.as_ref())
    }

    /// The payload key this subsegment's payloads are written to.
    pub fn payload_key(&self) -> String {
        keys::payload(&self.project_and_trace, &self.salt)
    }

    /// The segment key of the subsegment's parent (where the legacy merged layout writes).
    pub fn parent_segment_key(&self) -> keys::SegmentKey {
        keys::SegmentKey::new(&self.project_and_trace, &self.parent_span_id)
    }
}

/// `blake2b(concat(span ids), digest_size=16)` as 32 lowercase hex characters.
pub(super) fn salt<'s>(span_ids: impl IntoIterator<Item = &'s str>) -> String {
    let mut hasher = Blake2b::<U16>::new();
    for span_id in span_ids {
        hasher.update(span_id.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// Groups a batch into maximal batch-local trees, in order of first appearance.
///
/// Returns `(project_and_trace, parent, spans)` per tree.
pub(super) fn group_by_parent<'a>(
    spans: &'a [Span<'a>],
) -> Vec<(String, String, Vec<&'a Span<'a>>)> {
    // Trees are keyed by (index of the interned "<project>:<trace>", parent id).
    type TreeKey<'k> = (usize, &'k str);
    let mut traces: Vec<String> = Vec::new();
    let mut trace_index: HashMap<String, usize> = HashMap::new();
    let mut trees: Vec<Option<(TreeKey<'a>, Vec<&'a Span<'a>>)>> = Vec::new();
    let mut tree_index: HashMap<TreeKey<'a>, usize> = HashMap::new();
    let mut redirects: HashMap<TreeKey<'a>, &'a str> = HashMap::new();

    for span in spans {
        let pt = span.project_and_trace();
        let trace = match trace_index.get(&pt) {
            Some(&index) => index,
            None => {
                traces.push(pt.clone());
                trace_index.insert(pt, traces.len() - 1);
                traces.len() - 1
            }
        };
        let mut parent = span.effective_parent_id();
        // Batch-local redirects never form cycles; the bound only guards that invariant.
        for _ in 0..=spans.len() {
            match redirects.get(&(trace, parent)) {
                Some(&next) => parent = next,
                None => break,
            }
        }
        let index = *tree_index.entry((trace, parent)).or_insert_with(|| {
            trees.push(Some(((trace, parent), Vec::new())));
            trees.len() - 1
        });
        let span_id = span.span_id.as_ref();
        let moved = if parent == span_id {
            None
        } else {
            redirects.insert((trace, span_id), parent);
            tree_index
                .remove(&(trace, span_id))
                .and_then(|moved| trees[moved].take())
        };
        if let Some((_, tree)) = trees[index].as_mut() {
            tree.push(span);
            if let Some((_, moved_spans)) = moved {
                tree.extend(moved_spans);
            }
        }
    }
    trees
        .into_iter()
        .flatten()
        .map(|((trace, parent), spans)| (traces[trace].clone(), parent.to_owned(), spans))
        .collect()
}

/// Builds the subsegments of a batch, splitting trees into chunks of at most
/// `max_spans_per_evalsha` spans (0 = no split).
pub fn build_subsegments<'a>(
    spans: &'a [Span<'a>],
    max_spans_per_evalsha: usize,
) -> Vec<Subsegment<'a>> {
    let mut subsegments = Vec::new();
    for (project_and_trace, parent_span_id, tree) in group_by_parent(spans) {
        let chunk_size = if max_spans_per_evalsha == 0 {
            tree.len().max(1)
        } else {
            max_spans_per_evalsha
        };
        for chunk in tree.chunks(chunk_size) {
            subsegments.push(Subsegment {
                project_and_trace: project_and_trace.clone(),
                parent_span_id: parent_span_id.clone(),
                salt: salt(chunk.iter().map(|span| span.span_id.as_ref())),
                spans: chunk.to_vec(),
            });
        }
    }
    subsegments
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span<'a>(id: &'a str, parent: Option<&'a str>, payload: &'a str) -> Span<'a> {
        Span {
            trace_id: "t".into(),
            span_id: id.into(),
            parent_span_id: parent.map(Into::into),
            segment_id: None,
            project_id: 1,
            organization_id: 1,
            is_segment_span: parent.is_none(),
            partition: 3,
            payload: payload.as_bytes(),
        }
    }

    fn ids(subsegment: &Subsegment<'_>) -> Vec<String> {
        subsegment.span_ids().map(str::to_owned).collect()
    }

    #[test]
    fn groups_a_batch_into_connected_subtrees() {
        // d → b, b → a (root), c → a, e → x (parent outside the batch).
        let spans = [
            span("d", Some("b"), "{}"),
            span("b", Some("a"), "{}"),
            span("a", None, "{}"),
            span("c", Some("a"), "{}"),
            span("e", Some("x"), "{}"),
        ];
        let subsegments = build_subsegments(&spans, 0);
        assert_eq!(subsegments.len(), 2);
        assert_eq!(subsegments[0].parent_span_id, "a");
        assert_eq!(ids(&subsegments[0]), ["b", "d", "a", "c"]);
        assert!(subsegments[0].has_segment_span());
        assert_eq!(subsegments[1].parent_span_id, "x");
        assert_eq!(ids(&subsegments[1]), ["e"]);
        assert!(!subsegments[1].has_segment_span());
    }

    #[test]
    fn keeps_parent_metadata_when_chunking() {
        let spans = [
            span("a", Some("f"), "{}"),
            span("b", Some("f"), "{}"),
            span("c", Some("f"), "{}"),
        ];
        let subsegments = build_subsegments(&spans, 2);
        let chunks: Vec<Vec<String>> = subsegments.iter().map(ids).collect();
        assert_eq!(chunks, [vec!["a", "b"], vec!["c"]]);
        assert!(subsegments.iter().all(|s| s.parent_span_id == "f"));
        assert_ne!(subsegments[0].salt, subsegments[1].salt);
    }

    #[test]
    fn exposes_span_metadata() {
        let spans = [span("a", Some("b"), "12345"), span("c", Some("b"), "678")];
        let subsegments = build_subsegments(&spans, 0);
        let subsegment = &subsegments[0];
        assert_eq!(subsegment.byte_count(), 8);
        assert_eq!(subsegment.partition(), 3);
        assert!(!subsegment.has_segment_span());
        assert_eq!(subsegment.project_and_trace, "1:t");
        assert_eq!(
            subsegment.payload_key(),
            format!("span-buf:s:{{1:t:{0}}}:{0}", subsegment.salt)
        );
        assert_eq!(
            subsegment.parent_segment_key().as_str(),
            "span-buf:s:{1:t}:b"
        );
    }

    #[test]
    fn salt_is_blake2b_128_of_the_concatenated_ids() {
        // python3 -c "import hashlib; print(hashlib.blake2b(b'ab', digest_size=16).hexdigest())"
        assert_eq!(salt(["a", "b"]), "3dc9ae220222e2e156b2a5abb60d01c7");
        assert_eq!(salt(["ab"]), salt(["a", "b"]));
    }

    #[test]
    fn traces_and_projects_never_share_a_tree() {
        let mut other_project = span("b", Some("a"), "{}");
        other_project.project_id = 2;
        let spans = [span("a", None, "{}"), other_project];
        assert_eq!(build_subsegments(&spans, 0).len(), 2);
    }
}
