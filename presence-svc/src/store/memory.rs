//! An in-memory backend for the unit tests that pause the clock: every call
//! completes at its first poll, so time moves only when a test advances it.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::{BoxFuture, PresenceStore, StoreError, StoredPresence, Visibility};

/// Rows in a map.
#[derive(Debug, Default)]
pub(crate) struct MemoryStore {
    rows: Mutex<HashMap<i64, StoredPresence>>,
}

impl PresenceStore for MemoryStore {
    fn load<'a>(
        &'a self,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, StoredPresence>, StoreError>> {
        let rows = self.rows.lock();
        let found = user_ids
            .iter()
            .filter_map(|id| rows.get(id).map(|row| (*id, *row)))
            .collect();
        Box::pin(std::future::ready(Ok(found)))
    }

    fn write_last_seen<'a>(
        &'a self,
        written: &'a [(i64, i64)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut rows = self.rows.lock();
        for &(user_id, last_seen_ms) in written {
            let row = rows.entry(user_id).or_default();
            row.last_seen_ms = row.last_seen_ms.max(last_seen_ms);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn set_visibility(
        &self,
        user_id: i64,
        visibility: Visibility,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.rows.lock().entry(user_id).or_default().visibility = visibility;
        Box::pin(std::future::ready(Ok(())))
    }
}
