//! Abuse limits of the edge: rates per user (sends, conversation creations,
//! invitations), failed logins per account and per address, live connections
//! per address, and the WebSocket `Origin` allow-list.
//!
//! Every refusal is a RESOURCE_EXHAUSTED status whose message ends in a retry
//! hint ("retry in N ms"), also given as `retry-after-ms` metadata; the caller's
//! connection and every other user are left alone.
//!
//! Every refusal of any limit of the edge, here or in the transports, counts in
//! `confab_refusals_total{reason}` ([`Refusal`]), so that an attack shows on a
//! dashboard before it shows in latency.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, NotUntil, Quota, RateLimiter};
use parking_lot::Mutex;
use tonic::Status;

use crate::GatewayConfig;

/// The window failed logins are counted in.
const LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// Above this many tracked keys, expired login windows are swept on insert.
const LOGIN_SWEEP_AT: usize = 10_000;

/// Why the edge refused something: the `reason` label of
/// `confab_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A user sent messages beyond the burst and sustained rate.
    SendRate,
    /// A user created groups or channels beyond the rate.
    CreationRate,
    /// A user added members beyond the rate.
    InvitationRate,
    /// A login while the account or the address had too many failures.
    LoginFailures,
    /// A connection beyond the address's maximum.
    ConnectionsPerAddress,
    /// A connection beyond the user's maximum.
    ConnectionsPerUser,
    /// A WebSocket upgrade or gRPC-web call from a browser origin not on the
    /// allow-list.
    Origin,
    /// A client frame beyond the size limit.
    FrameSize,
    /// A connection that did not send its request headers (HTTP/1.1) or its
    /// preface and settings (h2c) within the header-read timeout.
    HeaderTimeout,
}

impl Refusal {
    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::SendRate => "send_rate",
            Self::CreationRate => "creation_rate",
            Self::InvitationRate => "invitation_rate",
            Self::LoginFailures => "login_failures",
            Self::ConnectionsPerAddress => "connections_per_address",
            Self::ConnectionsPerUser => "connections_per_user",
            Self::Origin => "origin",
            Self::FrameSize => "frame_size",
            Self::HeaderTimeout => "header_timeout",
        }
    }

    /// Counts one refusal of this kind.
    pub(crate) fn count(self) {
        metrics::counter!("confab_refusals_total", "reason" => self.as_str()).increment(1);
    }
}

/// The limits of one gateway node, built from its [`GatewayConfig`].
#[derive(Debug)]
pub(crate) struct Limits {
    /// Messages per user, over every device and both send paths.
    sends: DefaultKeyedRateLimiter<i64>,
    /// Groups and channels created per user.
    creations: DefaultKeyedRateLimiter<i64>,
    /// User ids passed to `AddMembers` per user.
    invitations: DefaultKeyedRateLimiter<i64>,
    /// The largest `AddMembers` one minute's budget allows.
    invitations_per_minute: u32,
    /// Failed logins per username.
    login_by_account: FailureWindow<String>,
    /// Failed logins per remote address.
    login_by_address: FailureWindow<IpAddr>,
    /// Live connections (WebSocket and gRPC streams) per remote address.
    by_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Most live connections of one address.
    max_per_address: usize,
    /// Most live connections of one user on this node.
    pub(crate) max_per_user: usize,
    /// Browser origins allowed to open a WebSocket or call through gRPC-web;
    /// `None` allows any.
    allowed_origins: Option<Vec<String>>,
}

impl Limits {
    /// Returns the limits `config` asks for; zero rates are raised to one.
    pub(crate) fn new(config: &GatewayConfig) -> Self {
        let per_minute = |n: u32| Quota::per_minute(at_least_one(n));
        let sends = Quota::per_second(at_least_one(config.send_per_second))
            .allow_burst(at_least_one(config.send_burst));
        let allowed_origins = config
            .allowed_origins
            .iter()
            .all(|origin| origin != "*")
            .then(|| {
                config
                    .allowed_origins
                    .iter()
                    .map(|o| normalise(o))
                    .collect()
            });
        Self {
            sends: RateLimiter::keyed(sends),
            creations: RateLimiter::keyed(per_minute(config.creations_per_minute)),
            invitations: RateLimiter::keyed(per_minute(config.invitations_per_minute)),
            invitations_per_minute: config.invitations_per_minute.max(1),
            login_by_account: FailureWindow::new(config.login_failures_per_minute),
            login_by_address: FailureWindow::new(config.login_failures_per_minute),
            by_address: Arc::default(),
            max_per_address: config.max_connections_per_ip,
            max_per_user: config.max_connections_per_user,
            allowed_origins,
        }
    }

    /// Takes one send of `user_id`.
    ///
    /// # Errors
    ///
    /// RESOURCE_EXHAUSTED with a retry hint beyond the burst and sustained rate.
    pub(crate) fn send(&self, user_id: i64) -> Result<(), Status> {
        self.sends.check_key(&user_id).map_err(|not_until| {
            Refusal::SendRate.count();
            rate_limited("too many messages", &not_until)
        })
    }

    /// Takes one conversation creation of `user_id`.
    ///
    /// # Errors
    ///
    /// RESOURCE_EXHAUSTED with a retry hint beyond the rate.
    pub(crate) fn creation(&self, user_id: i64) -> Result<(), Status> {
        self.creations.check_key(&user_id).map_err(|not_until| {
            Refusal::CreationRate.count();
            rate_limited("too many conversations created", &not_until)
        })
    }

    /// Takes `count` invitations of `user_id` (all or none).
    ///
    /// # Errors
    ///
    /// RESOURCE_EXHAUSTED with a retry hint beyond the rate, or when `count`
    /// exceeds a whole minute's budget.
    pub(crate) fn invitations(&self, user_id: i64, count: usize) -> Result<(), Status> {
        let Some(count) = u32::try_from(count).ok().and_then(NonZeroU32::new) else {
            return match count {
                0 => Ok(()),
                _ => Err(self.too_many_invitations()),
            };
        };
        match self.invitations.check_key_n(&user_id, count) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                Refusal::InvitationRate.count();
                Err(rate_limited("too many invitations", &not_until))
            }
            Err(_) => Err(self.too_many_invitations()),
        }
    }

    fn too_many_invitations(&self) -> Status {
        Refusal::InvitationRate.count();
        Status::resource_exhausted(format!(
            "at most {} invitations per minute",
            self.invitations_per_minute
        ))
    }

    /// Checks that `username` and `address` may try to log in now.
    ///
    /// # Errors
    ///
    /// RESOURCE_EXHAUSTED with a retry hint while either had too many failures
    /// within the last minute.
    pub(crate) fn login_allowed(
        &self,
        username: &str,
        address: Option<IpAddr>,
    ) -> Result<(), Status> {
        let account = self.login_by_account.blocked_for(&account_key(username));
        let address = address.and_then(|ip| self.login_by_address.blocked_for(&ip));
        match account.max(address) {
            None => Ok(()),
            Some(wait) => {
                Refusal::LoginFailures.count();
                Err(retry_status("too many failed logins", wait))
            }
        }
    }

    /// Counts one failed login of `username` from `address`.
    pub(crate) fn login_failed(&self, username: &str, address: Option<IpAddr>) {
        self.login_by_account.fail(account_key(username));
        if let Some(ip) = address {
            self.login_by_address.fail(ip);
        }
    }

    /// Takes a connection slot of `address`, released when the slot drops;
    /// `None` when the address holds its maximum already.
    pub(crate) fn connection_slot(&self, address: IpAddr) -> Option<AddressSlot> {
        let mut counts = self.by_address.lock();
        let count = counts.entry(address).or_default();
        if *count >= self.max_per_address {
            Refusal::ConnectionsPerAddress.count();
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            counts: self.by_address.clone(),
            address,
        })
    }

    /// Returns whether a request with this `Origin` header may go on: native
    /// clients send none; a browser's must be on the allow-list (a refusal is
    /// counted).
    pub(crate) fn origin_header_allowed(&self, origin: Option<&http::HeaderValue>) -> bool {
        match origin.map(http::HeaderValue::to_str) {
            None => true,
            Some(Ok(origin)) => self.origin_allowed(origin),
            Some(Err(_)) => {
                Refusal::Origin.count();
                false
            }
        }
    }

    /// Returns whether a browser page of `origin` may open a WebSocket or call
    /// through gRPC-web; counts a refusal.
    pub(crate) fn origin_allowed(&self, origin: &str) -> bool {
        let Some(allowed) = &self.allowed_origins else {
            return true;
        };
        let allowed = allowed.contains(&normalise(origin));
        if !allowed {
            Refusal::Origin.count();
        }
        allowed
    }

    /// Forgets the rate state of users idle long enough to be back at a full
    /// burst, so that the limiters' memory follows the active users.
    pub(crate) fn prune(&self) {
        self.sends.retain_recent();
        self.creations.retain_recent();
        self.invitations.retain_recent();
        self.login_by_account.sweep();
        self.login_by_address.sweep();
    }
}

/// One live connection of an address; gives its slot back on drop.
#[derive(Debug)]
pub(crate) struct AddressSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    address: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        if let Some(count) = counts.get_mut(&self.address) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// Failures per key in a fixed window of [`LOGIN_WINDOW`] from the first one.
///
/// Not a governor limiter: a check must not consume anything, since a
/// successful login does not count.
#[derive(Debug)]
struct FailureWindow<K> {
    max: u32,
    windows: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K: Hash + Eq> FailureWindow<K> {
    fn new(max: u32) -> Self {
        Self {
            max: max.max(1),
            windows: Mutex::default(),
        }
    }

    /// Returns how long `key` stays blocked, if it is.
    fn blocked_for<Q>(&self, key: &Q) -> Option<Duration>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let windows = self.windows.lock();
        let (started, failures) = windows.get(key)?;
        let left = LOGIN_WINDOW.checked_sub(started.elapsed())?;
        (*failures >= self.max && !left.is_zero()).then_some(left)
    }

    fn fail(&self, key: K) {
        let mut windows = self.windows.lock();
        if windows.len() >= LOGIN_SWEEP_AT {
            windows.retain(|_, (started, _)| started.elapsed() < LOGIN_WINDOW);
        }
        let window = windows.entry(key).or_insert((Instant::now(), 0));
        if window.0.elapsed() >= LOGIN_WINDOW {
            *window = (Instant::now(), 0);
        }
        window.1 = window.1.saturating_add(1);
    }

    fn sweep(&self) {
        let mut windows = self.windows.lock();
        windows.retain(|_, (started, _)| started.elapsed() < LOGIN_WINDOW);
    }
}

/// The throttling key of a username: case folded (so that variants share one
/// budget) and cut short (so that huge names cannot fill memory).
fn account_key(username: &str) -> String {
    username.chars().take(64).collect::<String>().to_lowercase()
}

fn at_least_one(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

/// Origins compare without case and without a trailing slash.
fn normalise(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

fn rate_limited(
    what: &str,
    not_until: &NotUntil<<DefaultClock as governor::clock::Clock>::Instant>,
) -> Status {
    let wait = not_until.wait_time_from(DefaultClock::default().now());
    retry_status(what, wait)
}

/// Returns RESOURCE_EXHAUSTED saying when to retry, in the message and in the
/// `retry-after-ms` metadata.
pub(crate) fn retry_status(what: &str, wait: Duration) -> Status {
    let millis = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut status = Status::resource_exhausted(format!("{what}; retry in {millis} ms"));
    if let Ok(value) = millis.to_string().parse() {
        status.metadata_mut().insert("retry-after-ms", value);
    }
    status
}

/// Returns whether `status` is a refusal of this module (it carries a retry
/// hint), as opposed to a size limit.
pub(crate) fn is_rate_limited(status: &Status) -> bool {
    status.metadata().contains_key("retry-after-ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(config: GatewayConfig) -> Limits {
        Limits::new(&config)
    }

    /// A burst passes, the next send is refused with a retry hint, and another
    /// user keeps their own budget.
    #[test]
    fn sends_are_limited_per_user() {
        let l = limits(GatewayConfig {
            send_burst: 3,
            send_per_second: 1,
            ..GatewayConfig::default()
        });
        for _ in 0..3 {
            assert!(l.send(1).is_ok());
        }
        let refused = l.send(1).expect_err("beyond the burst");
        assert!(refused.message().contains("retry in"), "{refused:?}");
        assert!(is_rate_limited(&refused));
        assert!(l.send(2).is_ok());
    }

    /// Failures block the account until the window passes; checks consume nothing.
    #[test]
    fn login_failures_block() {
        let l = limits(GatewayConfig {
            login_failures_per_minute: 2,
            ..GatewayConfig::default()
        });
        let ip: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..5 {
            assert!(l.login_allowed("ann", Some(ip)).is_ok());
        }
        l.login_failed("ann", None);
        l.login_failed("ann", None);
        assert!(l.login_allowed("ann", Some(ip)).is_err());
        assert!(l.login_allowed("bob", Some(ip)).is_ok());
    }

    /// An address gets its slots back when connections end.
    #[test]
    fn address_slots_are_released() {
        let l = limits(GatewayConfig {
            max_connections_per_ip: 1,
            ..GatewayConfig::default()
        });
        let ip: IpAddr = [10, 0, 0, 1].into();
        let slot = l.connection_slot(ip).expect("first");
        assert!(l.connection_slot(ip).is_none());
        drop(slot);
        assert!(l.connection_slot(ip).is_some());
    }

    /// `*` allows any origin; a list allows only its entries.
    #[test]
    fn origins() {
        assert!(limits(GatewayConfig::default()).origin_allowed("https://evil.example"));
        let l = limits(GatewayConfig {
            allowed_origins: vec!["https://chat.example".to_owned()],
            ..GatewayConfig::default()
        });
        assert!(l.origin_allowed("https://Chat.example/"));
        assert!(!l.origin_allowed("https://evil.example"));
    }

    /// More invitations than a minute allows are refused outright.
    #[test]
    fn invitations_beyond_the_budget() {
        let l = limits(GatewayConfig {
            invitations_per_minute: 3,
            ..GatewayConfig::default()
        });
        assert!(l.invitations(1, 4).is_err());
        assert!(l.invitations(1, 3).is_ok());
        assert!(l.invitations(1, 1).is_err());
        assert!(l.invitations(1, 0).is_ok());
    }
}
