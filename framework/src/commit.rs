//! Commit requests: the offsets that finished work makes committable.
//!
//! A [`CommitRequest`] names *done offsets*, per partition, as sorted ranges. It does not say
//! "commit up to here": whether an offset may be committed also depends on every offset before
//! it, which only the [`OffsetLedger`](crate::OffsetLedger) of the stream processor knows. So
//! merging two requests is a set union (commutative, associative, idempotent), and a step can
//! report the offsets it dropped (a filter, a dead-lettered message) without ever moving a
//! commit past work still in flight elsewhere.

use std::ops::Range;

use crate::message::Partition;

/// A set of offsets of one partition, stored as sorted, disjoint, non-adjacent ranges.
///
/// Offsets done in order collapse into a single range, so a batch of a thousand consecutive
/// messages costs one range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OffsetSet {
    ranges: Vec<Range<u64>>,
}

impl OffsetSet {
    /// An empty set.
    pub const fn new() -> Self {
        Self { ranges: Vec::new() }
    }

    /// Whether the set holds no offset.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The number of offsets in the set.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// The ranges, sorted and disjoint.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Whether `offset` is in the set.
    pub fn contains(&self, offset: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= offset);
        self.ranges.get(i).is_some_and(|r| r.start <= offset)
    }

    /// Adds one offset.
    #[inline]
    pub fn insert(&mut self, offset: u64) {
        // The common case: offsets arrive in order.
        match self.ranges.last_mut() {
            Some(last) if last.end == offset => {
                last.end += 1;
                return;
            }
            Some(last) if last.end < offset => {
                self.ranges.push(offset..offset + 1);
                return;
            }
            None => {
                self.ranges.push(offset..offset + 1);
                return;
            }
            Some(_) => {}
        }
        self.insert_range(offset..offset + 1);
    }

    /// Adds every offset of `range`.
    pub fn insert_range(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        // Ranges overlapping or touching `range` are merged into it.
        let first = self.ranges.partition_point(|r| r.end < range.start);
        let last = self.ranges.partition_point(|r| r.start <= range.end);
        let mut merged = range;
        if first < last {
            merged.start = merged.start.min(self.ranges[first].start);
            merged.end = merged.end.max(self.ranges[last - 1].end);
        }
        self.ranges.splice(first..last, std::iter::once(merged));
    }

    /// Adds every offset of `other`.
    pub fn union(&mut self, other: &Self) {
        for range in &other.ranges {
            self.insert_range(range.clone());
        }
    }
}

/// Offsets that became done, per partition, reported by a step's `poll` or `join`.
///
/// # Examples
///
/// ```
/// use rill::{CommitRequest, Partition, Topic};
///
/// let p0 = Partition::new(Topic::new("events"), 0);
/// let mut a = CommitRequest::new();
/// a.add(&p0, 0);
/// a.add(&p0, 1);
/// let mut b = CommitRequest::new();
/// b.add(&p0, 2);
///
/// a.merge(&b);
///
/// assert_eq!(a.offsets(&p0), vec![0..3]);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitRequest {
    // A short list rather than a map: pipelines see a handful of partitions, and a linear scan
    // comparing `Arc` pointers first beats hashing a topic name on every message.
    partitions: Vec<(Partition, OffsetSet)>,
}

impl CommitRequest {
    /// An empty request.
    pub const fn new() -> Self {
        Self {
            partitions: Vec::new(),
        }
    }

    /// Whether the request names no offset.
    pub fn is_empty(&self) -> bool {
        self.partitions.iter().all(|(_, set)| set.is_empty())
    }

    /// Marks `offset` of `partition` as done.
    #[inline]
    pub fn add(&mut self, partition: &Partition, offset: u64) {
        self.set_mut(partition).insert(offset);
    }

    /// Marks every offset of `range` in `partition` as done.
    pub fn add_range(&mut self, partition: &Partition, range: Range<u64>) {
        self.set_mut(partition).insert_range(range);
    }

    /// Adds every offset of `other` (a set union).
    pub fn merge(&mut self, other: &Self) {
        for (partition, set) in &other.partitions {
            self.set_mut(partition).union(set);
        }
    }

    /// The done offsets of `partition`, as sorted ranges.
    pub fn offsets(&self, partition: &Partition) -> Vec<Range<u64>> {
        self.partitions
            .iter()
            .find(|(p, _)| p == partition)
            .map(|(_, set)| set.ranges().to_vec())
            .unwrap_or_default()
    }

    /// Each partition with its done offsets.
    pub fn iter(&self) -> impl Iterator<Item = (&Partition, &OffsetSet)> {
        self.partitions.iter().map(|(p, set)| (p, set))
    }

    /// Drops the offsets of partitions for which `keep` returns false.
    pub fn retain(&mut self, mut keep: impl FnMut(&Partition) -> bool) {
        self.partitions.retain(|(p, _)| keep(p));
    }

    #[inline]
    fn set_mut(&mut self, partition: &Partition) -> &mut OffsetSet {
        let index = match self.partitions.iter().position(|(p, _)| p == partition) {
            Some(index) => index,
            None => {
                self.partitions.push((partition.clone(), OffsetSet::new()));
                self.partitions.len() - 1
            }
        };
        &mut self.partitions[index].1
    }
}

/// Merges two optional requests; `None` when both are `None`.
///
/// Every step that forwards its next step's requests uses this, through
/// [`CarriedOver`](crate::CarriedOver).
#[inline]
pub fn merge(a: Option<CommitRequest>, b: Option<CommitRequest>) -> Option<CommitRequest> {
    match (a, b) {
        (Some(mut a), Some(b)) => {
            a.merge(&b);
            Some(a)
        }
        (a, None) => a,
        (None, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::message::Topic;

    fn p(index: u32) -> Partition {
        Partition::new(Topic::new("t"), index)
    }

    #[test]
    fn consecutive_offsets_collapse_into_one_range() {
        let mut set = OffsetSet::new();

        for offset in 10..20 {
            set.insert(offset);
        }

        assert_eq!(set.ranges(), [10..20]);
        assert_eq!(set.len(), 10);
    }

    #[test]
    fn an_offset_filling_a_gap_joins_both_neighbours() {
        let mut set = OffsetSet::new();
        set.insert(1);
        set.insert(3);

        set.insert(2);

        assert_eq!(set.ranges(), [1..4]);
    }

    #[test]
    fn out_of_order_offsets_stay_sorted() {
        let mut set = OffsetSet::new();

        for offset in [9, 2, 5, 3] {
            set.insert(offset);
        }

        assert_eq!(set.ranges(), [2..4, 5..6, 9..10]);
        assert!(set.contains(5));
        assert!(!set.contains(4));
    }

    #[test]
    fn merge_keeps_partitions_apart() {
        let mut a = CommitRequest::new();
        a.add(&p(0), 1);
        let mut b = CommitRequest::new();
        b.add(&p(1), 1);

        a.merge(&b);

        assert_eq!(a.offsets(&p(0)), vec![1..2]);
        assert_eq!(a.offsets(&p(1)), vec![1..2]);
    }

    #[test]
    fn merge_of_options_keeps_whichever_is_present() {
        let mut a = CommitRequest::new();
        a.add(&p(0), 1);

        assert_eq!(merge(Some(a.clone()), None), Some(a.clone()));
        assert_eq!(merge(None, Some(a.clone())), Some(a));
        assert_eq!(merge(None, None), None);
    }

    fn request() -> impl Strategy<Value = CommitRequest> {
        prop::collection::vec((0_u32..3, 0_u64..64), 0..40).prop_map(|entries| {
            let mut request = CommitRequest::new();
            for (partition, offset) in entries {
                request.add(&p(partition), offset);
            }
            request
        })
    }

    fn normalized(request: &CommitRequest) -> Vec<(u32, Vec<Range<u64>>)> {
        (0..3)
            .map(|i| (i, request.offsets(&p(i))))
            .filter(|(_, ranges)| !ranges.is_empty())
            .collect()
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in request(), b in request()) {
            let mut ab = a.clone();
            ab.merge(&b);
            let mut ba = b.clone();
            ba.merge(&a);
            prop_assert_eq!(normalized(&ab), normalized(&ba));
        }

        #[test]
        fn merge_is_idempotent(a in request()) {
            let mut aa = a.clone();
            aa.merge(&a);
            prop_assert_eq!(normalized(&aa), normalized(&a));
        }

        #[test]
        fn offset_set_holds_exactly_what_was_inserted(
            offsets in prop::collection::vec(0_u64..200, 0..100)
        ) {
            let mut set = OffsetSet::new();
            for &offset in &offsets {
                set.insert(offset);
            }
            for candidate in 0..200 {
                prop_assert_eq!(set.contains(candidate), offsets.contains(&candidate));
            }
            // Sorted, disjoint and never touching: the representation is canonical.
            for pair in set.ranges().windows(2) {
                prop_assert!(pair[0].end < pair[1].start);
            }
        }
    }
}
