//! CPU work of one flush shared across a few threads.
//!
//! A flush is mostly client CPU (decompressing payloads, patching spans) while Redis waits, so
//! a large flush is split by weight (spans or bytes) over scoped threads, the calling one
//! included. Results keep the input's order. Small flushes stay on the calling thread: starting
//! a thread costs more than it saves.

use std::num::NonZeroUsize;

/// Most threads one flush uses.
const MAX_THREADS: usize = 4;

/// `items` mapped by `f`, in order, on up to [`MAX_THREADS`] threads when their total
/// `weight` is at least `min_weight` per extra thread.
pub(crate) fn map_ordered<T, U, W, F>(items: Vec<T>, weight: W, min_weight: usize, f: F) -> Vec<U>
where
    T: Send,
    U: Send,
    W: Fn(&T) -> usize,
    F: Fn(T) -> U + Sync,
{
    let total: usize = items.iter().map(&weight).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, NonZeroUsize::get)
        .min(MAX_THREADS)
        .min(total / min_weight.max(1));
    if threads < 2 {
        return items.into_iter().map(f).collect();
    }
    let share = total.div_ceil(threads);
    let mut parts: Vec<Vec<T>> = Vec::with_capacity(threads);
    let mut part = Vec::new();
    let mut part_weight = 0;
    for item in items {
        if part_weight >= share {
            parts.push(std::mem::take(&mut part));
            part_weight = 0;
        }
        part_weight += weight(&item);
        part.push(item);
    }
    parts.push(part);
    let f = &f;
    std::thread::scope(|scope| {
        let mut parts = parts.into_iter();
        let first = parts.next().unwrap_or_default();
        let others: Vec<_> = parts
            .map(|part| scope.spawn(move || part.into_iter().map(f).collect::<Vec<U>>()))
            .collect();
        let mut mapped: Vec<U> = first.into_iter().map(f).collect();
        for handle in others {
            match handle.join() {
                Ok(part) => mapped.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        mapped
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_order_whether_split_or_not() {
        let items: Vec<usize> = (0..1000).collect();
        let doubled: Vec<usize> = items.iter().map(|n| n * 2).collect();
        assert_eq!(map_ordered(items.clone(), |_| 1, 10, |n| n * 2), doubled);
        assert_eq!(map_ordered(items, |_| 1, usize::MAX, |n| n * 2), doubled);
        assert!(map_ordered(Vec::<usize>::new(), |_| 1, 1, |n| n).is_empty());
    }

    #[test]
    fn uneven_weights_still_come_back_in_order() {
        let items: Vec<usize> = (0..50).collect();
        let out = map_ordered(items, |&n| if n == 3 { 10_000 } else { 1 }, 100, |n| n);
        assert_eq!(out, (0..50).collect::<Vec<_>>());
    }
}
