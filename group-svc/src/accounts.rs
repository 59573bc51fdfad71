//! Accounts: the username and password rules, Argon2id hashing, and user lookups.

use std::num::NonZero;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, PoisonError};

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::password_hash::{self, CustomizedPasswordHasher, PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use confab_common::now_ms;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::store::{MAX_USERS_PER_INSERT, Store, User};
use crate::{GroupError, GroupService};

/// Allowed username lengths, in characters (all ASCII once valid).
const USERNAME_LEN: RangeInclusive<usize> = 3..=32;
/// Allowed password lengths, in bytes.
const PASSWORD_LEN: RangeInclusive<usize> = 8..=128;

/// Returns `raw` lowercased, or why it is not a valid username.
///
/// Lowercasing is ASCII-only: a Unicode lowercasing would fold some non-ASCII
/// characters (the Kelvin sign) into ASCII letters, so that two different external
/// subjects could land on one account.
pub(crate) fn normalize_username(raw: &str) -> Result<String, GroupError> {
    let username = raw.to_ascii_lowercase();
    let allowed = |b: u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-');
    if !username.bytes().all(allowed) {
        return Err(GroupError::InvalidUsername(
            "only letters a-z, digits, '_', '.' and '-' are allowed",
        ));
    }
    if !USERNAME_LEN.contains(&username.len()) {
        return Err(GroupError::InvalidUsername("must be 3 to 32 characters"));
    }
    Ok(username)
}

/// Hashes and verifies passwords with Argon2id, on the blocking thread pool.
#[derive(Debug)]
pub(crate) struct Passwords {
    /// Cost of new hashes; verification reads the cost stored in each hash, so
    /// raising it later leaves old hashes valid.
    params: Params,
    /// A hash made with `params`, checked when the user is unknown or has no
    /// password, so that such a login takes as long as a real one.
    dummy_hash: String,
    /// Bounds concurrent hashes to the number of cores: each takes a core and
    /// ~19 MiB for tens of milliseconds, so a burst of logins must queue rather
    /// than exhaust memory and blocking threads. A permit moves into the blocking
    /// task, so a cancelled request frees it only when its hash is done.
    permits: Arc<Semaphore>,
    /// Working memory of finished hashes, for the next ones.
    memory: Arc<Memory>,
}

impl Passwords {
    /// Returns a hasher making Argon2id hashes with `params`.
    ///
    /// # Errors
    ///
    /// Fails when the dummy hash cannot be made (bad `params`).
    pub(crate) async fn new(params: Params) -> Result<Self, GroupError> {
        let cores = std::thread::available_parallelism().map_or(1, NonZero::get);
        let mut passwords = Self {
            memory: Arc::new(Memory::new(params.block_count())),
            params,
            dummy_hash: String::new(),
            permits: Arc::new(Semaphore::new(cores)),
        };
        passwords.dummy_hash = passwords
            .hash("no account has this password".into())
            .await?;
        // A server that nobody logs in to keeps no working memory.
        passwords.memory.release();
        Ok(passwords)
    }

    /// Returns a hasher with the smallest Argon2 cost, for fast tests.
    #[cfg(test)]
    pub(crate) async fn cheap_for_tests() -> Self {
        let params = Params::new(Params::MIN_M_COST, 1, 1, None).unwrap();
        Self::new(params).await.unwrap()
    }

    /// Waits for a turn to hash.
    async fn permit(&self) -> OwnedSemaphorePermit {
        let permits = Arc::clone(&self.permits);
        permits
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Returns the Argon2id PHC string of `password`, with a fresh random salt.
    pub(crate) async fn hash(&self, password: String) -> Result<String, GroupError> {
        let hasher = Hasher {
            params: self.params.clone(),
            memory: Arc::clone(&self.memory),
        };
        let permit = self.permit().await;
        let hashed = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            hasher.hash_password(password.as_bytes())
        })
        .await?;
        Ok(hashed.map_err(GroupError::Hashing)?.to_string())
    }

    /// Returns whether `password` matches `hash`; `None` (no password) never matches,
    /// but costs the same time as a real check.
    pub(crate) async fn verify(
        &self,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, GroupError> {
        let has_hash = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.clone());
        let hasher = Hasher {
            params: self.params.clone(),
            memory: Arc::clone(&self.memory),
        };
        let permit = self.permit().await;
        let outcome = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            // Algorithm, version and cost come from the PHC string itself.
            hasher.verify_password(password.as_bytes(), &PasswordHash::new(&hash)?)
        })
        .await?;
        match outcome {
            Ok(()) => Ok(has_hash),
            Err(password_hash::Error::PasswordInvalid) => Ok(false),
            Err(error) => Err(GroupError::Hashing(error)),
        }
    }
}

/// Users that `ensure_user` creates (an external token's first connection),
/// inserted together.
///
/// Inserted one by one, each was a transaction with a flush of its own, one at
/// a time on SQLite's single writer: first connections of new users ran at
/// about 1,200 a second against 3,500 for known users (`confab-bench
/// connections`). Here each call queues its candidate and waits for its turn;
/// whoever has the turn inserts everything queued by then in one statement, so
/// the calls that arrive during one flush share the next.
#[derive(Debug, Default)]
pub(crate) struct NewUsers {
    queued: Mutex<Vec<User>>,
    turn: tokio::sync::Mutex<()>,
}

impl NewUsers {
    /// Returns once `user` has been inserted or skipped (its name taken), by
    /// this call's turn or an earlier one; when that turn failed, it is
    /// neither, and only the turn's own caller gets the error.
    async fn insert(&self, store: &Store, user: User) -> Result<(), GroupError> {
        let queued = || self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        queued().push(user);
        let _turn = self.turn.lock().await;
        let batch = std::mem::take(&mut *queued());
        for rows in batch.chunks(MAX_USERS_PER_INSERT) {
            store.insert_users(rows).await?;
        }
        Ok(())
    }
}

/// Argon2's working memory (`m_cost` KiB per hash: 19 MiB by default), kept
/// from one hash for the next.
///
/// `argon2` allocates and zeroes it for every hash. Under a burst of logins
/// glibc's heap grew by about 160 MB and kept it: the big blocks, freed between
/// the small allocations of other requests, leave holes too small for the next
/// one (`confab-bench one-to-one` registering 400 users: 162 MB of server RSS
/// afterwards). Kept here, it is at most one buffer per concurrent hash (the
/// permits bound them to the cores), and no hash clears memory it is about to
/// overwrite.
#[derive(Debug)]
struct Memory {
    /// Buffers not in use.
    free: Mutex<Vec<Vec<Block>>>,
    /// A hash needing more (verifying one made with a higher cost) gets memory
    /// of its own, freed after use.
    keep_blocks: usize,
}

impl Memory {
    fn new(keep_blocks: usize) -> Self {
        Self {
            free: Mutex::new(Vec::new()),
            keep_blocks,
        }
    }

    /// Runs `hash` on `blocks` blocks of working memory.
    fn with<R>(&self, blocks: usize, hash: impl FnOnce(&mut [Block]) -> R) -> R {
        if blocks > self.keep_blocks {
            return hash(&mut vec![Block::default(); blocks]);
        }
        let free = || self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let mut buffer = free().pop().unwrap_or_default();
        // Argon2 writes every block before reading it: what a buffer held
        // before needs no clearing, only new blocks are initialised.
        buffer.resize(blocks, Block::default());
        let result = hash(&mut buffer);
        free().push(buffer);
        result
    }

    /// Frees the buffers not in use.
    fn release(&self) {
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// Argon2 on [`Memory`]: new hashes are Argon2id v19 with `params`; verifying
/// takes algorithm, version and cost from the hash.
struct Hasher {
    params: Params,
    memory: Arc<Memory>,
}

impl PasswordHasher<PasswordHash> for Hasher {
    fn hash_password_with_salt(
        &self,
        password: &[u8],
        salt: &[u8],
    ) -> password_hash::Result<PasswordHash> {
        self.hash_password_customized(
            password,
            salt,
            Some(Algorithm::Argon2id.as_ref()),
            Some(Version::V0x13.into()),
            self.params.clone(),
        )
    }
}

impl CustomizedPasswordHasher<PasswordHash> for Hasher {
    type Params = Params;

    fn hash_password_customized(
        &self,
        password: &[u8],
        salt: &[u8],
        algorithm: Option<&str>,
        version: Option<password_hash::Version>,
        params: Params,
    ) -> password_hash::Result<PasswordHash> {
        let algorithm = algorithm
            .map(Algorithm::try_from)
            .transpose()?
            .unwrap_or_default();
        let version = version
            .map(Version::try_from)
            .transpose()?
            .unwrap_or_default();
        let salt = Salt::new(salt)?;
        let output_len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let blocks = params.block_count();
        let argon2 = Argon2::new(algorithm, version, params);
        let mut output = [0; Output::MAX_LENGTH];
        let output = output
            .get_mut(..output_len)
            .ok_or(password_hash::Error::OutputSize)?;
        self.memory.with(blocks, |memory| {
            argon2.hash_password_into_with_memory(password, &salt, output, memory)
        })?;
        Ok(PasswordHash {
            algorithm: algorithm.ident(),
            version: Some(version.into()),
            params: ParamsString::try_from(argon2.params())?,
            salt: Some(salt),
            hash: Some(Output::new(output)?),
        })
    }
}

impl GroupService {
    /// Registers a user with a password.
    ///
    /// # Errors
    ///
    /// [`GroupError::InvalidUsername`], [`GroupError::InvalidPassword`],
    /// [`GroupError::UsernameTaken`], or an internal error.
    pub(crate) async fn create_user(
        &self,
        username: &str,
        password: String,
    ) -> Result<User, GroupError> {
        let username = normalize_username(username)?;
        if !PASSWORD_LEN.contains(&password.len()) {
            return Err(GroupError::InvalidPassword);
        }
        let store = &self.inner.store;
        // Spares a costly hash in the common case; the unique index below decides races.
        if store.user_by_name(&username).await?.is_some() {
            return Err(GroupError::UsernameTaken);
        }
        let hash = self.inner.passwords.hash(password).await?;
        let user = User {
            id: self.inner.ids.next_id(),
            username,
            created_at_ms: now_ms(),
        };
        if !store.insert_user(&user, Some(&hash)).await? {
            return Err(GroupError::UsernameTaken);
        }
        Ok(user)
    }

    /// Returns the user if `password` is theirs.
    ///
    /// # Errors
    ///
    /// [`GroupError::WrongCredentials`] for an unknown user, a wrong password or a
    /// passwordless user, or an internal error.
    pub(crate) async fn verify_password(
        &self,
        username: &str,
        password: String,
    ) -> Result<User, GroupError> {
        // No account can have such a name or password: answer at once. This timing
        // depends only on the input, not on which accounts exist.
        let Ok(username) = normalize_username(username) else {
            return Err(GroupError::WrongCredentials);
        };
        if !PASSWORD_LEN.contains(&password.len()) {
            return Err(GroupError::WrongCredentials);
        }
        let (user, hash) = match self.inner.store.credentials(&username).await? {
            Some((user, hash)) => (Some(user), hash),
            None => (None, None),
        };
        // Always one Argon2 verification, so that an unknown user answers as slowly
        // as a known one.
        let matches = self.inner.passwords.verify(password, hash).await?;
        match user {
            Some(user) if matches => Ok(user),
            _ => Err(GroupError::WrongCredentials),
        }
    }

    /// Returns the user with this name, creating a passwordless one if missing.
    ///
    /// # Errors
    ///
    /// [`GroupError::InvalidUsername`], or an internal error.
    pub(crate) async fn ensure_user(&self, username: &str) -> Result<User, GroupError> {
        let username = normalize_username(username)?;
        let store = &self.inner.store;
        if let Some(user) = store.user_by_name(&username).await? {
            return Ok(user);
        }
        let candidate = User {
            id: self.inner.ids.next_id(),
            username,
            created_at_ms: now_ms(),
        };
        // Insert-or-ignore, then read: a concurrent call may have won the name.
        self.inner
            .new_users
            .insert(store, candidate.clone())
            .await?;
        if let Some(user) = store.user_by_name(&candidate.username).await? {
            return Ok(user);
        }
        // The turn that took the candidate failed: insert it alone.
        store.insert_user(&candidate, None).await?;
        store
            .user_by_name(&candidate.username)
            .await?
            .ok_or(GroupError::Inconsistent("ensured user vanished"))
    }

    /// Returns the user with id `id`, or, when `id` is 0, the one named `username`.
    ///
    /// # Errors
    ///
    /// [`GroupError::NoSuchUser`], or an internal error.
    pub(crate) async fn get_user(&self, id: i64, username: &str) -> Result<User, GroupError> {
        let store = &self.inner.store;
        let user = if id != 0 {
            store.user_by_id(id).await?
        } else {
            match normalize_username(username) {
                Ok(username) => store.user_by_name(&username).await?,
                // No user can have an invalid name.
                Err(_) => None,
            }
        };
        user.ok_or(GroupError::NoSuchUser)
    }

    /// Returns the user of a token of `user_id` in `session_id` (empty: none)
    /// minted at `issued_at_ms`, unless a logout revoked it.
    ///
    /// # Errors
    ///
    /// [`GroupError::TokenRevoked`] when the token was minted before the user's
    /// watermark or its session is revoked, [`GroupError::NoSuchUser`], or an
    /// internal error.
    pub(crate) async fn check_token(
        &self,
        user_id: i64,
        session_id: &str,
        issued_at_ms: i64,
    ) -> Result<User, GroupError> {
        let state = self.inner.store.token_state(user_id, session_id).await?;
        let (user, valid_after_ms, session_revoked) = state.ok_or(GroupError::NoSuchUser)?;
        if issued_at_ms < valid_after_ms || (!session_id.is_empty() && session_revoked) {
            return Err(GroupError::TokenRevoked);
        }
        Ok(user)
    }

    /// Revokes `session_id` of `user_id` (kept until `keep_until_ms`), or, when
    /// it is empty, every token of the user minted before `before_ms`.
    ///
    /// # Errors
    ///
    /// [`GroupError::NoSuchUser`], or an internal error.
    pub(crate) async fn revoke_tokens(
        &self,
        user_id: i64,
        session_id: &str,
        before_ms: i64,
        keep_until_ms: i64,
    ) -> Result<(), GroupError> {
        let store = &self.inner.store;
        if session_id.is_empty() {
            if !store.revoke_tokens_before(user_id, before_ms).await? {
                return Err(GroupError::NoSuchUser);
            }
            return Ok(());
        }
        if store.user_by_id(user_id).await?.is_none() {
            return Err(GroupError::NoSuchUser);
        }
        store
            .revoke_session(user_id, session_id, keep_until_ms, now_ms())
            .await
    }

    /// Returns the users among `ids` that exist, ordered by id; unknown ids are
    /// left out.
    ///
    /// # Errors
    ///
    /// Internal errors only.
    pub(crate) async fn get_users(&self, ids: &[i64]) -> Result<Vec<User>, GroupError> {
        self.inner.store.users_by_ids(ids).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{TestDb, backend_tests};

    backend_tests!(
        password_length_bounds,
        create_user_stores_argon2id_hash,
        duplicate_username_is_refused,
        verify_password_right_wrong_unknown,
        ensure_user_is_get_or_create,
        queued_new_users_are_inserted_together,
        concurrent_first_connections_get_one_user_each,
        get_user_and_get_users,
        revoked_tokens_are_refused,
    );

    /// A revoked session's tokens are refused and other sessions' are not;
    /// revoking everything before a moment refuses every older token and none
    /// minted later; the watermark never moves back; unknown users are NOT_FOUND.
    async fn revoked_tokens_are_refused(db: TestDb) {
        let service = db.service().await;
        let ann = service
            .create_user("ann", "password1".into())
            .await
            .unwrap();
        let check = |session: &'static str, at: i64| service.check_token(ann.id, session, at);
        assert_eq!(check("s1", 100).await.unwrap(), ann);
        assert_eq!(check("", 100).await.unwrap(), ann);

        service
            .revoke_tokens(ann.id, "s1", 0, i64::MAX)
            .await
            .unwrap();
        service.revoke_tokens(ann.id, "s1", 0, 5).await.unwrap();
        assert!(matches!(
            check("s1", 100).await,
            Err(GroupError::TokenRevoked)
        ));
        assert!(matches!(
            check("s1", 10_000).await,
            Err(GroupError::TokenRevoked)
        ));
        assert_eq!(check("s2", 100).await.unwrap(), ann);

        service.revoke_tokens(ann.id, "", 1_000, 0).await.unwrap();
        service.revoke_tokens(ann.id, "", 500, 0).await.unwrap();
        assert!(matches!(
            check("s2", 999).await,
            Err(GroupError::TokenRevoked)
        ));
        assert!(matches!(
            check("", 999).await,
            Err(GroupError::TokenRevoked)
        ));
        assert_eq!(check("s2", 1_000).await.unwrap(), ann);
        assert!(matches!(
            check("s1", 1_000).await,
            Err(GroupError::TokenRevoked)
        ));

        assert!(matches!(
            service.check_token(ann.id + 1, "", 0).await,
            Err(GroupError::NoSuchUser)
        ));
        assert!(matches!(
            service.revoke_tokens(ann.id + 1, "", 1, 0).await,
            Err(GroupError::NoSuchUser)
        ));
        assert!(matches!(
            service.revoke_tokens(ann.id + 1, "s", 1, 2).await,
            Err(GroupError::NoSuchUser)
        ));
    }

    /// Usernames are lowercased, then must be 3-32 characters of [a-z0-9_.-].
    #[test]
    fn username_rules() {
        assert_eq!(normalize_username("Alice_1.x-Y").unwrap(), "alice_1.x-y");
        assert_eq!(normalize_username("abc").unwrap(), "abc");
        assert!(normalize_username(&"a".repeat(32)).is_ok());
        for bad in [
            "ab",
            &"a".repeat(33),
            "",
            "al ice",
            "al@ce",
            "alice!",
            "ålice",
        ] {
            assert!(
                matches!(normalize_username(bad), Err(GroupError::InvalidUsername(_))),
                "{bad:?} accepted"
            );
        }
        // The Kelvin sign lowercases to an ASCII 'k' under Unicode rules; refused here.
        assert!(normalize_username("\u{212A}elvin").is_err());
    }

    /// CreateUser refuses passwords outside 8-128 bytes and accepts both bounds.
    async fn password_length_bounds(db: TestDb) {
        let service = db.service().await;
        for (name, len, ok) in [("a7", 7, false), ("a8", 8, true), ("a128", 128, true)] {
            let result = service
                .create_user(&format!("user{name}"), "p".repeat(len))
                .await;
            assert_eq!(result.is_ok(), ok, "length {len}");
        }
        let too_long = service.create_user("user129", "p".repeat(129)).await;
        assert!(matches!(too_long, Err(GroupError::InvalidPassword)));
    }

    /// CreateUser stores the lowercased name and an Argon2id PHC string, never the
    /// password.
    async fn create_user_stores_argon2id_hash(db: TestDb) {
        let service = db.service().await;
        let user = service
            .create_user("Alice", "correct horse".into())
            .await
            .unwrap();
        assert_eq!(user.username, "alice");
        assert!(user.id > 0);
        let (stored, hash) = service
            .inner
            .store
            .credentials("alice")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored, user);
        let hash = hash.unwrap();
        assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
        assert!(!hash.contains("correct horse"));
    }

    /// The production hasher uses Argon2id with the crate's default cost.
    #[tokio::test]
    async fn default_params_are_argon2id_defaults() {
        let passwords = Passwords::new(Params::default()).await.unwrap();
        let hash = passwords.hash("correct horse".into()).await.unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(
            passwords
                .verify("correct horse".into(), Some(hash))
                .await
                .unwrap()
        );
    }

    /// Hashes made on kept memory are the `argon2` crate's own: each verifies the
    /// other's, with any algorithm, version and cost the hash names; a wrong
    /// password fails either way. Memory is kept for the next hash, but not a
    /// buffer larger than new hashes need, and not after startup.
    #[tokio::test]
    async fn kept_memory_hashes_like_argon2() {
        let passwords = Passwords::cheap_for_tests().await;
        assert!(passwords.memory.free.lock().unwrap().is_empty());
        // The second hash runs on the memory the first one left dirty.
        for password in ["correct horse", "correct horse", "other horse"] {
            let ours = passwords.hash(password.into()).await.unwrap();
            assert_eq!(passwords.memory.free.lock().unwrap().len(), 1);
            let parsed = PasswordHash::new(&ours).unwrap();
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .unwrap();
            assert!(
                Argon2::default()
                    .verify_password(b"wrong horse", &parsed)
                    .is_err()
            );
        }

        // The same cost as new hashes (on the kept memory) and a higher one
        // (on memory of its own).
        let same = Params::new(Params::MIN_M_COST, 1, 1, None).unwrap();
        let bigger = Params::new(2 * Params::MIN_M_COST, 1, 1, Some(24)).unwrap();
        for (algorithm, version, params) in [
            (Algorithm::Argon2id, Version::V0x13, &same),
            (Algorithm::Argon2i, Version::V0x10, &same),
            (Algorithm::Argon2id, Version::V0x13, &bigger),
            (Algorithm::Argon2i, Version::V0x10, &bigger),
            (Algorithm::Argon2d, Version::V0x13, &bigger),
        ] {
            let theirs = Argon2::new(algorithm, version, params.clone())
                .hash_password(b"battery staple")
                .unwrap()
                .to_string();
            let check = |password: &str| passwords.verify(password.into(), Some(theirs.clone()));
            assert!(check("battery staple").await.unwrap(), "{theirs}");
            assert!(!check("battery stapler").await.unwrap(), "{theirs}");
        }
        let free = passwords.memory.free.lock().unwrap();
        assert_eq!(free.len(), 1);
        assert_eq!(free[0].len(), Params::MIN_M_COST as usize);
    }

    /// A taken username, in any case, gives UsernameTaken; the unique index refuses
    /// the name even when the pre-check is bypassed (a concurrent registration).
    async fn duplicate_username_is_refused(db: TestDb) {
        let service = db.service().await;
        let first = service
            .create_user("bob", "password1".into())
            .await
            .unwrap();
        let again = service.create_user("BOB", "password2".into()).await;
        assert!(matches!(again, Err(GroupError::UsernameTaken)));

        let racer = User {
            id: service.inner.ids.next_id(),
            username: "bob".into(),
            created_at_ms: 0,
        };
        assert!(
            !service
                .inner
                .store
                .insert_user(&racer, Some("x"))
                .await
                .unwrap()
        );
        let still = service.get_user(0, "bob").await.unwrap();
        assert_eq!(still, first);
    }

    /// VerifyPassword accepts the right password (any case of the name) and refuses a
    /// wrong one, an unknown user and a passwordless user alike.
    async fn verify_password_right_wrong_unknown(db: TestDb) {
        let service = db.service().await;
        let carol = service
            .create_user("carol", "s3cret-pass".into())
            .await
            .unwrap();
        let ok = service
            .verify_password("Carol", "s3cret-pass".into())
            .await
            .unwrap();
        assert_eq!(ok, carol);

        service.ensure_user("external").await.unwrap();
        for (name, password) in [
            ("carol", "wrong-pass"),
            ("nobody", "s3cret-pass"),
            ("external", "no account has this password"),
            ("external", "s3cret-pass"),
            ("c", "s3cret-pass"),
            ("carol", "short"),
        ] {
            let result = service.verify_password(name, password.into()).await;
            assert!(
                matches!(result, Err(GroupError::WrongCredentials)),
                "{name}/{password}: {result:?}"
            );
        }
    }

    /// EnsureUser creates a passwordless user once and returns the same user after,
    /// including an existing password user of that name.
    async fn ensure_user_is_get_or_create(db: TestDb) {
        let service = db.service().await;
        let first = service.ensure_user("Dave").await.unwrap();
        assert_eq!(first.username, "dave");
        assert_eq!(service.ensure_user("dave").await.unwrap(), first);

        let erin = service
            .create_user("erin", "password1".into())
            .await
            .unwrap();
        assert_eq!(service.ensure_user("erin").await.unwrap(), erin);
        assert!(matches!(
            service.ensure_user("x").await,
            Err(GroupError::InvalidUsername(_))
        ));
    }

    /// Users queued while another turn holds the store go in together with the
    /// next turn: once the first of those calls returns, every one is stored;
    /// a name queued twice is inserted once.
    async fn queued_new_users_are_inserted_together(db: TestDb) {
        use futures::StreamExt as _;
        use futures::stream::FuturesUnordered;

        let service = db.service().await;
        let store = &service.inner.store;
        let new_users = NewUsers::default();
        let turn = new_users.turn.lock().await;
        let mut inserts: FuturesUnordered<_> = ["dora", "eve", "dora"]
            .into_iter()
            .map(|username| {
                let user = User {
                    id: service.inner.ids.next_id(),
                    username: username.into(),
                    created_at_ms: 1,
                };
                new_users.insert(store, user)
            })
            .collect();
        // Each call queues its user, then waits for the turn.
        assert!(futures::poll!(inserts.next()).is_pending());
        assert_eq!(new_users.queued.lock().unwrap().len(), 3);
        drop(turn);
        inserts.next().await.unwrap().unwrap();
        let dora = store.user_by_name("dora").await.unwrap().unwrap();
        assert!(store.user_by_name("eve").await.unwrap().is_some());
        while let Some(inserted) = inserts.next().await {
            inserted.unwrap();
        }
        assert_eq!(store.user_by_name("dora").await.unwrap().unwrap(), dora);
        assert!(new_users.queued.lock().unwrap().is_empty());
    }

    /// First connections of many new users at once, some of one name: each
    /// name gets one user, the same for every call with it.
    async fn concurrent_first_connections_get_one_user_each(db: TestDb) {
        let service = db.service().await;
        let names: Vec<String> = (0..40).map(|i| format!("new{}", i % 25)).collect();
        let ensured =
            futures::future::join_all(names.iter().map(|name| service.ensure_user(name))).await;
        let mut ids = std::collections::HashMap::new();
        for (name, user) in names.iter().zip(ensured) {
            let user = user.unwrap();
            assert_eq!(&user.username, name);
            assert_eq!(*ids.entry(name).or_insert(user.id), user.id, "{name}");
        }
        assert_eq!(ids.len(), 25);
        for (name, id) in ids {
            assert_eq!(service.get_user(0, name).await.unwrap().id, id);
        }
    }

    /// GetUser finds by id, or by name when the id is 0; GetUsers skips unknown ids.
    async fn get_user_and_get_users(db: TestDb) {
        let service = db.service().await;
        let frank = service.ensure_user("frank").await.unwrap();
        let grace = service.ensure_user("grace").await.unwrap();
        assert_eq!(service.get_user(frank.id, "ignored").await.unwrap(), frank);
        assert_eq!(service.get_user(0, "GRACE").await.unwrap(), grace);
        for (id, name) in [(12345, ""), (0, "nobody"), (0, ""), (0, "bad name")] {
            let result = service.get_user(id, name).await;
            assert!(
                matches!(result, Err(GroupError::NoSuchUser)),
                "{id} {name:?}"
            );
        }

        let users = service
            .get_users(&[grace.id, 999, frank.id, grace.id])
            .await
            .unwrap();
        assert_eq!(users, vec![frank, grace]);
        assert!(service.get_users(&[]).await.unwrap().is_empty());
    }
}
