//! Typing indicators: who is typing where, until when, and each user's rate
//! limit. Pure and synchronous, like `tracker`.
//!
//! Rules:
//!
//! - A "typing" lasts the ttl unless renewed (another "typing") or stopped;
//!   [`Typing::expire`] ends the overdue ones, and the caller tells the other
//!   members it stopped.
//! - A "stopped" without a running "typing" is nothing to tell anyone.
//! - Every typing event, start or stop, takes a token from the user's bucket
//!   (`typing_per_minute` tokens, refilled at that rate); without a token the
//!   event is refused with the time until the next one.
//! - Nothing here is ever stored: typing is ephemeral.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// A running "typing".
#[derive(Debug)]
struct Active {
    /// When it ends unless renewed.
    expires: Instant,
    /// The other members at the start, told when it ends.
    recipients: Arc<[i64]>,
}

/// A user's token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was computed.
    at: Instant,
}

/// A "typing" that ended by itself or because its user went away.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Ended {
    pub(crate) conversation_id: i64,
    pub(crate) user_id: i64,
    pub(crate) recipients: Arc<[i64]>,
}

/// Running typings and rate-limit buckets.
#[derive(Debug)]
pub(crate) struct Typing {
    /// By (conversation, user).
    active: HashMap<(i64, i64), Active>,
    /// By user; a full bucket is dropped (absent means full).
    buckets: HashMap<i64, Bucket>,
    ttl: Duration,
    /// Bucket size, and tokens per minute.
    per_minute: f64,
}

impl Typing {
    /// Returns a state with nobody typing; `per_minute` must be positive.
    pub(crate) fn new(ttl: Duration, per_minute: u32) -> Self {
        debug_assert!(per_minute > 0, "validated by PresenceConfig::problem");
        Self {
            active: HashMap::new(),
            buckets: HashMap::new(),
            ttl,
            per_minute: f64::from(per_minute.max(1)),
        }
    }

    /// Takes one token of `user_id`'s bucket.
    ///
    /// # Errors
    ///
    /// The time until the next token when the bucket is empty.
    pub(crate) fn acquire(&mut self, user_id: i64, now: Instant) -> Result<(), Duration> {
        let per_second = self.per_minute / 60.0;
        let bucket = self.buckets.entry(user_id).or_insert(Bucket {
            tokens: self.per_minute,
            at: now,
        });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.per_minute);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            let wait = (1.0 - bucket.tokens) / per_second;
            return Err(Duration::from_secs_f64(wait).max(Duration::from_millis(1)));
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    /// Starts or renews `user_id`'s typing in `conversation_id`.
    pub(crate) fn start(
        &mut self,
        conversation_id: i64,
        user_id: i64,
        recipients: Arc<[i64]>,
        now: Instant,
    ) {
        let active = Active {
            expires: now + self.ttl,
            recipients,
        };
        self.active.insert((conversation_id, user_id), active);
    }

    /// Stops `user_id`'s typing; returns who to tell, `None` if it was not running.
    pub(crate) fn stop(&mut self, conversation_id: i64, user_id: i64) -> Option<Arc<[i64]>> {
        let active = self.active.remove(&(conversation_id, user_id))?;
        Some(active.recipients)
    }

    /// Ends every typing due at `now`.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Ended> {
        let mut ended = Vec::new();
        self.active.retain(|&(conversation_id, user_id), active| {
            if active.expires > now {
                return true;
            }
            ended.push(Ended {
                conversation_id,
                user_id,
                recipients: Arc::clone(&active.recipients),
            });
            false
        });
        ended
    }

    /// Ends every typing of the users `gone` says went offline.
    pub(crate) fn end_users(&mut self, gone: impl Fn(i64) -> bool) -> Vec<Ended> {
        let mut ended = Vec::new();
        self.active.retain(|&(conversation_id, user_id), active| {
            if !gone(user_id) {
                return true;
            }
            ended.push(Ended {
                conversation_id,
                user_id,
                recipients: Arc::clone(&active.recipients),
            });
            false
        });
        ended
    }

    /// Drops the buckets that have refilled by `now` (they read as full anyway).
    pub(crate) fn trim_buckets(&mut self, now: Instant) {
        let per_second = self.per_minute / 60.0;
        let full = self.per_minute;
        self.buckets.retain(|_, bucket| {
            let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * per_second;
            bucket.tokens + refill < full
        });
    }

    /// Returns how many buckets are held, for the tests.
    #[cfg(test)]
    pub(crate) fn bucket_count(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucket lets `per_minute` events through at once, then one per
    /// 60 / `per_minute` seconds, and says how long to wait.
    #[test]
    fn token_bucket() {
        let mut typing = Typing::new(Duration::from_secs(6), 60);
        let t0 = Instant::now();
        for _ in 0..60 {
            typing.acquire(1, t0).unwrap();
        }
        assert_eq!(typing.acquire(1, t0), Err(Duration::from_secs(1)));
        typing.acquire(2, t0).expect("buckets are per user");
        let half = t0 + Duration::from_millis(500);
        assert_eq!(typing.acquire(1, half), Err(Duration::from_millis(500)));
        typing.acquire(1, t0 + Duration::from_secs(1)).unwrap();
        typing.trim_buckets(t0 + Duration::from_secs(60));
        assert_eq!(typing.bucket_count(), 1, "user 1 is one token short");
        typing.trim_buckets(t0 + Duration::from_secs(62));
        assert_eq!(typing.bucket_count(), 0);
    }

    /// A renewed typing expires a ttl after the renewal; a stopped one never.
    #[test]
    fn renew_stop_expire() {
        let ttl = Duration::from_secs(6);
        let mut typing = Typing::new(ttl, 60);
        let t0 = Instant::now();
        let others: Arc<[i64]> = Arc::from(vec![2, 3]);
        typing.start(10, 1, Arc::clone(&others), t0);
        typing.start(11, 1, Arc::clone(&others), t0);
        typing.start(10, 1, Arc::clone(&others), t0 + Duration::from_secs(4));
        assert_eq!(typing.stop(11, 1).as_deref(), Some(&[2, 3][..]));
        assert_eq!(typing.stop(11, 1), None);
        assert!(typing.expire(t0 + ttl).is_empty());
        let ended = typing.expire(t0 + Duration::from_secs(10));
        assert_eq!(ended.len(), 1);
        assert_eq!((ended[0].conversation_id, ended[0].user_id), (10, 1));
    }
}
