//! The offset ledger: which offsets may be committed, per partition.
//!
//! The stream processor records every offset it polls and marks it done when a step reports it
//! (processed, filtered, or dead-lettered with a confirmed delivery). The committable position
//! of a partition is its *low watermark*: the smallest offset still pending, or one past the
//! last polled offset when nothing is pending. Work may finish in any order; the watermark only
//! moves forward, and only over offsets that are all done.

use std::collections::{HashMap, VecDeque};

use crate::fast_hash::FastMap;

use crate::commit::{CommitRequest, OffsetSet};
use crate::message::Partition;

/// The polled offsets of one partition that are not yet all done.
#[derive(Debug, Clone)]
struct PartitionLedger {
    /// Polled offsets from the watermark on, in poll order (increasing), with a done flag.
    pending: VecDeque<(u64, bool)>,
    /// The offset after the last one polled (or the start offset).
    next_polled: u64,
    /// The last position handed out for commit (the start offset at first).
    committed: u64,
}

impl PartitionLedger {
    const fn new(start: u64) -> Self {
        Self {
            pending: VecDeque::new(),
            next_polled: start,
            committed: start,
        }
    }

    fn watermark(&self) -> u64 {
        self.pending
            .front()
            .map_or(self.next_polled, |&(offset, _)| offset)
    }

    fn record_polled(&mut self, offset: u64) -> bool {
        // A broker never goes backwards within one assignment; anything else is a bug upstream
        // (or a seek, which resets the ledger first).
        if offset < self.next_polled {
            return false;
        }
        self.pending.push_back((offset, false));
        self.next_polled = offset + 1;
        true
    }

    fn mark_done(&mut self, done: &OffsetSet) {
        for range in done.ranges() {
            let start = self
                .pending
                .partition_point(|&(offset, _)| offset < range.start);
            for entry in self.pending.range_mut(start..) {
                if entry.0 >= range.end {
                    break;
                }
                entry.1 = true;
            }
        }
        while self.pending.front().is_some_and(|&(_, done)| done) {
            self.pending.pop_front();
        }
    }
}

/// Per-partition bookkeeping of polled and done offsets, giving positions safe to commit.
///
/// # Examples
///
/// ```
/// use rill::{CommitRequest, OffsetLedger, Partition, Topic};
///
/// let p = Partition::new(Topic::new("events"), 0);
/// let mut ledger = OffsetLedger::new();
/// ledger.assign(p.clone(), 0);
/// for offset in 0..3 {
///     ledger.record_polled(&p, offset);
/// }
///
/// // Offset 1 finishes first: nothing is committable yet, 0 is still in flight.
/// let mut done = CommitRequest::new();
/// done.add(&p, 1);
/// ledger.mark_done(&done);
/// assert!(ledger.take_committable().is_empty());
///
/// // Then 0: both are done, so the next position to read, 2, is committable.
/// let mut done = CommitRequest::new();
/// done.add(&p, 0);
/// ledger.mark_done(&done);
/// assert_eq!(ledger.take_committable()[&p], 2);
/// ```
#[derive(Debug, Clone, Default)]
pub struct OffsetLedger {
    partitions: FastMap<Partition, PartitionLedger>,
}

impl OffsetLedger {
    /// An empty ledger, owning no partition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts tracking `partition`, whose next message to poll is at `start`.
    ///
    /// Assigning a partition that is already tracked restarts it at `start`.
    pub fn assign(&mut self, partition: Partition, start: u64) {
        self.partitions
            .insert(partition, PartitionLedger::new(start));
    }

    /// Stops tracking `partition`; done reports for it are ignored from now on.
    pub fn revoke(&mut self, partition: &Partition) {
        self.partitions.remove(partition);
    }

    /// Whether `partition` is tracked.
    pub fn owns(&self, partition: &Partition) -> bool {
        self.partitions.contains_key(partition)
    }

    /// The tracked partitions.
    pub fn partitions(&self) -> impl Iterator<Item = &Partition> {
        self.partitions.keys()
    }

    /// Records that `offset` of `partition` was polled and is now in flight.
    ///
    /// Returns false, recording nothing, when the partition is not tracked or the offset is
    /// not past the last one recorded.
    pub fn record_polled(&mut self, partition: &Partition, offset: u64) -> bool {
        self.partitions
            .get_mut(partition)
            .is_some_and(|ledger| ledger.record_polled(offset))
    }

    /// Marks offsets as done. Offsets never polled, or of partitions not tracked, are ignored.
    pub fn mark_done(&mut self, done: &CommitRequest) {
        for (partition, offsets) in done.iter() {
            if let Some(ledger) = self.partitions.get_mut(partition) {
                ledger.mark_done(offsets);
            }
        }
    }

    /// The low watermark of `partition`: every polled offset below it is done.
    pub fn watermark(&self, partition: &Partition) -> Option<u64> {
        self.partitions
            .get(partition)
            .map(PartitionLedger::watermark)
    }

    /// The number of polled offsets of `partition` not yet known to be done.
    pub fn in_flight(&self, partition: &Partition) -> usize {
        self.partitions
            .get(partition)
            .map_or(0, |l| l.pending.iter().filter(|&&(_, done)| !done).count())
    }

    /// Positions that moved forward since the last call: the ones to commit now.
    ///
    /// A partition appears only when its watermark passed the position last returned (or its
    /// start offset), so positions handed out never go backwards.
    pub fn take_committable(&mut self) -> HashMap<Partition, u64> {
        let mut positions = HashMap::new();
        for (partition, ledger) in &mut self.partitions {
            let watermark = ledger.watermark();
            if watermark > ledger.committed {
                ledger.committed = watermark;
                positions.insert(partition.clone(), watermark);
            }
        }
        positions
    }

    /// Forgets the offsets of `partition` from `offset` on: polled, but dropped before the
    /// pipeline took them (a revoked partition's waiting messages), so they are not in flight
    /// and will never be reported. Offsets below `offset` are untouched.
    pub fn forget_polled_from(&mut self, partition: &Partition, offset: u64) {
        if let Some(ledger) = self.partitions.get_mut(partition) {
            while ledger
                .pending
                .back()
                .is_some_and(|&(polled, _)| polled >= offset)
            {
                ledger.pending.pop_back();
            }
            ledger.next_polled = ledger.next_polled.min(offset.max(ledger.committed));
        }
    }

    /// Forgets in-flight offsets of `partition` and restarts it at `position`, as after a seek.
    ///
    /// Used when work was abandoned (a join that ran out of time) on a partition that stays
    /// assigned: the consumer is rewound to the watermark and the offsets are polled again.
    pub fn rewind(&mut self, partition: &Partition, position: u64) {
        if let Some(ledger) = self.partitions.get_mut(partition) {
            ledger.pending.clear();
            ledger.next_polled = position;
            ledger.committed = ledger.committed.min(position);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Topic;

    fn p(index: u32) -> Partition {
        Partition::new(Topic::new("t"), index)
    }

    fn done(partition: &Partition, offsets: &[u64]) -> CommitRequest {
        let mut request = CommitRequest::new();
        for &offset in offsets {
            request.add(partition, offset);
        }
        request
    }

    fn ledger_with(
        partition: &Partition,
        start: u64,
        polled: std::ops::Range<u64>,
    ) -> OffsetLedger {
        let mut ledger = OffsetLedger::new();
        ledger.assign(partition.clone(), start);
        for offset in polled {
            assert!(ledger.record_polled(partition, offset));
        }
        ledger
    }

    #[test]
    fn nothing_is_committable_before_anything_is_done() {
        let mut ledger = ledger_with(&p(0), 5, 5..8);

        assert!(ledger.take_committable().is_empty());
        assert_eq!(ledger.watermark(&p(0)), Some(5));
    }

    #[test]
    fn out_of_order_completion_commits_only_the_done_prefix() {
        let mut ledger = ledger_with(&p(0), 0, 0..4);

        ledger.mark_done(&done(&p(0), &[0, 2, 3]));

        assert_eq!(ledger.take_committable()[&p(0)], 1);
        ledger.mark_done(&done(&p(0), &[1]));
        assert_eq!(ledger.take_committable()[&p(0)], 4);
    }

    #[test]
    fn the_same_position_is_handed_out_once() {
        let mut ledger = ledger_with(&p(0), 0, 0..2);
        ledger.mark_done(&done(&p(0), &[0, 1]));

        assert_eq!(ledger.take_committable().len(), 1);
        ledger.mark_done(&done(&p(0), &[0, 1]));
        assert!(ledger.take_committable().is_empty());
    }

    #[test]
    fn gaps_in_broker_offsets_do_not_hold_the_watermark() {
        // A compacted topic: offsets 1 and 2 do not exist.
        let mut ledger = OffsetLedger::new();
        ledger.assign(p(0), 0);
        ledger.record_polled(&p(0), 0);
        ledger.record_polled(&p(0), 3);

        ledger.mark_done(&done(&p(0), &[0, 3]));

        assert_eq!(ledger.take_committable()[&p(0)], 4);
    }

    #[test]
    fn done_reports_for_unowned_partitions_are_ignored() {
        let mut ledger = ledger_with(&p(0), 0, 0..1);

        ledger.mark_done(&done(&p(1), &[0]));

        assert!(ledger.take_committable().is_empty());
        assert!(!ledger.owns(&p(1)));
    }

    #[test]
    fn offsets_behind_the_last_polled_are_refused() {
        let mut ledger = ledger_with(&p(0), 0, 0..3);

        assert!(!ledger.record_polled(&p(0), 1));
        assert!(!ledger.record_polled(&p(1), 0));
    }

    #[test]
    fn offsets_dropped_before_submission_no_longer_hold_the_watermark() {
        let mut ledger = ledger_with(&p(0), 0, 0..5);
        ledger.mark_done(&done(&p(0), &[0, 1]));

        // 2 is still in the pipeline; 3 and 4 were waiting and are dropped.
        ledger.forget_polled_from(&p(0), 3);

        assert_eq!(ledger.in_flight(&p(0)), 1);
        assert_eq!(ledger.take_committable()[&p(0)], 2);
        ledger.mark_done(&done(&p(0), &[2]));
        assert_eq!(ledger.take_committable()[&p(0)], 3);
        assert_eq!(ledger.in_flight(&p(0)), 0);
    }

    #[test]
    fn rewind_forgets_in_flight_work() {
        let mut ledger = ledger_with(&p(0), 0, 0..4);
        ledger.mark_done(&done(&p(0), &[0]));
        ledger.take_committable();

        ledger.rewind(&p(0), 1);

        assert_eq!(ledger.in_flight(&p(0)), 0);
        assert!(ledger.record_polled(&p(0), 1));
        ledger.mark_done(&done(&p(0), &[1]));
        assert_eq!(ledger.take_committable()[&p(0)], 2);
    }
}
