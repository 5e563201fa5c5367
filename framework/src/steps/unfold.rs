//! Expand each message into zero or more messages.

use std::fmt;
use std::marker::PhantomData;
use std::time::Instant;

use crate::clock::SharedClock;
use crate::commit::CommitRequest;
use crate::dropped::DroppingForwarder;
use crate::error::{StrategyError, SubmitError};
use crate::message::{Message, Partition};
use crate::strategy::ProcessingStrategy;

/// Turns each payload into any number of payloads, forwarded in order.
///
/// The input's offset is carried by the *last* output only (the others carry none), so it
/// becomes committable once every output before it is done too, given a next step that
/// finishes messages in order (every built-in step does). An input that unfolds into nothing
/// is done at once, and reported like a [`Filter`](super::Filter)'s dropped messages.
///
/// # Backpressure
///
/// Outputs the next step rejects are held, in order; new input is rejected until all of them
/// are accepted.
///
/// # Examples
///
/// ```
/// use rill::steps::{CommitOffsets, Unfold};
/// use rill::{Message, Partition, ProcessingStrategy, Topic};
///
/// let mut step = Unfold::new(
///     |line: &str| line.split(' ').map(str::to_owned).collect::<Vec<_>>(),
///     CommitOffsets::new(std::time::Duration::ZERO),
/// );
/// let partition = Partition::new(Topic::new("lines"), 0);
/// step.submit(Message::broker("a b c", partition.clone(), 0, None)).unwrap();
///
/// assert_eq!(step.poll().unwrap().unwrap().offsets(&partition), vec![0..1]);
/// ```
pub struct Unfold<F, N, U> {
    function: F,
    next_step: N,
    forwarder: DroppingForwarder<U>,
    output: PhantomData<fn() -> U>,
}

impl<F, N, U> Unfold<F, N, U> {
    /// Expands payloads with `function` in front of `next_step`.
    pub fn new(function: F, next_step: N) -> Self {
        Self {
            function,
            next_step,
            forwarder: DroppingForwarder::new(),
            output: PhantomData,
        }
    }

    /// Reads time from `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.forwarder.set_clock(clock);
        self
    }
}

impl<T, U, I, F, N> ProcessingStrategy<T> for Unfold<F, N, U>
where
    F: FnMut(T) -> I,
    I: IntoIterator<Item = U>,
    N: ProcessingStrategy<U>,
{
    fn submit(&mut self, message: Message<T>) -> Result<(), SubmitError<T>> {
        if self.forwarder.carried_over.is_holding() {
            return Err(SubmitError::MessageRejected(message));
        }
        let (metadata, payload) = message.take();
        let mut outputs = (self.function)(payload).into_iter().peekable();
        if outputs.peek().is_none() {
            self.forwarder.drop_message(&metadata);
            return Ok(());
        }
        let mut metadata = Some(metadata);
        let mut invalid = None;
        while let Some(output) = outputs.next() {
            let message = match metadata.take_if(|_| outputs.peek().is_none()) {
                Some(last) => last.replace(output).0,
                None => Message::derived(output, CommitRequest::new()),
            };
            if invalid.is_some() {
                // Behind an invalid part: kept for the next poll, which reports any further
                // invalid part, so the last one (the input's offsets) is never lost.
                self.forwarder.hold(message);
                continue;
            }
            // Queued behind earlier outputs when the next step is full: order is kept.
            invalid = self.forwarder.forward(&mut self.next_step, message).err();
        }
        invalid.map_or(Ok(()), |invalid| Err(invalid.into()))
    }

    crate::dropped::delegate_to_forwarder!(U);
}

crate::dropped::debug_dropping_step!(Unfold<F, N, U>);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::InvalidMessage;
    use crate::steps::RunTask;
    use crate::testing::{RecordingStep, message, partition};

    fn repeat(n: u32) -> Vec<u32> {
        vec![n; n as usize]
    }

    #[test]
    fn forwards_every_output_in_order() {
        let next = RecordingStep::new();
        let mut step = Unfold::new(repeat, next.clone());

        step.submit(message(0, 2)).unwrap();
        step.submit(message(1, 3)).unwrap();

        assert_eq!(next.payloads(), [2, 2, 3, 3, 3]);
    }

    #[test]
    fn only_the_last_output_carries_the_input_offset() {
        let next = RecordingStep::new();
        let mut step = Unfold::new(repeat, next.clone());

        step.submit(message(7, 3)).unwrap();

        let offsets: Vec<_> = next.messages().iter().map(|m| m.committable()).collect();
        assert!(offsets[0].is_empty() && offsets[1].is_empty());
        assert_eq!(offsets[2].offsets(&partition(0)), vec![7..8]);
    }

    #[test]
    fn an_input_unfolding_into_nothing_is_done() {
        let mut step = Unfold::new(repeat, RecordingStep::new());

        step.submit(message(4, 0)).unwrap();

        let done = step.join(None).unwrap().unwrap();
        assert_eq!(done.offsets(&partition(0)), vec![4..5]);
    }

    #[test]
    fn a_dropped_split_part_hands_its_offsets_to_the_next_message() {
        // The last part of a split batch carries the batch's offsets; earlier parts may still
        // be in flight further down, so they must not be reported upwards yet.
        let next = RecordingStep::new();
        let mut step = Unfold::new(repeat, next.clone());
        let mut batch = CommitRequest::new();
        batch.add_range(&partition(0), 0..2);

        // An earlier part of the batch, still in the next step.
        step.submit(Message::derived(1, CommitRequest::new()))
            .unwrap();
        step.submit(Message::derived(0, batch)).unwrap();
        assert_eq!(step.poll().unwrap(), None);
        step.submit(message(2, 1)).unwrap();

        let carried = next.messages()[1].committable();
        assert_eq!(carried.offsets(&partition(0)), vec![0..3]);
    }

    #[test]
    fn the_parts_after_an_invalid_one_are_kept_and_the_input_committed() {
        // rill lost the parts after an invalid one, the last among them carrying the input's
        // offset: that offset was then never committed.
        let next = RecordingStep::new().commit_on_poll();
        let mut step = Unfold::new(
            |n: u32| vec![n, n + 1, n + 2],
            RunTask::new(
                |m: Message<u32>| match m.payload() {
                    1 => Err(InvalidMessage::of(&m, "one").into()),
                    _ => Ok(m),
                },
                next.clone(),
            ),
        );

        let result = step.submit(message(0, 0));
        let done = step.join(None).unwrap().unwrap();

        assert!(matches!(result, Err(SubmitError::InvalidMessage(_))));
        assert_eq!(next.payloads(), [0, 2]);
        assert_eq!(done.offsets(&partition(0)), vec![0..1]);
    }

    #[test]
    fn rejected_outputs_are_held_in_order_and_new_input_waits() {
        let next = RecordingStep::new().reject_next(2);
        let mut step = Unfold::new(repeat, next.clone());
        step.submit(message(0, 2)).unwrap();

        let second = step.submit(message(1, 1));
        step.poll().unwrap();

        assert!(matches!(second, Err(SubmitError::MessageRejected(_))));
        assert_eq!(next.payloads(), [2, 2]);
    }
}
