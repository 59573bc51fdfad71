//! The operations of the presence service, and the rules of who sees what.
//!
//! **Online** (to people who share a direct conversation or a group with the
//! user, and to the user): while any connection of the user heartbeated within
//! the window. A `Heartbeat` for an unknown connection registers it; a
//! `Disconnect` of the last connection makes the user offline at once; the
//! sweeper drops connections that went silent (a phone that lost its network).
//! Each change is pushed to `Audience::Watchers(user)`.
//!
//! **Last seen** (the last heartbeat before the last connection went away), by
//! the user's choice: EVERYONE shows it to anyone, strangers included (but
//! never their online status); CONTACTS (the default) to those sharing a
//! conversation; NOBODY to nobody (0), the user excepted. A watcher who may see
//! nothing of a user gets no entry at all: a stranger does not even learn that
//! the user exists.
//!
//! **Leases** (a store shared between processes, the distributed mode): a user
//! coming online gets a lease at once, renewed once per lease period while
//! they stay online (heartbeats themselves never write) and released when they
//! go offline; a `Query` also counts a user online while another process holds
//! their lease.
//!
//! **Typing** goes to the other members of a direct conversation or group
//! (never a channel), through `Audience::User`: only their live devices get it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant as StdInstant;

use confab_common::bus::{Audience, LiveEvent};
use confab_proto::group::v1::SharedWithRequest;
use confab_proto::v1::{Event, Presence, TypingState, event::Kind};
use tokio::time::Instant;

use crate::error::PresenceError;
use crate::store::{StoredPresence, Visibility};
use crate::tracker::{Seen, WentOffline};
use crate::typing::Ended;
use crate::{PresenceService, State};

/// Most user ids in one `Query` (the edge's `WatchPresence` limit).
pub(crate) const MAX_QUERY_IDS: usize = 256;

/// The answer to a `Query`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct QueryResult {
    /// `(user_id, online, last_seen_ms)` of the users the watcher may see
    /// something of, in the order asked.
    pub(crate) presences: Vec<(i64, bool, i64)>,
    /// The users whose changes the watcher may follow live.
    pub(crate) watchable_ids: Vec<i64>,
}

impl PresenceService {
    /// Records a heartbeat of `user_id`'s connection `(node, connection_id)`,
    /// registering the connection if new; pushes "online" when it is the
    /// user's first.
    ///
    /// # Errors
    ///
    /// [`PresenceError::ShuttingDown`] after shutdown; [`PresenceError::Store`]
    /// when the row of a user coming back cannot be read.
    pub(crate) async fn heartbeat(
        &self,
        user_id: i64,
        node: &str,
        connection_id: u64,
    ) -> Result<(), PresenceError> {
        if user_id <= 0 {
            return Err(PresenceError::InvalidArgument("user_id must be positive"));
        }
        let mut loaded: Option<(u64, StoredPresence)> = None;
        loop {
            if self.inner.closed.load(Ordering::SeqCst) {
                return Err(PresenceError::ShuttingDown);
            }
            let epoch = {
                let mut state = self.inner.state.lock();
                if let Some((epoch, stored)) = loaded
                    && epoch == state.privacy_epoch
                {
                    state.tracker.load(user_id, stored);
                }
                let now = Instant::now();
                let now_ms = self.inner.clock.ms(now);
                match state
                    .tracker
                    .heartbeat(user_id, node, connection_id, now, now_ms)
                {
                    Ok(came_online) => {
                        if came_online {
                            metrics::gauge!("confab_presence_online_users")
                                .set(state.tracker.online_users() as f64);
                            if self.inner.lease_period.is_some()
                                && let Some(lease) = state.tracker.lease(user_id, now)
                            {
                                self.inner.store.put_online(&[lease]);
                            }
                            let seen = state.tracker.seen(user_id);
                            let last_seen =
                                seen.map_or(0, |s| shown_to_watchers(s.visibility, s.last_seen_ms));
                            self.publish(vec![presence_event(user_id, true, last_seen)]);
                        }
                        return Ok(());
                    }
                    Err(_) => state.privacy_epoch,
                }
            };
            // Not tracked: the user comes back. Read their row without the lock.
            let rows = self.inner.store.load(&[user_id]).await?;
            loaded = Some((epoch, rows.get(&user_id).copied().unwrap_or_default()));
        }
    }

    /// Forgets the connection; pushes "offline" when it was the user's last,
    /// and answers once a shared store holds their last seen.
    pub(crate) async fn disconnect(&self, user_id: i64, node: &str, connection_id: u64) {
        let went_offline = {
            let mut state = self.inner.state.lock();
            let Some(offline) = state.tracker.disconnect(user_id, node, connection_id) else {
                return;
            };
            metrics::gauge!("confab_presence_online_users")
                .set(state.tracker.online_users() as f64);
            let events = self.went_offline(&mut state, &[offline]);
            self.publish(events);
            true
        };
        if went_offline {
            self.inner.store.flush().await;
        }
    }

    /// Returns the presence of `user_ids` as `watcher_id` may see it (see the
    /// module docs), and which of them the watcher may follow live.
    ///
    /// # Errors
    ///
    /// [`PresenceError::InvalidArgument`] beyond [`MAX_QUERY_IDS`] ids;
    /// [`PresenceError::GroupsUnavailable`] when group-svc cannot say who shares
    /// a conversation with the watcher; [`PresenceError::Store`].
    pub(crate) async fn query(
        &self,
        watcher_id: i64,
        user_ids: &[i64],
    ) -> Result<QueryResult, PresenceError> {
        if user_ids.len() > MAX_QUERY_IDS {
            return Err(PresenceError::InvalidArgument(
                "at most 256 user ids per query",
            ));
        }
        let mut unique = HashSet::with_capacity(user_ids.len());
        let ids: Vec<i64> = user_ids
            .iter()
            .copied()
            .filter(|&id| id > 0 && unique.insert(id))
            .collect();
        let others: Vec<i64> = ids.iter().copied().filter(|&id| id != watcher_id).collect();
        let shared: HashSet<i64> = if others.is_empty() {
            HashSet::new()
        } else {
            let request = SharedWithRequest {
                user_id: watcher_id,
                other_ids: others,
            };
            let response = self
                .inner
                .groups
                .clone()
                .shared_with(request)
                .await
                .map_err(PresenceError::GroupsUnavailable)?;
            response.into_inner().user_ids.into_iter().collect()
        };
        let mut seen: Vec<Option<Seen>> = {
            let state = self.inner.state.lock();
            ids.iter().map(|&id| state.tracker.seen(id)).collect()
        };
        // A shared store also knows the users online through other processes:
        // ask it about everyone this process does not hold online.
        let shared_store = self.inner.lease_period.is_some();
        let needs_store = |seen: &Option<Seen>| match seen {
            None => true,
            Some(seen) => shared_store && !seen.online,
        };
        let missing: Vec<i64> = ids
            .iter()
            .zip(&seen)
            .filter(|(_, seen)| needs_store(seen))
            .map(|(&id, _)| id)
            .collect();
        if !missing.is_empty() {
            let rows = self.inner.store.load(&missing).await?;
            for (id, seen) in ids.iter().zip(&mut seen) {
                if !needs_store(seen) {
                    continue;
                }
                let row = rows.get(id).copied().unwrap_or_default();
                let tracked_ms = seen.map_or(0, |seen| seen.last_seen_ms);
                *seen = Some(Seen {
                    online: row.online,
                    last_seen_ms: tracked_ms.max(row.last_seen_ms),
                    visibility: row.visibility,
                });
            }
        }
        let mut result = QueryResult::default();
        for (&id, seen) in ids.iter().zip(seen) {
            let seen = seen.unwrap_or(Seen {
                online: false,
                last_seen_ms: 0,
                visibility: Visibility::default(),
            });
            let relation = if id == watcher_id {
                Relation::Itself
            } else if shared.contains(&id) {
                result.watchable_ids.push(id);
                Relation::Shares
            } else {
                Relation::Stranger
            };
            if let Some(presence) = visible(relation, seen) {
                result.presences.push((id, presence.0, presence.1));
            }
        }
        Ok(result)
    }

    /// Starts (`typing`) or stops `user_id`'s typing in `conversation_id` and
    /// tells the other members; see `typing` for renewal and expiry.
    ///
    /// # Errors
    ///
    /// [`PresenceError::RateLimited`] beyond `typing_per_minute`;
    /// [`PresenceError::ConversationNotFound`] for a conversation the user is
    /// not in; [`PresenceError::InvalidArgument`] for a channel;
    /// [`PresenceError::GroupsUnavailable`].
    pub(crate) async fn typing(
        &self,
        user_id: i64,
        conversation_id: i64,
        typing: bool,
    ) -> Result<(), PresenceError> {
        // Before the membership lookup: a flood of typing for made-up
        // conversations must not turn into a flood of group-svc calls.
        let limited = self
            .inner
            .state
            .lock()
            .typing
            .acquire(user_id, Instant::now());
        if let Err(retry_after) = limited {
            metrics::counter!("confab_presence_typing_limited_total").increment(1);
            return Err(PresenceError::RateLimited { retry_after });
        }
        let members = self.inner.members.get(conversation_id).await?;
        if members.is_channel {
            // Only a subscriber learns that typing has no place here; anyone
            // else gets the answer of a conversation that does not exist.
            if !self
                .inner
                .members
                .is_member(conversation_id, user_id)
                .await?
            {
                return Err(PresenceError::ConversationNotFound);
            }
            return Err(PresenceError::InvalidArgument("no typing in channels"));
        }
        if !members.contains(user_id) {
            return Err(PresenceError::ConversationNotFound);
        }
        let mut state = self.inner.state.lock();
        if typing {
            let recipients = members.others(user_id);
            let events = typing_events(conversation_id, user_id, true, &recipients);
            state
                .typing
                .start(conversation_id, user_id, recipients, Instant::now());
            self.publish(events);
        } else if let Some(recipients) = state.typing.stop(conversation_id, user_id) {
            self.publish(typing_events(conversation_id, user_id, false, &recipients));
        }
        Ok(())
    }

    /// Stores `user_id`'s privacy choice.
    ///
    /// # Errors
    ///
    /// [`PresenceError::Store`] when it cannot be written.
    pub(crate) async fn set_privacy(
        &self,
        user_id: i64,
        visibility: Visibility,
    ) -> Result<(), PresenceError> {
        let _serial = self.inner.privacy_writes.lock().await;
        self.inner.store.set_visibility(user_id, visibility).await?;
        let mut state = self.inner.state.lock();
        state.tracker.set_visibility(user_id, visibility);
        state.privacy_epoch += 1;
        Ok(())
    }

    /// Returns `user_id`'s privacy choice (the default when never set).
    ///
    /// # Errors
    ///
    /// [`PresenceError::Store`] when it cannot be read.
    pub(crate) async fn privacy(&self, user_id: i64) -> Result<Visibility, PresenceError> {
        let rows = self.inner.store.load(&[user_id]).await?;
        Ok(rows
            .get(&user_id)
            .map(|row| row.visibility)
            .unwrap_or_default())
    }

    /// Drops silent connections, ends overdue typings, and writes the due
    /// last-seen rows in one transaction.
    pub(crate) async fn sweep(&self, now: Instant) {
        let rows = {
            let mut state = self.inner.state.lock();
            let offline = state.tracker.expire(now);
            let mut events = self.went_offline(&mut state, &offline);
            for ended in state.typing.expire(now) {
                events.extend(ended_events(&ended));
            }
            self.publish(events);
            if !offline.is_empty() {
                metrics::gauge!("confab_presence_online_users")
                    .set(state.tracker.online_users() as f64);
            }
            state.typing.trim_buckets(now);
            if let Some(period) = self.inner.lease_period {
                let leases = state.tracker.take_leases(now, period);
                if !leases.is_empty() {
                    self.inner.store.put_online(&leases);
                }
            }
            let rows = state.tracker.take_writes(now, false);
            state.tracker.evict(now);
            rows
        };
        self.inner.members.trim(now);
        self.write(rows).await;
    }

    /// Marks everyone offline and writes every changed row (shutdown).
    pub(crate) async fn flush_all(&self) {
        let rows = {
            let mut state = self.inner.state.lock();
            let offline = state.tracker.disconnect_all();
            let events = self.went_offline(&mut state, &offline);
            self.publish(events);
            metrics::gauge!("confab_presence_online_users").set(0.0);
            state.tracker.take_writes(Instant::now(), true)
        };
        let count = rows.len();
        self.write(rows).await;
        tracing::info!(rows = count, "presence flushed");
    }

    /// Writes `rows` in one transaction; on failure they are retried later.
    async fn write(&self, rows: Vec<(i64, i64)>) {
        if rows.is_empty() {
            return;
        }
        match self.inner.store.write_last_seen(&rows).await {
            Ok(()) => {
                let written = rows.len() as u64;
                self.inner
                    .store_writes
                    .fetch_add(written, Ordering::Relaxed);
                metrics::counter!("confab_presence_store_writes_total").increment(written);
            }
            Err(error) => {
                tracing::error!(error = %error, source = ?std::error::Error::source(&error), rows = rows.len(), "last-seen write failed");
                self.inner.state.lock().tracker.write_failed(&rows);
            }
        }
    }

    /// Releases the leases of users who went offline (with a shared store),
    /// and returns their events: "offline" to their watchers, and "stopped
    /// typing" wherever they were typing.
    fn went_offline(&self, state: &mut State, offline: &[WentOffline]) -> Vec<Arc<LiveEvent>> {
        if offline.is_empty() {
            return Vec::new();
        }
        if self.inner.lease_period.is_some() {
            let gone: Vec<(i64, i64)> = offline
                .iter()
                .map(|gone| (gone.user_id, gone.last_seen_ms))
                .collect();
            self.inner.store.put_offline(&gone);
        }
        let mut events: Vec<Arc<LiveEvent>> = offline
            .iter()
            .map(|gone| {
                let last_seen = shown_to_watchers(gone.visibility, gone.last_seen_ms);
                presence_event(gone.user_id, false, last_seen)
            })
            .collect();
        let gone: HashSet<i64> = offline.iter().map(|gone| gone.user_id).collect();
        for ended in state.typing.end_users(|user_id| gone.contains(&user_id)) {
            events.extend(ended_events(&ended));
        }
        events
    }

    fn publish(&self, events: Vec<Arc<LiveEvent>>) {
        if !events.is_empty() {
            self.inner.bus.publish(&events);
        }
    }
}

/// How the watcher relates to a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relation {
    /// The watcher asks about themself.
    Itself,
    /// They share a direct conversation or a group.
    Shares,
    Stranger,
}

/// Returns `(online, last_seen_ms)` as the watcher may see them, `None` when
/// the watcher may see nothing of the user.
fn visible(relation: Relation, seen: Seen) -> Option<(bool, i64)> {
    match relation {
        Relation::Itself => Some((seen.online, seen.last_seen_ms)),
        Relation::Shares => Some((
            seen.online,
            shown_to_watchers(seen.visibility, seen.last_seen_ms),
        )),
        Relation::Stranger => {
            let shown = seen.visibility == Visibility::Everyone && seen.last_seen_ms > 0;
            shown.then_some((false, seen.last_seen_ms))
        }
    }
}

/// Returns the last seen shown to people who share a conversation with the
/// user (every watcher does): hidden (0) only for NOBODY.
fn shown_to_watchers(visibility: Visibility, last_seen_ms: i64) -> i64 {
    if visibility == Visibility::Nobody {
        0
    } else {
        last_seen_ms
    }
}

fn presence_event(user_id: i64, online: bool, last_seen_ms: i64) -> Arc<LiveEvent> {
    let presence = Presence {
        user_id,
        online,
        last_seen_ms,
    };
    live_event(Audience::Watchers(user_id), Kind::Presence(presence))
}

fn typing_events(
    conversation_id: i64,
    user_id: i64,
    typing: bool,
    recipients: &[i64],
) -> Vec<Arc<LiveEvent>> {
    let state = TypingState {
        conversation_id,
        user_id,
        typing,
    };
    recipients
        .iter()
        .map(|&member| live_event(Audience::User(member), Kind::Typing(state)))
        .collect()
}

fn ended_events(ended: &Ended) -> Vec<Arc<LiveEvent>> {
    typing_events(
        ended.conversation_id,
        ended.user_id,
        false,
        &ended.recipients,
    )
}

/// Returns an ephemeral event (seq 0: in nobody's sequence, never synced).
fn live_event(audience: Audience, kind: Kind) -> Arc<LiveEvent> {
    Arc::new(LiveEvent {
        audience,
        event: Event {
            seq: 0,
            kind: Some(kind),
        },
        origin_device: None,
        accepted_at: StdInstant::now(),
    })
}

#[cfg(test)]
mod tests;
