//! A fast hasher for the maps keyed by partition or topic that the loop touches per message.
//!
//! The standard library's SipHash resists hash flooding, which matters for keys an attacker
//! chooses; partitions and topic names come from our own configuration and broker metadata,
//! and hashing one with SipHash costs more than the rest of the bookkeeping for a message.
//! FNV-1a over the same bytes keeps hashing consistent with equality.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// FNV-1a, 64 bits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A `HashMap` hashing with [`Fnv`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;
    use crate::message::{Partition, Topic};

    #[test]
    fn equal_partitions_from_distinct_topic_names_hash_alike() {
        let build = BuildHasherDefault::<Fnv>::default();
        let a = Partition::new(Topic::new("events"), 3);
        let b = Partition::new(Topic::new("events"), 3);

        assert_eq!(build.hash_one(&a), build.hash_one(&b));
        assert_ne!(
            build.hash_one(&a),
            build.hash_one(Partition::new(Topic::new("events"), 4))
        );
    }
}
