//! Snowflake ids: 41 bits of milliseconds since [`EPOCH_MS`], 10 bits of node id,
//! 12 bits of sequence (DESIGN.md section 3).
//!
//! Ids from one generator strictly increase, also when the wall clock steps back:
//! the generator never goes below the last timestamp it used, and borrows the next
//! millisecond when a millisecond's 4,096 sequence numbers are used up.

use parking_lot::Mutex;

/// The Confab epoch: 2025-01-01T00:00:00Z, in ms since the Unix epoch.
pub const EPOCH_MS: i64 = 1_735_689_600_000;
/// Number of distinct node ids.
pub const MAX_NODES: u16 = 1 << NODE_BITS;

const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;
const SEQ_MASK: i64 = (1 << SEQ_BITS) - 1;

/// Generates strictly increasing, node-unique 63-bit ids.
#[derive(Debug)]
pub struct Snowflake {
    /// This process's leased node id, already shifted into place.
    node_bits: i64,
    /// (last timestamp used, last sequence used within it).
    state: Mutex<(i64, i64)>,
    /// Wall clock in ms since the Unix epoch; replaceable in tests.
    clock: fn() -> i64,
}

impl Snowflake {
    /// Returns a generator for `node_id`.
    ///
    /// # Panics
    ///
    /// Panics when `node_id >= MAX_NODES`: node ids come from configuration or a
    /// lease, never from the network.
    pub fn new(node_id: u16) -> Self {
        Self::with_clock(node_id, crate::now_ms)
    }

    /// Returns a generator reading time from `clock`.
    pub fn with_clock(node_id: u16, clock: fn() -> i64) -> Self {
        assert!(node_id < MAX_NODES, "node id {node_id} out of range");
        Self {
            node_bits: i64::from(node_id) << SEQ_BITS,
            state: Mutex::new((0, -1)),
            clock,
        }
    }

    /// Returns the next id.
    pub fn next_id(&self) -> i64 {
        let now = ((self.clock)() - EPOCH_MS).max(0);
        let mut state = self.state.lock();
        let (last_ts, last_seq) = *state;
        let (ts, seq) = if now > last_ts {
            (now, 0)
        } else if last_seq < SEQ_MASK {
            // Same millisecond, or the clock stepped back: stay on the last timestamp.
            (last_ts, last_seq + 1)
        } else {
            // Sequence exhausted: borrow the next millisecond.
            (last_ts + 1, 0)
        };
        *state = (ts, seq);
        (ts << (NODE_BITS + SEQ_BITS)) | self.node_bits | seq
    }
}

/// Returns the ms-since-Unix-epoch timestamp embedded in a Snowflake id.
pub fn timestamp_ms(id: i64) -> i64 {
    (id >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS
}

/// Returns the node id embedded in a Snowflake id.
pub fn node_id(id: i64) -> u16 {
    ((id >> SEQ_BITS) & i64::from(MAX_NODES - 1)) as u16
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;

    static CLOCK: AtomicI64 = AtomicI64::new(EPOCH_MS + 1_000_000);

    fn test_clock() -> i64 {
        CLOCK.load(Ordering::SeqCst)
    }

    /// Ids keep increasing when the wall clock steps back by a second.
    #[test]
    fn monotonic_when_clock_steps_back() {
        let ids = Snowflake::with_clock(7, test_clock);
        let mut last = ids.next_id();
        for step in [0, -1_000, 5, -3, 0] {
            CLOCK.fetch_add(step, Ordering::SeqCst);
            for _ in 0..100 {
                let id = ids.next_id();
                assert!(id > last, "{id} after {last} (step {step})");
                last = id;
            }
        }
    }

    /// More than 4,096 ids in one millisecond stay unique and increasing.
    #[test]
    fn sequence_overflow_borrows_next_millisecond() {
        let ids = Snowflake::with_clock(1, || EPOCH_MS + 42);
        let ids: Vec<i64> = (0..10_000).map(|_| ids.next_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(node_id(ids[9_999]), 1);
    }

    /// Two generators with different node ids never produce the same id.
    #[test]
    fn unique_across_node_ids() {
        let a = Snowflake::with_clock(1, || EPOCH_MS + 5);
        let b = Snowflake::with_clock(2, || EPOCH_MS + 5);
        let mut all: Vec<i64> = (0..5_000)
            .flat_map(|_| [a.next_id(), b.next_id()])
            .collect();
        let len = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), len);
    }

    /// The embedded timestamp and node id read back as written.
    #[test]
    fn fields_round_trip() {
        let ids = Snowflake::with_clock(1023, || EPOCH_MS + 123_456);
        let id = ids.next_id();
        assert_eq!(timestamp_ms(id), EPOCH_MS + 123_456);
        assert_eq!(node_id(id), 1023);
        assert!(id > 0);
    }
}
