//! The broker itself: storage, committed offsets and the group coordinator.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::backends::{ConsumerError, InitialOffset, RebalanceProtocol};
use crate::fast_hash::FastMap;
use crate::message::{Message, Partition, Topic};

/// What a member learns from the coordinator, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Notice {
    Assigned(Vec<Partition>),
    Revoked(Vec<Partition>),
}

#[derive(Debug, Default)]
pub(super) struct Member {
    pub(super) topics: Vec<Topic>,
    /// Partitions this member owns (including those being revoked, until it lets them go).
    pub(super) owned: BTreeSet<Partition>,
    /// Partitions announced as revoked and not yet let go.
    pub(super) revoking: BTreeSet<Partition>,
    pub(super) notices: VecDeque<Notice>,
}

#[derive(Debug)]
struct Group {
    protocol: RebalanceProtocol,
    reset: InitialOffset,
    members: BTreeMap<u64, Member>,
    committed: HashMap<Partition, u64>,
    commit_log: Vec<(Partition, u64)>,
    /// Partitions waiting for their previous owner to let go, and who gets them.
    pending: BTreeMap<Partition, u64>,
    generation: u64,
}

struct StoredMessage<T> {
    payload: T,
    timestamp: SystemTime,
}

pub(super) struct State<T> {
    topics: FastMap<Topic, Vec<Vec<StoredMessage<T>>>>,
    groups: FastMap<String, Group>,
    next_member: u64,
    failing_commits: usize,
}

pub(super) struct Shared<T> {
    state: Mutex<State<T>>,
    /// Signalled on every produce and rebalance, so idle consumers wake up.
    changed: Condvar,
}

/// An in-memory broker; clones share the same topics and groups.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rill::backends::local::LocalBroker;
/// use rill::{Consumer, ConsumerEvent, Partition, Topic};
///
/// let broker = LocalBroker::new();
/// let topic = Topic::new("events");
/// broker.create_topic(&topic, 2);
/// broker.produce_to(&Partition::new(topic.clone(), 1), "hello").unwrap();
///
/// let mut consumer = broker.subscribe("group", &[topic]);
/// // The first event is the assignment, then the message.
/// assert!(matches!(consumer.poll(Duration::ZERO).unwrap(), Some(ConsumerEvent::Assigned(_))));
/// let Some(ConsumerEvent::Message(message)) = consumer.poll(Duration::ZERO).unwrap() else {
///     panic!("expected a message");
/// };
/// assert_eq!(*message.payload(), "hello");
/// ```
pub struct LocalBroker<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for LocalBroker<T> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> fmt::Debug for LocalBroker<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.state.lock();
        f.debug_struct("LocalBroker")
            .field("topics", &state.topics.keys().collect::<Vec<_>>())
            .field("groups", &state.groups.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<T> Default for LocalBroker<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> LocalBroker<T> {
    /// An empty broker.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    topics: FastMap::default(),
                    groups: FastMap::default(),
                    next_member: 0,
                    failing_commits: 0,
                }),
                changed: Condvar::new(),
            }),
        }
    }

    /// Creates `topic` with `partitions` partitions (no-op if it exists), and rebalances the
    /// groups subscribed to it.
    pub fn create_topic(&self, topic: &Topic, partitions: u32) {
        let mut state = self.shared.state.lock();
        if state.topics.contains_key(topic) {
            return;
        }
        state
            .topics
            .insert(topic.clone(), (0..partitions).map(|_| Vec::new()).collect());
        let groups: Vec<String> = state.groups.keys().cloned().collect();
        for group in groups {
            rebalance(&mut state, &group);
        }
        self.shared.changed.notify_all();
    }

    /// The partitions of `topic`, sorted; empty if it does not exist.
    pub fn partitions(&self, topic: &Topic) -> Vec<Partition> {
        let state = self.shared.state.lock();
        partitions_of(&state, topic)
    }

    /// Appends `payload` to `partition` and returns its offset.
    ///
    /// # Errors
    ///
    /// [`ConsumerError::UnassignedPartition`] if the partition does not exist.
    pub fn produce_to(&self, partition: &Partition, payload: T) -> Result<u64, ConsumerError> {
        let mut state = self.shared.state.lock();
        let log = state
            .topics
            .get_mut(partition.topic())
            .and_then(|partitions| partitions.get_mut(partition.index() as usize))
            .ok_or_else(|| ConsumerError::UnassignedPartition(partition.clone()))?;
        log.push(StoredMessage {
            payload,
            timestamp: SystemTime::now(),
        });
        let offset = log.len() as u64 - 1;
        drop(state);
        self.shared.changed.notify_all();
        Ok(offset)
    }

    /// The offset the next message of `partition` will get (0 for an unknown partition).
    pub fn high_watermark(&self, partition: &Partition) -> u64 {
        let state = self.shared.state.lock();
        log_len(&state, partition)
    }

    /// The payloads stored in `partition`, in offset order.
    pub fn payloads(&self, partition: &Partition) -> Vec<T>
    where
        T: Clone,
    {
        let state = self.shared.state.lock();
        state
            .topics
            .get(partition.topic())
            .and_then(|partitions| partitions.get(partition.index() as usize))
            .map(|log| log.iter().map(|m| m.payload.clone()).collect())
            .unwrap_or_default()
    }

    /// The offset `group` committed for `partition`, if any.
    pub fn committed(&self, group: &str, partition: &Partition) -> Option<u64> {
        let state = self.shared.state.lock();
        state.groups.get(group)?.committed.get(partition).copied()
    }

    /// Every commit of `group`, in order, one entry per partition committed.
    pub fn commit_log(&self, group: &str) -> Vec<(Partition, u64)> {
        let state = self.shared.state.lock();
        state
            .groups
            .get(group)
            .map(|g| g.commit_log.clone())
            .unwrap_or_default()
    }

    /// Makes the next `count` commits (of any group) fail.
    pub fn fail_next_commits(&self, count: usize) {
        self.shared.state.lock().failing_commits = count;
    }

    /// Sets how `group` rebalances and where it starts on uncommitted partitions; call before
    /// the first member subscribes.
    pub fn configure_group(&self, group: &str, protocol: RebalanceProtocol, reset: InitialOffset) {
        let mut state = self.shared.state.lock();
        let entry = group_entry(&mut state, group);
        entry.protocol = protocol;
        entry.reset = reset;
    }

    /// Joins `group` as a new member subscribed to `topics`; the group rebalances.
    pub fn subscribe(&self, group: &str, topics: &[Topic]) -> super::LocalConsumer<T> {
        let mut state = self.shared.state.lock();
        let member = state.next_member;
        state.next_member += 1;
        group_entry(&mut state, group).members.insert(
            member,
            Member {
                topics: topics.to_vec(),
                ..Member::default()
            },
        );
        rebalance(&mut state, group);
        drop(state);
        self.shared.changed.notify_all();
        super::LocalConsumer::new(self.clone(), group.to_owned(), member)
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.shared.state.lock()
    }

    /// Waits until something changes on the broker, or `timeout` passes.
    pub(super) fn wait(&self, state: &mut MutexGuard<'_, State<T>>, timeout: Duration) {
        if timeout.is_zero() {
            return;
        }
        let _ = self
            .shared
            .changed
            .wait_until(state, Instant::now() + timeout);
    }

    pub(super) fn notify(&self) {
        self.shared.changed.notify_all();
    }
}

impl<T> State<T> {
    pub(super) fn member_mut(&mut self, group: &str, member: u64) -> Option<&mut Member> {
        self.groups.get_mut(group)?.members.get_mut(&member)
    }

    /// The message at `offset` of `partition`, if it exists yet.
    pub(super) fn read(&self, partition: &Partition, offset: u64) -> Option<Message<T>>
    where
        T: Clone,
    {
        let log = self
            .topics
            .get(partition.topic())?
            .get(partition.index() as usize)?;
        let stored = log.get(usize::try_from(offset).ok()?)?;
        Some(Message::broker(
            stored.payload.clone(),
            partition.clone(),
            offset,
            Some(stored.timestamp),
        ))
    }

    pub(super) fn log_len(&self, partition: &Partition) -> u64 {
        log_len(self, partition)
    }

    /// How `group` rebalances (the default protocol for a group not created yet).
    pub(super) fn protocol(&self, group: &str) -> RebalanceProtocol {
        self.groups
            .get(group)
            .map_or_else(RebalanceProtocol::default, |g| g.protocol)
    }

    /// Where a member starts reading a newly assigned partition.
    pub(super) fn start_offset(
        &self,
        group: &str,
        partition: &Partition,
    ) -> Result<u64, ConsumerError> {
        let Some(group) = self.groups.get(group) else {
            return Ok(0);
        };
        match group.committed.get(partition) {
            Some(&offset) => Ok(offset),
            None => match group.reset {
                InitialOffset::Earliest => Ok(0),
                InitialOffset::Latest => Ok(log_len(self, partition)),
                InitialOffset::Error => Err(ConsumerError::Broker(
                    format!(
                        "no committed offset for {partition} and the initial offset policy is \
                         'error'"
                    )
                    .into(),
                )),
            },
        }
    }

    pub(super) fn commit(
        &mut self,
        group: &str,
        member: u64,
        positions: &HashMap<Partition, u64>,
    ) -> Result<(), ConsumerError> {
        if self.failing_commits > 0 {
            self.failing_commits -= 1;
            return Err(ConsumerError::CommitFailed(
                "injected commit failure".into(),
            ));
        }
        let group = self.groups.get_mut(group).ok_or(ConsumerError::Closed)?;
        let member = group.members.get(&member).ok_or(ConsumerError::Closed)?;
        // Like a broker checking the generation: a member may only commit what it owns.
        if let Some(partition) = positions.keys().find(|p| !member.owned.contains(*p)) {
            return Err(ConsumerError::CommitFailed(
                format!("partition {partition} is not owned by this member").into(),
            ));
        }
        let mut sorted: Vec<_> = positions.iter().collect();
        sorted.sort();
        for (partition, &offset) in sorted {
            group.committed.insert(partition.clone(), offset);
            group.commit_log.push((partition.clone(), offset));
        }
        Ok(())
    }

    /// The member lets revoked partitions go; they move to the members waiting for them.
    pub(super) fn release(&mut self, group_name: &str, member: u64, partitions: &[Partition]) {
        let Some(group) = self.groups.get_mut(group_name) else {
            return;
        };
        if let Some(member) = group.members.get_mut(&member) {
            for partition in partitions {
                if member.revoking.remove(partition) {
                    member.owned.remove(partition);
                }
            }
        }
        hand_over_pending(group);
    }

    /// The member leaves: its partitions are let go at once and the group rebalances.
    pub(super) fn leave(&mut self, group: &str, member: u64) {
        if let Some(entry) = self.groups.get_mut(group) {
            entry.members.remove(&member);
            entry.pending.retain(|_, m| *m != member);
        }
        rebalance(self, group);
    }
}

fn log_len<T>(state: &State<T>, partition: &Partition) -> u64 {
    state
        .topics
        .get(partition.topic())
        .and_then(|partitions| partitions.get(partition.index() as usize))
        .map_or(0, |log| log.len() as u64)
}

fn partitions_of<T>(state: &State<T>, topic: &Topic) -> Vec<Partition> {
    let count = state.topics.get(topic).map_or(0, Vec::len) as u32;
    (0..count)
        .map(|i| Partition::new(topic.clone(), i))
        .collect()
}

fn group_entry<'a, T>(state: &'a mut State<T>, group: &str) -> &'a mut Group {
    state
        .groups
        .entry(group.to_owned())
        .or_insert_with(|| Group {
            protocol: RebalanceProtocol::default(),
            reset: InitialOffset::default(),
            members: BTreeMap::new(),
            committed: HashMap::new(),
            commit_log: Vec::new(),
            pending: BTreeMap::new(),
            generation: 0,
        })
}

/// Recomputes the target assignment of `group` and tells members what changes.
///
/// Partitions are dealt round robin, in sorted order, to the members subscribed to their topic
/// (sorted by join order). A partition moving between members is first revoked from its owner
/// and handed to the new one only once the owner lets it go, as Kafka's cooperative protocol
/// does; the eager protocol revokes everything first.
fn rebalance<T>(state: &mut State<T>, group_name: &str) {
    let topics: BTreeSet<Topic> = match state.groups.get(group_name) {
        Some(group) => group
            .members
            .values()
            .flat_map(|m| m.topics.iter().cloned())
            .collect(),
        None => return,
    };
    let all: Vec<Partition> = topics
        .iter()
        .flat_map(|topic| partitions_of(state, topic))
        .collect();
    let Some(group) = state.groups.get_mut(group_name) else {
        return;
    };
    group.generation += 1;

    let mut target: BTreeMap<Partition, u64> = BTreeMap::new();
    for topic in &topics {
        let members: Vec<u64> = group
            .members
            .iter()
            .filter(|(_, m)| m.topics.contains(topic))
            .map(|(&id, _)| id)
            .collect();
        let partitions = all.iter().filter(|p| p.topic() == topic);
        for (i, partition) in partitions.enumerate() {
            if !members.is_empty() {
                target.insert(partition.clone(), members[i % members.len()]);
            }
        }
    }

    let eager = group.protocol == RebalanceProtocol::Eager;
    for (&id, member) in &mut group.members {
        let revoke: Vec<Partition> = member
            .owned
            .iter()
            .filter(|p| !member.revoking.contains(*p))
            .filter(|p| eager || target.get(*p) != Some(&id))
            .cloned()
            .collect();
        if !revoke.is_empty() {
            member.revoking.extend(revoke.iter().cloned());
            member.notices.push_back(Notice::Revoked(revoke));
        }
    }
    group.pending = target
        .into_iter()
        .filter(|(partition, id)| {
            group
                .members
                .get(id)
                .is_none_or(|m| !m.owned.contains(partition) || m.revoking.contains(partition))
        })
        .collect();
    hand_over_pending(group);
}

/// Gives pending partitions to their new owners once nobody else owns them.
fn hand_over_pending(group: &mut Group) {
    let mut grants: BTreeMap<u64, Vec<Partition>> = BTreeMap::new();
    let pending = std::mem::take(&mut group.pending);
    for (partition, id) in pending {
        let owned_elsewhere = group.members.values().any(|m| m.owned.contains(&partition));
        if owned_elsewhere {
            group.pending.insert(partition, id);
        } else {
            grants.entry(id).or_default().push(partition);
        }
    }
    for (id, partitions) in grants {
        if let Some(member) = group.members.get_mut(&id) {
            member.owned.extend(partitions.iter().cloned());
            member.notices.push_back(Notice::Assigned(partitions));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backends::{Consumer, ConsumerEvent};

    fn events(consumer: &mut super::super::LocalConsumer<u64>) -> Vec<String> {
        let mut seen = Vec::new();
        while let Some(event) = consumer.poll(Duration::ZERO).unwrap() {
            match event {
                ConsumerEvent::Assigned(map) => {
                    let mut indexes: Vec<u32> = map.keys().map(Partition::index).collect();
                    indexes.sort_unstable();
                    seen.push(format!("assigned {indexes:?}"));
                }
                ConsumerEvent::Revoked(partitions) => {
                    let indexes: Vec<u32> = partitions.iter().map(Partition::index).collect();
                    seen.push(format!("revoked {indexes:?}"));
                }
                ConsumerEvent::Message(_) => {}
            }
        }
        seen
    }

    fn topic_with(broker: &LocalBroker<u64>, partitions: u32) -> Topic {
        let topic = Topic::new("t");
        broker.create_topic(&topic, partitions);
        topic
    }

    #[test]
    fn cooperative_rebalance_moves_only_some_partitions() {
        let broker = LocalBroker::new();
        let topic = topic_with(&broker, 4);
        let mut first = broker.subscribe("g", std::slice::from_ref(&topic));
        assert_eq!(events(&mut first), ["assigned [0, 1, 2, 3]"]);

        let mut second = broker.subscribe("g", std::slice::from_ref(&topic));

        assert_eq!(events(&mut first), ["revoked [1, 3]"]);
        // Not before the first member lets them go.
        assert!(events(&mut second).is_empty());
        let moved: Vec<Partition> = [1, 3].map(|i| Partition::new(topic.clone(), i)).to_vec();
        first.complete_revocation(&moved).unwrap();
        assert_eq!(events(&mut second), ["assigned [1, 3]"]);
    }

    #[test]
    fn eager_rebalance_revokes_everything_first() {
        let broker = LocalBroker::new();
        broker.configure_group("g", RebalanceProtocol::Eager, InitialOffset::Earliest);
        let topic = topic_with(&broker, 2);
        let mut first = broker.subscribe("g", std::slice::from_ref(&topic));
        events(&mut first);

        let mut second = broker.subscribe("g", std::slice::from_ref(&topic));
        assert_eq!(events(&mut first), ["revoked [0, 1]"]);
        first
            .complete_revocation(&broker.partitions(&topic))
            .unwrap();

        assert_eq!(events(&mut first), ["assigned [0]"]);
        assert_eq!(events(&mut second), ["assigned [1]"]);
    }

    #[test]
    fn a_leaving_member_hands_its_partitions_over_at_once() {
        let broker = LocalBroker::new();
        let topic = topic_with(&broker, 2);
        let mut first = broker.subscribe("g", std::slice::from_ref(&topic));
        let mut second = broker.subscribe("g", std::slice::from_ref(&topic));
        events(&mut first);
        first
            .complete_revocation(&[Partition::new(topic, 1)])
            .unwrap();
        events(&mut second);

        second.close().unwrap();

        assert_eq!(events(&mut first), ["assigned [1]"]);
    }

    #[test]
    fn committing_one_partition_keeps_the_others() {
        let broker = LocalBroker::new();
        let topic = topic_with(&broker, 2);
        let (p0, p1) = (
            Partition::new(topic.clone(), 0),
            Partition::new(topic.clone(), 1),
        );
        let mut consumer = broker.subscribe("g", &[topic]);
        events(&mut consumer);

        consumer.commit(&HashMap::from([(p0.clone(), 4)])).unwrap();
        consumer.commit(&HashMap::from([(p1.clone(), 2)])).unwrap();

        assert_eq!(broker.committed("g", &p0), Some(4));
        assert_eq!(broker.committed("g", &p1), Some(2));
        assert_eq!(broker.commit_log("g"), [(p0, 4), (p1, 2)]);
    }

    #[test]
    fn a_member_cannot_commit_a_partition_it_does_not_own() {
        let broker = LocalBroker::new();
        let topic = topic_with(&broker, 2);
        let mut first = broker.subscribe("g", std::slice::from_ref(&topic));
        let _second = broker.subscribe("g", std::slice::from_ref(&topic));
        events(&mut first);
        let p1 = Partition::new(topic, 1);
        first
            .complete_revocation(std::slice::from_ref(&p1))
            .unwrap();

        let result = first.commit(&HashMap::from([(p1, 1)]));

        assert!(matches!(result, Err(ConsumerError::CommitFailed(_))));
    }

    #[test]
    fn latest_reset_starts_after_existing_messages() {
        let broker = LocalBroker::new();
        broker.configure_group("g", RebalanceProtocol::Cooperative, InitialOffset::Latest);
        let topic = topic_with(&broker, 1);
        let partition = Partition::new(topic.clone(), 0);
        broker.produce_to(&partition, 1).unwrap();
        broker.produce_to(&partition, 2).unwrap();

        let mut consumer = broker.subscribe("g", &[topic]);
        let Some(ConsumerEvent::Assigned(assigned)) = consumer.poll(Duration::ZERO).unwrap() else {
            panic!("expected an assignment");
        };

        assert_eq!(assigned[&partition], 2);
    }

    #[test]
    fn error_reset_refuses_a_partition_without_a_commit() {
        let broker = LocalBroker::new();
        broker.configure_group("g", RebalanceProtocol::Cooperative, InitialOffset::Error);
        let topic = topic_with(&broker, 1);

        let mut consumer = broker.subscribe("g", &[topic]);
        let error = consumer.poll(Duration::ZERO).unwrap_err();

        assert!(error.to_string().contains("consumer failed"), "{error}");
    }

    #[test]
    fn injected_commit_failures_are_reported() {
        let broker = LocalBroker::new();
        let topic = topic_with(&broker, 1);
        let mut consumer = broker.subscribe("g", std::slice::from_ref(&topic));
        events(&mut consumer);
        broker.fail_next_commits(1);
        let positions = HashMap::from([(Partition::new(topic, 0), 0)]);

        assert!(consumer.commit(&positions).is_err());
        assert!(consumer.commit(&positions).is_ok());
    }
}
