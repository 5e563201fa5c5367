//! Parse once, then drop or pass on: a [`Filter`](super::Filter) and a map in one step.
//!
//! A consumer that must parse a message to know whether it wants it (drop heartbeats, keep
//! events) would otherwise parse twice, once in the predicate and once in the map, or carry
//! an `Option` through the rest of the pipeline.

use std::fmt;
use std::marker::PhantomData;
use std::time::Instant;

use super::CommitPolicy;
use crate::clock::SharedClock;
use crate::commit::CommitRequest;
use crate::dropped::DroppingForwarder;
use crate::error::{InvalidMessage, StrategyError, SubmitError};
use crate::message::{Message, Partition};
use crate::strategy::ProcessingStrategy;

/// Turns each message into `Some(payload)`, forwarded, or `None`, dropped; an `Err(reason)`
/// marks the message invalid (dead-lettered with that reason).
///
/// A dropped message is done, reported like a [`Filter`](super::Filter)'s.
///
/// # Examples
///
/// ```
/// use rill::steps::{CommitOffsets, FilterMap};
/// use rill::{Message, Partition, ProcessingStrategy, Topic};
///
/// // "hb" is a heartbeat (dropped), numbers go on parsed, anything else is invalid.
/// let mut step = FilterMap::new(
///     |m: &Message<&str>| match *m.payload() {
///         "hb" => Ok(None),
///         text => text.parse::<u64>().map(Some),
///     },
///     CommitOffsets::new(std::time::Duration::ZERO),
/// );
/// let partition = Partition::new(Topic::new("events"), 0);
/// step.submit(Message::broker("hb", partition.clone(), 0, None)).unwrap();
/// step.submit(Message::broker("7", partition.clone(), 1, None)).unwrap();
/// assert!(step.submit(Message::broker("x", partition.clone(), 2, None)).is_err());
///
/// assert_eq!(step.poll().unwrap().unwrap().offsets(&partition), vec![0..2]);
/// ```
pub struct FilterMap<F, N, U> {
    function: F,
    next_step: N,
    forwarder: DroppingForwarder<U>,
    output: PhantomData<fn() -> U>,
}

impl<F, N, U> FilterMap<F, N, U> {
    /// Maps or drops messages with `function` in front of `next_step`.
    pub fn new(function: F, next_step: N) -> Self {
        Self {
            function,
            next_step,
            forwarder: DroppingForwarder::new().counting_as_filtered("filter_map"),
            output: PhantomData,
        }
    }

    crate::dropped::dropping_builders!();
}

impl<T, U, E, F, N> ProcessingStrategy<T> for FilterMap<F, N, U>
where
    F: FnMut(&Message<T>) -> Result<Option<U>, E>,
    E: fmt::Display,
    N: ProcessingStrategy<U>,
{
    fn submit(&mut self, message: Message<T>) -> Result<(), SubmitError<T>> {
        if self.forwarder.carried_over.is_holding() {
            return Err(SubmitError::MessageRejected(message));
        }
        match (self.function)(&message) {
            Ok(Some(output)) => {
                let (message, _) = message.replace(output);
                self.forwarder.forward(&mut self.next_step, message)?;
            }
            Ok(None) => self.forwarder.drop_message(&message),
            Err(reason) => return Err(InvalidMessage::of(&message, reason.to_string()).into()),
        }
        Ok(())
    }

    crate::dropped::delegate_to_forwarder!(U);
}

crate::dropped::debug_dropping_step!(FilterMap<F, N, U>);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{RecordingStep, message, partition};

    fn halve_evens(m: &Message<u32>) -> Result<Option<u32>, String> {
        match *m.payload() {
            0 => Err("zero".to_owned()),
            n if n % 2 == 0 => Ok(Some(n / 2)),
            _ => Ok(None),
        }
    }

    #[test]
    fn forwards_mapped_payloads_and_drops_the_others() {
        let next = RecordingStep::new().commit_on_poll();
        let mut step = FilterMap::new(halve_evens, next.clone());

        for (offset, n) in [1, 2, 3, 4].into_iter().enumerate() {
            step.submit(message(offset as u64, n)).unwrap();
        }

        assert_eq!(next.payloads(), [1, 2]);
        let done = step.poll().unwrap().unwrap();
        assert_eq!(done.offsets(&partition(0)), vec![0..4]);
    }

    #[test]
    fn an_error_marks_the_message_invalid_with_its_reason() {
        let mut step = FilterMap::new(halve_evens, RecordingStep::new());

        let result = step.submit(message(3, 0));

        let Err(SubmitError::InvalidMessage(invalid)) = result else {
            panic!("expected an invalid message");
        };
        assert_eq!((invalid.offset(), invalid.reason()), (Some(3), "zero"));
    }

    #[test]
    fn rejects_while_holding_a_mapped_message() {
        let next = RecordingStep::new().reject_next(1);
        let mut step = FilterMap::new(halve_evens, next.clone());
        step.submit(message(0, 2)).unwrap();

        let result = step.submit(message(1, 4));

        assert!(matches!(result, Err(SubmitError::MessageRejected(_))));
        step.poll().unwrap();
        assert_eq!(next.payloads(), [1]);
    }
}
