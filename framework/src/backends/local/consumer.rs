//! A consumer-group member of the in-memory broker.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use super::broker::{LocalBroker, Notice};
use crate::backends::{Consumer, ConsumerError, ConsumerEvent, RebalanceProtocol};
use crate::message::Partition;

/// A member of a consumer group on a [`LocalBroker`], created by [`LocalBroker::subscribe`].
///
/// It returns assignment changes first, then messages of its unpaused partitions, one at a
/// time, round robin over the partitions in sorted order. An idle `poll` waits for a produce or
/// a rebalance, up to its timeout. Revoked partitions stop delivering at once but stay owned
/// (commits for them are accepted) until [`complete_revocation`](Consumer::complete_revocation).
/// Dropping the consumer leaves the group.
pub struct LocalConsumer<T> {
    broker: LocalBroker<T>,
    group: String,
    member: u64,
    /// Assigned, delivering partitions with their working offsets, sorted by partition.
    positions: Vec<(Partition, u64)>,
    paused: HashSet<Partition>,
    cursor: usize,
    closed: bool,
}

impl<T> LocalConsumer<T> {
    pub(super) fn new(broker: LocalBroker<T>, group: String, member: u64) -> Self {
        Self {
            broker,
            group,
            member,
            positions: Vec::new(),
            paused: HashSet::new(),
            cursor: 0,
            closed: false,
        }
    }

    /// The group this consumer belongs to.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The partitions assigned and not revoked, sorted.
    pub fn assignment(&self) -> Vec<Partition> {
        self.positions.iter().map(|(p, _)| p.clone()).collect()
    }

    /// The partitions currently paused.
    pub fn paused(&self) -> HashSet<Partition> {
        self.paused.clone()
    }

    fn position_mut(&mut self, partition: &Partition) -> Result<&mut u64, ConsumerError> {
        self.positions
            .iter_mut()
            .find(|(p, _)| p == partition)
            .map(|(_, offset)| offset)
            .ok_or_else(|| ConsumerError::UnassignedPartition(partition.clone()))
    }

    fn check_assigned(&self, partitions: &[Partition]) -> Result<(), ConsumerError> {
        match partitions
            .iter()
            .find(|p| !self.positions.iter().any(|(q, _)| q == *p))
        {
            Some(p) => Err(ConsumerError::UnassignedPartition(p.clone())),
            None => Ok(()),
        }
    }
}

impl<T: Clone> Consumer<T> for LocalConsumer<T> {
    fn poll(&mut self, timeout: Duration) -> Result<Option<ConsumerEvent<T>>, ConsumerError> {
        if self.closed {
            return Err(ConsumerError::Closed);
        }
        let mut state = self.broker.lock();
        let mut waited = false;
        loop {
            let member = state
                .member_mut(&self.group, self.member)
                .ok_or(ConsumerError::Closed)?;
            match member.notices.pop_front() {
                Some(Notice::Assigned(partitions)) => {
                    let mut assigned = HashMap::new();
                    for partition in partitions {
                        let start = state.start_offset(&self.group, &partition)?;
                        self.positions.push((partition.clone(), start));
                        assigned.insert(partition, start);
                    }
                    self.positions.sort_by(|a, b| a.0.cmp(&b.0));
                    return Ok(Some(ConsumerEvent::Assigned(assigned)));
                }
                Some(Notice::Revoked(partitions)) => {
                    self.positions.retain(|(p, _)| !partitions.contains(p));
                    for partition in &partitions {
                        self.paused.remove(partition);
                    }
                    return Ok(Some(ConsumerEvent::Revoked(partitions)));
                }
                None => {}
            }
            let count = self.positions.len();
            for step in 0..count {
                let index = (self.cursor + step) % count;
                let (partition, offset) = &mut self.positions[index];
                if self.paused.contains(partition) {
                    continue;
                }
                if let Some(message) = state.read(partition, *offset) {
                    *offset += 1;
                    self.cursor = index + 1;
                    return Ok(Some(ConsumerEvent::Message(message)));
                }
            }
            if waited || timeout.is_zero() {
                return Ok(None);
            }
            self.broker.wait(&mut state, timeout);
            waited = true;
        }
    }

    fn pause(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError> {
        self.check_assigned(partitions)?;
        self.paused.extend(partitions.iter().cloned());
        Ok(())
    }

    fn resume(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError> {
        self.check_assigned(partitions)?;
        for partition in partitions {
            self.paused.remove(partition);
        }
        Ok(())
    }

    fn tell(&self) -> HashMap<Partition, u64> {
        self.positions.iter().cloned().collect()
    }

    fn seek(&mut self, positions: &HashMap<Partition, u64>) -> Result<(), ConsumerError> {
        let state = self.broker.lock();
        for (partition, &offset) in positions {
            if offset > state.log_len(partition) {
                return Err(ConsumerError::OffsetOutOfRange {
                    partition: partition.clone(),
                    offset,
                });
            }
        }
        drop(state);
        for (partition, &offset) in positions {
            *self.position_mut(partition)? = offset;
        }
        Ok(())
    }

    fn commit(&mut self, positions: &HashMap<Partition, u64>) -> Result<(), ConsumerError> {
        if self.closed {
            return Err(ConsumerError::Closed);
        }
        self.broker
            .lock()
            .commit(&self.group, self.member, positions)
    }

    fn complete_revocation(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError> {
        self.broker
            .lock()
            .release(&self.group, self.member, partitions);
        self.broker.notify();
        Ok(())
    }

    fn rebalance_protocol(&self) -> RebalanceProtocol {
        self.broker.lock().protocol(&self.group)
    }

    fn close(&mut self) -> Result<(), ConsumerError> {
        if !self.closed {
            self.closed = true;
            self.broker.lock().leave(&self.group, self.member);
            self.broker.notify();
        }
        Ok(())
    }
}

impl<T> Drop for LocalConsumer<T> {
    fn drop(&mut self) {
        if !self.closed {
            self.broker.lock().leave(&self.group, self.member);
            self.broker.notify();
        }
    }
}

impl<T> fmt::Debug for LocalConsumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalConsumer")
            .field("group", &self.group)
            .field("member", &self.member)
            .field("positions", &self.positions)
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::message::Topic;
    use crate::testing::numbered_broker;

    fn broker_with(partitions: u32, per_partition: u64) -> (LocalBroker<u64>, Topic) {
        numbered_broker("t", partitions, per_partition)
    }

    fn next_message(consumer: &mut LocalConsumer<u64>) -> Option<(u32, u64)> {
        loop {
            match consumer.poll(Duration::ZERO).unwrap()? {
                ConsumerEvent::Message(m) => {
                    return Some((m.partition().unwrap().index(), m.offset().unwrap()));
                }
                ConsumerEvent::Assigned(_) | ConsumerEvent::Revoked(_) => {}
            }
        }
    }

    #[test]
    fn serves_partitions_round_robin_in_sorted_order() {
        let (broker, topic) = broker_with(3, 2);
        let mut consumer = broker.subscribe("g", &[topic]);

        let order: Vec<_> = std::iter::from_fn(|| next_message(&mut consumer)).collect();

        assert_eq!(order, [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]);
    }

    #[test]
    fn the_first_event_is_the_assignment_from_the_committed_offset() {
        let (broker, topic) = broker_with(1, 5);
        let partition = Partition::new(topic.clone(), 0);
        let mut first = broker.subscribe("g", std::slice::from_ref(&topic));
        first.poll(Duration::ZERO).unwrap();
        first
            .commit(&HashMap::from([(partition.clone(), 3)]))
            .unwrap();
        first.close().unwrap();

        let mut second = broker.subscribe("g", &[topic]);
        let event = second.poll(Duration::ZERO).unwrap();

        let Some(ConsumerEvent::Assigned(assigned)) = event else {
            panic!("expected an assignment, got {event:?}");
        };
        assert_eq!(assigned, HashMap::from([(partition, 3)]));
    }

    #[test]
    fn paused_partitions_deliver_nothing_until_resumed() {
        let (broker, topic) = broker_with(2, 1);
        let mut consumer = broker.subscribe("g", std::slice::from_ref(&topic));
        consumer.poll(Duration::ZERO).unwrap();
        let p0 = Partition::new(topic, 0);

        consumer.pause(std::slice::from_ref(&p0)).unwrap();
        let while_paused: Vec<_> = std::iter::from_fn(|| next_message(&mut consumer)).collect();
        consumer.resume(&[p0]).unwrap();

        assert_eq!(while_paused, [(1, 0)]);
        assert_eq!(next_message(&mut consumer), Some((0, 0)));
    }

    #[test]
    fn seek_moves_the_working_offset() {
        let (broker, topic) = broker_with(1, 5);
        let mut consumer = broker.subscribe("g", std::slice::from_ref(&topic));
        let p0 = Partition::new(topic, 0);
        assert_eq!(next_message(&mut consumer), Some((0, 0)));

        consumer.seek(&HashMap::from([(p0.clone(), 3)])).unwrap();

        assert_eq!(consumer.tell()[&p0], 3);
        assert_eq!(next_message(&mut consumer), Some((0, 3)));
    }

    #[test]
    fn seek_past_the_end_is_out_of_range() {
        let (broker, topic) = broker_with(1, 1);
        let mut consumer = broker.subscribe("g", std::slice::from_ref(&topic));
        consumer.poll(Duration::ZERO).unwrap();

        let result = consumer.seek(&HashMap::from([(Partition::new(topic, 0), 9)]));

        assert!(matches!(
            result,
            Err(ConsumerError::OffsetOutOfRange { offset: 9, .. })
        ));
    }

    #[test]
    fn pausing_an_unassigned_partition_is_an_error() {
        let (broker, topic) = broker_with(1, 0);
        let mut consumer = broker.subscribe("g", std::slice::from_ref(&topic));

        let result = consumer.pause(&[Partition::new(topic, 7)]);

        assert!(matches!(result, Err(ConsumerError::UnassignedPartition(_))));
    }

    #[test]
    fn an_idle_poll_wakes_up_on_produce() {
        let (broker, topic) = broker_with(1, 0);
        let mut consumer = broker.subscribe("g", std::slice::from_ref(&topic));
        consumer.poll(Duration::ZERO).unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            broker.produce_to(&Partition::new(topic, 0), 1).unwrap();
        });

        let event = consumer.poll(Duration::from_secs(10)).unwrap();

        assert!(matches!(event, Some(ConsumerEvent::Message(_))));
        writer.join().unwrap();
    }
}
