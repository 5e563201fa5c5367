//! Tickets that make concurrently prepared batches write one after the other, in order.
//!
//! [`SpansBuffer::write`](super::SpansBuffer::write) must see batches in consumption order, but
//! preparing them (decoding, grouping, compressing) is worth doing ahead, on other threads. A
//! caller takes a ticket per batch in order, prepares however it likes, and writes when its
//! ticket comes up: the next batch is then ready the moment the previous write completes.

use tokio::sync::watch;

/// Hands out tickets in order and lets each holder wait until it is its turn.
#[derive(Debug)]
pub struct WriteOrder {
    next_ticket: std::sync::atomic::AtomicU64,
    next_to_write: watch::Sender<u64>,
}

/// A place in the write order, from [`WriteOrder::ticket`].
#[derive(Debug)]
#[must_use = "a ticket not finished holds up every later one"]
pub struct Ticket(u64);

impl WriteOrder {
    /// A new order; the first ticket writes first.
    pub fn new() -> Self {
        Self {
            next_ticket: std::sync::atomic::AtomicU64::new(0),
            next_to_write: watch::Sender::new(0),
        }
    }

    /// The next place in line. Take tickets in the order the batches must be written.
    pub fn ticket(&self) -> Ticket {
        Ticket(
            self.next_ticket
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        )
    }

    /// Waits until every earlier ticket has finished.
    pub async fn wait_for_turn(&self, ticket: &Ticket) {
        let mut turn = self.next_to_write.subscribe();
        // The sender lives in `self`, so the wait can only end with the turn.
        let _ = turn.wait_for(|&next| next == ticket.0).await;
    }

    /// Lets the next ticket go.
    pub fn finish(&self, ticket: Ticket) {
        self.next_to_write.send_replace(ticket.0 + 1);
    }
}

impl Default for WriteOrder {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tickets_write_in_the_order_they_were_taken() {
        let order = Arc::new(WriteOrder::new());
        let written = Arc::new(Mutex::new(Vec::new()));
        let tickets: Vec<Ticket> = (0..8).map(|_| order.ticket()).collect();
        // Started in reverse, so any order but the tickets' would show.
        let mut tasks = Vec::new();
        for (index, ticket) in tickets.into_iter().enumerate().rev() {
            let order = Arc::clone(&order);
            let written = Arc::clone(&written);
            tasks.push(tokio::spawn(async move {
                order.wait_for_turn(&ticket).await;
                written.lock().unwrap().push(index);
                order.finish(ticket);
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*written.lock().unwrap(), (0..8).collect::<Vec<_>>());
    }
}
