//! Redis key layout of the spans buffer, byte for byte the layout of Sentry's buffer.
//!
//! A deployment must be able to hand a live Redis over between Sentry's consumer and this one,
//! so every shape here is fixed. Every key of a trace embeds the hash tag
//! `{<project_id>:<trace_id>}`, so one script call touches one Redis Cluster slot; payload keys
//! add the salt to the tag (`{<pt>:<salt>}`) so a big trace's bytes spread over the nodes;
//! queue keys carry no tag (one slot per queue). Change a shape here and in
//! `lua/add-buffer.lua` in the same commit.

use std::fmt;

/// Prefix shared by every key of the buffer.
pub const PREFIX: &str = "span-buf:";

/// `"<project_id>:<trace_id>"`, the script's `KEYS[1]` and the inside of the trace hash tag.
pub fn project_and_trace(project_id: u64, trace_id: &str) -> String {
    format!("{project_id}:{trace_id}")
}

/// The identifier of a segment: `span-buf:s:{<pt>}:<root span id or salt>`.
///
/// No value is stored under it in the distributed layout; it is the queue member and the
/// suffix of the per-segment metadata keys. The legacy merged layout stores the segment's
/// payload set under it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentKey(String);

impl SegmentKey {
    /// The segment rooted at `span_id` (or named by a salt) in trace `pt`.
    pub fn new(project_and_trace: &str, span_id: &str) -> Self {
        Self(format!("{PREFIX}s:{{{project_and_trace}}}:{span_id}"))
    }

    /// Wraps a key read back from Redis; `None` if it does not have the segment key shape.
    pub fn parse(key: impl Into<String>) -> Option<Self> {
        let key = Self(key.into());
        if key.parts().is_some() {
            Some(key)
        } else {
            None
        }
    }

    /// The key text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `(pt, span id or salt)`.
    fn parts(&self) -> Option<(&str, &str)> {
        let rest = self.0.strip_prefix(PREFIX)?.strip_prefix("s:{")?;
        let (project_and_trace, id) = rest.split_once("}:")?;
        Some((project_and_trace, id))
    }

    /// `"<project_id>:<trace_id>"`.
    pub fn project_and_trace(&self) -> &str {
        self.parts().map_or("", |(pt, _)| pt)
    }

    /// The project id embedded in the key (0 if it is not a number).
    pub fn project_id(&self) -> u64 {
        self.project_and_trace()
            .split_once(':')
            .and_then(|(project, _)| project.parse().ok())
            .unwrap_or(0)
    }

    /// The last `:`-separated part: the root span id, or the salt of a detached segment.
    pub fn segment_span_id(&self) -> &str {
        self.parts().map_or("", |(_, id)| id)
    }

    /// Whether this segment was detached with `salt` (its key ends in the salt).
    pub fn is_detached_with(&self, salt: &str) -> bool {
        self.segment_span_id() == salt
    }
}

impl fmt::Display for SegmentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The redirect map of a trace: span id → best known segment root.
pub fn redirect_map(project_and_trace: &str) -> String {
    format!("{PREFIX}ssr:{{{project_and_trace}}}")
}

/// The payload set of one subsegment: `span-buf:s:{<pt>:<salt>}:<salt>`.
pub fn payload(project_and_trace: &str, salt: &str) -> String {
    format!("{PREFIX}s:{{{project_and_trace}:{salt}}}:{salt}")
}

/// The member-keys index of a segment: the salts of its payload keys.
pub fn member_keys(segment: &SegmentKey) -> String {
    format!(
        "{PREFIX}mk:{{{}}}:{}",
        segment.project_and_trace(),
        segment.segment_span_id()
    )
}

/// `"1"` once the segment has seen its root span.
pub fn has_root_span(segment: &SegmentKey) -> String {
    format!("{PREFIX}hrs:{segment}")
}

/// Spans ingested into the segment.
pub fn ingested_count(segment: &SegmentKey) -> String {
    format!("{PREFIX}ic:{segment}")
}

/// Uncompressed payload bytes ingested into the segment.
pub fn ingested_bytes(segment: &SegmentKey) -> String {
    format!("{PREFIX}ibc:{segment}")
}

/// The per-segment flush lock.
pub fn flush_lock(segment: &SegmentKey) -> String {
    format!("{PREFIX}fl:{segment}")
}

/// The flush queue of one shard (Kafka partition), optionally under a Kafka slice id.
pub fn queue(slice_id: Option<u32>, shard: u16) -> String {
    match slice_id {
        Some(slice) => format!("{PREFIX}q:{slice}-{shard}"),
        None => format!("{PREFIX}q:{shard}"),
    }
}

/// The part of a key Redis Cluster hashes: the first non-empty `{...}`, else the whole key.
pub fn hash_slot_input(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// The kinds of key the buffer stores, told apart by their shape (see the table of
/// `docs/redis-data-model.md`); `spans-pipeline inspect` counts and measures them per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyFamily {
    /// `span-buf:s:{<pt>:<salt>}:<salt>`: the payloads of one subsegment.
    Payload,
    /// `span-buf:s:{<pt>}:<root>`: a segment's payloads in the legacy merged layout.
    LegacySegment,
    /// `span-buf:mk:`: a segment's member-keys index.
    MemberKeys,
    /// `span-buf:ssr:`: a trace's redirect map.
    Redirect,
    /// `span-buf:hrs:`: the segment has seen its root.
    HasRoot,
    /// `span-buf:ic:`: spans ingested into a segment.
    IngestedCount,
    /// `span-buf:ibc:`: bytes ingested into a segment.
    IngestedBytes,
    /// `span-buf:fl:`: a flush lock.
    FlushLock,
    /// `span-buf:q:`: a flush queue.
    Queue,
    /// Any other key under the prefix.
    Other,
}

impl KeyFamily {
    /// Every family, in the order reports list them.
    pub const ALL: [Self; 10] = [
        Self::Payload,
        Self::LegacySegment,
        Self::MemberKeys,
        Self::Redirect,
        Self::HasRoot,
        Self::IngestedCount,
        Self::IngestedBytes,
        Self::FlushLock,
        Self::Queue,
        Self::Other,
    ];

    /// The family of `key`; `None` for a key outside the buffer's prefix.
    pub fn of(key: &str) -> Option<Self> {
        let rest = key.strip_prefix(PREFIX)?;
        let (kind, _) = rest.split_once(':').unwrap_or((rest, ""));
        Some(match kind {
            "q" => Self::Queue,
            "ssr" => Self::Redirect,
            "mk" => Self::MemberKeys,
            "hrs" => Self::HasRoot,
            "ic" => Self::IngestedCount,
            "ibc" => Self::IngestedBytes,
            "fl" => Self::FlushLock,
            "s" => match hash_tag(key).map(|tag| tag.matches(':').count()) {
                Some(1) => Self::LegacySegment,
                Some(2) => Self::Payload,
                _ => Self::Other,
            },
            _ => Self::Other,
        })
    }

    /// The name used in reports and in the `family` label of metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Payload => "payload",
            Self::LegacySegment => "legacy_segment",
            Self::MemberKeys => "member_keys",
            Self::Redirect => "redirect",
            Self::HasRoot => "has_root",
            Self::IngestedCount => "ingested_count",
            Self::IngestedBytes => "ingested_bytes",
            Self::FlushLock => "flush_lock",
            Self::Queue => "queue",
            Self::Other => "other",
        }
    }
}

/// The segment a per-segment metadata key (`hrs`, `ic`, `ibc`, `fl`) belongs to.
pub fn segment_of_metadata(key: &str) -> Option<SegmentKey> {
    let rest = key.strip_prefix(PREFIX)?;
    let (kind, segment) = rest.split_once(':')?;
    matches!(kind, "hrs" | "ic" | "ibc" | "fl")
        .then(|| SegmentKey::parse(segment))
        .flatten()
}

/// The `<pt>` of a redirect map `span-buf:ssr:{<pt>}` or of a payload key
/// `span-buf:s:{<pt>:<salt>}:<salt>`.
pub fn trace_of(key: &str) -> Option<&str> {
    let tag = hash_tag(key)?;
    match KeyFamily::of(key)? {
        KeyFamily::Redirect => Some(tag),
        KeyFamily::Payload => tag.rsplit_once(':').map(|(pt, _)| pt),
        _ => None,
    }
}

/// The text between the first `{` and the next `}`.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let len = key[open + 1..].find('}')?;
    Some(&key[open + 1..open + 1 + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_sentry_shapes() {
        let pt = project_and_trace(1, "a");
        let segment = SegmentKey::new(&pt, "b");
        assert_eq!(segment.as_str(), "span-buf:s:{1:a}:b");
        assert_eq!(redirect_map(&pt), "span-buf:ssr:{1:a}");
        assert_eq!(payload(&pt, "x"), "span-buf:s:{1:a:x}:x");
        assert_eq!(member_keys(&segment), "span-buf:mk:{1:a}:b");
        assert_eq!(has_root_span(&segment), "span-buf:hrs:span-buf:s:{1:a}:b");
        assert_eq!(ingested_count(&segment), "span-buf:ic:span-buf:s:{1:a}:b");
        assert_eq!(ingested_bytes(&segment), "span-buf:ibc:span-buf:s:{1:a}:b");
        assert_eq!(flush_lock(&segment), "span-buf:fl:span-buf:s:{1:a}:b");
        assert_eq!(queue(None, 3), "span-buf:q:3");
        assert_eq!(queue(Some(2), 0), "span-buf:q:2-0");
    }

    #[test]
    fn segment_key_parses_back_into_its_parts() {
        let segment = SegmentKey::parse("span-buf:s:{12:abc}:def").unwrap();
        assert_eq!(segment.project_and_trace(), "12:abc");
        assert_eq!(segment.project_id(), 12);
        assert_eq!(segment.segment_span_id(), "def");
        assert!(segment.is_detached_with("def"));
        assert!(SegmentKey::parse("span-buf:q:1").is_none());
    }

    #[test]
    fn metadata_keys_share_the_trace_slot() {
        let segment = SegmentKey::new("1:a", "b");
        for key in [
            has_root_span(&segment),
            ingested_count(&segment),
            member_keys(&segment),
            redirect_map("1:a"),
        ] {
            assert_eq!(hash_slot_input(key.as_bytes()), b"1:a");
        }
        assert_eq!(hash_slot_input(payload("1:a", "s").as_bytes()), b"1:a:s");
        assert_eq!(hash_slot_input(b"span-buf:q:1"), b"span-buf:q:1");
    }

    #[test]
    fn every_key_shape_has_its_family_and_parses_back() {
        let pt = project_and_trace(1, "a");
        let segment = SegmentKey::new(&pt, "b");
        for (key, family) in [
            (payload(&pt, "x"), KeyFamily::Payload),
            (segment.to_string(), KeyFamily::LegacySegment),
            (member_keys(&segment), KeyFamily::MemberKeys),
            (redirect_map(&pt), KeyFamily::Redirect),
            (has_root_span(&segment), KeyFamily::HasRoot),
            (ingested_count(&segment), KeyFamily::IngestedCount),
            (ingested_bytes(&segment), KeyFamily::IngestedBytes),
            (flush_lock(&segment), KeyFamily::FlushLock),
            (queue(Some(2), 0), KeyFamily::Queue),
            ("span-buf:zz".to_owned(), KeyFamily::Other),
        ] {
            assert_eq!(KeyFamily::of(&key), Some(family), "{key}");
        }
        assert_eq!(KeyFamily::of("other:key"), None);
        assert_eq!(
            segment_of_metadata(&ingested_bytes(&segment)),
            Some(segment.clone())
        );
        assert_eq!(segment_of_metadata(&member_keys(&segment)), None);
        assert_eq!(trace_of(&payload(&pt, "x")), Some("1:a"));
        assert_eq!(trace_of(&redirect_map(&pt)), Some("1:a"));
        assert_eq!(trace_of(&queue(None, 1)), None);
    }
}
