//! JWT access and refresh tokens.
//!
//! Confab signs its own tokens with HS256 and a server secret: the subject is the
//! user id, `typ` tells an access token from a refresh token. An operator may also
//! trust an external identity provider: tokens signed with its shared secret or
//! public key are accepted, their subject naming the user (created on first use).
//! Algorithms are pinned by configuration, never taken from the token.
//!
//! **Key ids.** Confab's own tokens carry `kid`, a short fingerprint of the
//! signing secret (an HMAC of a fixed label, so it reveals nothing a signature
//! does not), so that a secret rotation can later keep two keys side by side. A
//! token whose `kid` is present and is not ours is never checked against our key;
//! a token without `kid` (minted before key ids existed) still is. External
//! identity providers choose their own key ids, which Confab does not know: their
//! `kid` is not checked, their one configured key is.
//!
//! **Sessions.** A login starts a session: its access and refresh tokens, and
//! every pair refreshed from them, carry the same `sid`, and `iat_ms` (the mint
//! time in milliseconds, finer than `iat`). Logging out revokes a session, or
//! every token of the user minted before a moment; group-svc keeps both, and the
//! gateway asks it whenever a token is presented (`gateway/src/auth.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The issuer Confab writes into its own tokens.
pub const ISSUER: &str = "confab";

/// Why a token was refused. The client always sees one terse message.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Signature, algorithm, issuer, audience or format is wrong.
    #[error("invalid token")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    /// The token expired.
    #[error("token expired")]
    Expired,
    /// A refresh token was used as an access token, or the other way round.
    #[error("wrong token type")]
    WrongType,
    /// The token names a signing key (`kid`) this server does not have.
    #[error("unknown key id")]
    UnknownKey,
    /// The key material in the configuration cannot be used.
    #[error("bad key configuration: {0}")]
    BadKey(String),
}

/// Whether a token grants access or only a new token pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    /// Authenticates streams and calls.
    Access,
    /// Exchanged for a new pair through `Accounts.Refresh`.
    Refresh,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<TokenType>,
    /// The session of Confab's own tokens; absent in tokens minted before
    /// sessions existed, and in external tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sid: Option<String>,
    /// When the token was minted, in ms since the Unix epoch (Confab's own
    /// tokens): revocation watermarks need a finer grain than `iat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat_ms: Option<i64>,
}

/// Who a valid access token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A Confab user, by id (our own tokens).
    User(i64),
    /// A user named by an external identity provider.
    External(String),
}

/// What a verified token says, beyond its subject: what revocation and the
/// expiry of live connections need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Who the token speaks for.
    pub subject: Subject,
    /// The session the token belongs to: the `sid` of Confab's own tokens (empty
    /// in tokens minted before sessions existed); for an external token, a
    /// fingerprint of the token itself, so that logging out revokes that token.
    pub session: String,
    /// When it was minted, in ms since the Unix epoch (`iat_ms`, else `iat`).
    pub issued_at_ms: i64,
    /// When it expires, in ms since the Unix epoch (`exp`; the leeway not added).
    pub expires_at_ms: i64,
}

/// A token and the time it expires.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The encoded JWT.
    pub token: String,
    /// Expiry in ms since the Unix epoch.
    pub expires_at_ms: i64,
}

/// How external tokens are verified.
#[derive(Clone)]
pub struct ExternalIssuer {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for ExternalIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalIssuer")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl ExternalIssuer {
    /// Trusts HS256 tokens signed with `secret`.
    ///
    /// # Errors
    ///
    /// Fails when the secret is unusable (empty).
    pub fn shared_secret(
        secret: &[u8],
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Self, AuthError> {
        let key = DecodingKey::from_secret(secret).map_err(bad_key)?;
        Ok(Self::new(key, Algorithm::HS256, issuer, audience))
    }

    /// Trusts tokens signed with the private half of the PEM `public_key`
    /// (RSA: RS256, EC P-256: ES256, Ed25519: EdDSA).
    ///
    /// # Errors
    ///
    /// Fails when the PEM holds none of these key types.
    pub fn public_key(
        public_key_pem: &[u8],
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Self, AuthError> {
        let text = String::from_utf8_lossy(public_key_pem);
        let (key, alg) = if let Ok(key) = DecodingKey::from_rsa_pem(public_key_pem) {
            (key, Algorithm::RS256)
        } else if let Ok(key) = DecodingKey::from_ed_pem(public_key_pem) {
            (key, Algorithm::EdDSA)
        } else if let Ok(key) = DecodingKey::from_ec_pem(public_key_pem) {
            (key, Algorithm::ES256)
        } else {
            let first = text.lines().next().unwrap_or_default().to_owned();
            return Err(AuthError::BadKey(format!(
                "unsupported public key ({first})"
            )));
        };
        Ok(Self::new(key, alg, issuer, audience))
    }

    fn new(key: DecodingKey, alg: Algorithm, issuer: Option<&str>, audience: Option<&str>) -> Self {
        let mut validation = Validation::new(alg);
        // The one algorithm the key's type pins; the token's `alg` must equal it.
        validation.algorithms = vec![alg];
        validation.leeway = DEFAULT_LEEWAY_SECS;
        // A pinned issuer or audience must be present too: jsonwebtoken checks
        // these claims only when the token has them.
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Self { key, validation }
    }
}

/// Seconds a token stays valid past its `exp`, for clocks that disagree.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;

/// Makes session ids of one process distinct even when minted in the same
/// nanosecond.
static SESSIONS: AtomicU64 = AtomicU64::new(0);

/// Mints and verifies tokens.
#[derive(Clone)]
pub struct TokenService {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// HS256 only, issuer Confab, leeway as configured.
    validation: Validation,
    /// The `kid` of our tokens: a fingerprint of the secret.
    key_id: String,
    access_ttl: Duration,
    refresh_ttl: Duration,
    external: Option<ExternalIssuer>,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("key_id", &self.key_id)
            .field("leeway", &self.validation.leeway)
            .field("access_ttl", &self.access_ttl)
            .field("refresh_ttl", &self.refresh_ttl)
            .field("external", &self.external)
            .finish_non_exhaustive()
    }
}

impl TokenService {
    /// Returns a service signing with `secret`.
    ///
    /// # Errors
    ///
    /// Fails when the secret is unusable (empty).
    pub fn new(
        secret: &[u8],
        access_ttl: Duration,
        refresh_ttl: Duration,
    ) -> Result<Self, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        // Our own tokens are HS256 and nothing else, whatever their header says.
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = DEFAULT_LEEWAY_SECS;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        validation.validate_aud = false;
        let encoding = EncodingKey::from_secret(secret).map_err(bad_key)?;
        let key_id = sign(b"confab key id", &encoding)
            .chars()
            .take(KEY_ID_CHARS)
            .collect();
        Ok(Self {
            encoding,
            decoding: DecodingKey::from_secret(secret).map_err(bad_key)?,
            validation,
            key_id,
            access_ttl,
            refresh_ttl,
            external: None,
        })
    }

    /// Also accepts tokens from `external` (with this service's leeway).
    pub fn with_external(mut self, mut external: ExternalIssuer) -> Self {
        external.validation.leeway = self.validation.leeway;
        self.external = Some(external);
        self
    }

    /// Accepts tokens up to `leeway` past their `exp` (own and external alike;
    /// [`DEFAULT_LEEWAY_SECS`] unless set).
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.validation.leeway = leeway.as_secs();
        if let Some(external) = &mut self.external {
            external.validation.leeway = leeway.as_secs();
        }
        self
    }

    /// Returns how long past its `exp` a token is still accepted.
    pub fn leeway(&self) -> Duration {
        Duration::from_secs(self.validation.leeway)
    }

    /// Returns the lifetime of refresh tokens: the longest any token of a session
    /// minted now can live.
    pub fn refresh_ttl(&self) -> Duration {
        self.refresh_ttl
    }

    /// Returns the `kid` of the tokens this service mints.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Returns a new session id for a login of `user_id`: unique (time, a
    /// per-process counter) and not guessable (an HMAC with the secret).
    pub fn new_session(&self, user_id: i64) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
        let seed = format!("session {user_id} {nanos} {n}");
        sign(seed.as_bytes(), &self.encoding)
            .chars()
            .take(SESSION_CHARS)
            .collect()
    }

    /// Returns a new token of type `typ` for `user_id`, in no session (as
    /// tokens were before sessions existed; logging out with one logs out every
    /// device).
    pub fn mint(&self, user_id: i64, typ: TokenType) -> Minted {
        self.mint_claims(user_id, typ, None)
    }

    /// Returns a new token of type `typ` for `user_id` in `session`.
    pub fn mint_in_session(&self, user_id: i64, typ: TokenType, session: &str) -> Minted {
        self.mint_claims(user_id, typ, Some(session.to_owned()))
    }

    fn mint_claims(&self, user_id: i64, typ: TokenType, sid: Option<String>) -> Minted {
        let ttl = match typ {
            TokenType::Access => self.access_ttl,
            TokenType::Refresh => self.refresh_ttl,
        };
        let now_ms = crate::now_ms();
        let now = now_ms as u64 / 1000;
        let exp = now + ttl.as_secs();
        let claims = Claims {
            sub: user_id.to_string(),
            exp,
            iat: now,
            iss: Some(ISSUER.to_owned()),
            typ: Some(typ),
            sid,
            iat_ms: Some(now_ms),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.key_id.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .expect("hs256 encoding of plain claims cannot fail");
        Minted {
            token,
            expires_at_ms: exp as i64 * 1000,
        }
    }

    /// Verifies an access token.
    ///
    /// # Errors
    ///
    /// Fails on any token that is not a valid, unexpired access token.
    pub fn verify_access(&self, token: &str) -> Result<Verified, AuthError> {
        let verified = self.verify_access_signed(token)?;
        self.unexpired(verified)
    }

    /// Verifies an access token's signature and claims; jsonwebtoken accepts a
    /// token until the end of its `exp` second (plus the leeway).
    fn verify_access_signed(&self, token: &str) -> Result<Verified, AuthError> {
        match self.decode_own(token) {
            Ok(claims) => own_verified(claims, TokenType::Access),
            Err(own_error) => match &self.external {
                Some(external) => {
                    let data =
                        jsonwebtoken::decode::<Claims>(token, &external.key, &external.validation)
                            .map_err(classify)?;
                    let claims = data.claims;
                    if claims.sub.is_empty() {
                        return Err(AuthError::WrongType);
                    }
                    // The token is its own session: logging out revokes it.
                    let fingerprint: String = sign(token.as_bytes(), &self.encoding)
                        .chars()
                        .take(SESSION_CHARS)
                        .collect();
                    Ok(Verified {
                        session: format!("x.{fingerprint}"),
                        issued_at_ms: issued_at_ms(&claims),
                        expires_at_ms: secs_to_ms(claims.exp),
                        subject: Subject::External(claims.sub),
                    })
                }
                None => Err(own_error),
            },
        }
    }

    /// Verifies a refresh token.
    ///
    /// # Errors
    ///
    /// Fails on any token that is not a valid, unexpired Confab refresh token.
    pub fn verify_refresh(&self, token: &str) -> Result<Verified, AuthError> {
        self.unexpired(own_verified(self.decode_own(token)?, TokenType::Refresh)?)
    }

    /// Refuses a token from the moment of its `exp` plus the leeway, to the
    /// millisecond: the moment a live connection on it is closed.
    fn unexpired(&self, verified: Verified) -> Result<Verified, AuthError> {
        let leeway_ms = i64::try_from(self.validation.leeway.saturating_mul(1000)).unwrap_or(0);
        if crate::now_ms() >= verified.expires_at_ms.saturating_add(leeway_ms) {
            return Err(AuthError::Expired);
        }
        Ok(verified)
    }

    /// Decodes one of our own tokens: a `kid` other than ours is refused before
    /// the signature is checked; the algorithm is pinned by `validation`.
    fn decode_own(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(AuthError::Invalid)?;
        if header.kid.is_some_and(|kid| kid != self.key_id) {
            return Err(AuthError::UnknownKey);
        }
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(classify)
    }
}

/// Characters of the `kid` fingerprint (base64url: 72 bits).
const KEY_ID_CHARS: usize = 12;
/// Characters of a session id (base64url: 120 bits).
const SESSION_CHARS: usize = 20;

/// Returns the base64url HMAC-SHA256 of `message` under `key`.
fn sign(message: &[u8], key: &EncodingKey) -> String {
    jsonwebtoken::crypto::sign(message, key, Algorithm::HS256)
        .expect("hmac over a valid secret cannot fail")
}

fn secs_to_ms(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX / 1000) * 1000
}

fn issued_at_ms(claims: &Claims) -> i64 {
    claims.iat_ms.unwrap_or_else(|| secs_to_ms(claims.iat))
}

fn own_verified(claims: Claims, expected: TokenType) -> Result<Verified, AuthError> {
    if claims.typ != Some(expected) {
        return Err(AuthError::WrongType);
    }
    let id = claims.sub.parse().map_err(|_| AuthError::WrongType)?;
    Ok(Verified {
        subject: Subject::User(id),
        session: claims.sid.clone().unwrap_or_default(),
        issued_at_ms: issued_at_ms(&claims),
        expires_at_ms: secs_to_ms(claims.exp),
    })
}

fn bad_key(error: jsonwebtoken::errors::Error) -> AuthError {
    AuthError::BadKey(error.to_string())
}

fn classify(error: jsonwebtoken::errors::Error) -> AuthError {
    match error.kind() {
        jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
        _ => AuthError::Invalid(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> TokenService {
        TokenService::new(
            b"test-secret-test-secret-test-secret",
            Duration::from_secs(60),
            Duration::from_secs(3600),
        )
        .unwrap()
    }

    /// An access token verifies to its user; a refresh token is not an access token.
    #[test]
    fn access_and_refresh_are_distinct() {
        let tokens = service();
        let access = tokens.mint(42, TokenType::Access);
        let refresh = tokens.mint(42, TokenType::Refresh);
        assert_eq!(
            tokens.verify_access(&access.token).unwrap().subject,
            Subject::User(42)
        );
        assert_eq!(
            tokens.verify_refresh(&refresh.token).unwrap().subject,
            Subject::User(42)
        );
        assert!(matches!(
            tokens.verify_access(&refresh.token),
            Err(AuthError::WrongType)
        ));
        assert!(matches!(
            tokens.verify_refresh(&access.token),
            Err(AuthError::WrongType)
        ));
    }

    /// A token signed with another secret (its key id, or none), or garbage, is
    /// refused.
    #[test]
    fn foreign_and_garbage_tokens_refused() {
        let other =
            TokenService::new(b"another-secret", Duration::from_secs(60), Duration::ZERO).unwrap();
        let token = other.mint(1, TokenType::Access).token;
        assert!(matches!(
            service().verify_access(&token),
            Err(AuthError::UnknownKey)
        ));
        let claims = serde_json::json!({
            "sub": "1", "exp": 4_000_000_000u64, "iss": ISSUER, "typ": "access"
        });
        let key = EncodingKey::from_secret(b"another-secret").unwrap();
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert!(matches!(
            service().verify_access(&token),
            Err(AuthError::Invalid(_))
        ));
        assert!(service().verify_access("not.a.jwt").is_err());
        assert!(service().verify_access("").is_err());
    }

    /// An expired token is refused as expired.
    #[test]
    fn expired_token_refused() {
        let claims = Claims {
            sub: "1".into(),
            exp: 1_000,
            iat: 0,
            iss: Some(ISSUER.into()),
            typ: Some(TokenType::Access),
            sid: None,
            iat_ms: None,
        };
        let key = EncodingKey::from_secret(b"test-secret-test-secret-test-secret").unwrap();
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert!(matches!(
            service().verify_access(&token),
            Err(AuthError::Expired)
        ));
    }

    /// Signs `claims` with the test secret under `kid`.
    fn signed(claims: &serde_json::Value, kid: Option<&str>) -> String {
        let key = EncodingKey::from_secret(b"test-secret-test-secret-test-secret").unwrap();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    /// Our tokens carry our key id; a token signed with our secret under another
    /// key id is refused, one without a key id is accepted.
    #[test]
    fn unknown_key_id_refused() {
        let tokens = service();
        let minted = tokens.mint(7, TokenType::Access).token;
        let header = jsonwebtoken::decode_header(&minted).unwrap();
        assert_eq!(header.kid.as_deref(), Some(tokens.key_id()));
        assert_eq!(tokens.key_id().len(), KEY_ID_CHARS);
        let other = TokenService::new(b"another-secret", Duration::ZERO, Duration::ZERO).unwrap();
        assert_ne!(tokens.key_id(), other.key_id());

        let claims = serde_json::json!({
            "sub": "7", "exp": 4_000_000_000u64, "iss": ISSUER, "typ": "access"
        });
        assert!(tokens.verify_access(&signed(&claims, None)).is_ok());
        let ours = signed(&claims, Some(tokens.key_id()));
        assert!(tokens.verify_access(&ours).is_ok());
        assert!(matches!(
            tokens.verify_access(&signed(&claims, Some("not-ours"))),
            Err(AuthError::UnknownKey)
        ));
    }

    /// A token is accepted up to the leeway past its expiry, and not after.
    #[test]
    fn leeway_is_configurable() {
        let now = crate::now_ms() as u64 / 1000;
        let claims =
            |exp: u64| serde_json::json!({"sub": "7", "exp": exp, "iss": ISSUER, "typ": "access"});
        let ten_ago = signed(&claims(now - 10), None);
        assert!(service().verify_access(&ten_ago).is_ok(), "within 30 s");
        let strict = service().with_leeway(Duration::ZERO);
        assert_eq!(strict.leeway(), Duration::ZERO);
        assert!(matches!(
            strict.verify_access(&ten_ago),
            Err(AuthError::Expired)
        ));
        let minute_ago = signed(&claims(now - 60), None);
        assert!(matches!(
            service().verify_access(&minute_ago),
            Err(AuthError::Expired)
        ));
    }

    /// Tokens minted in a session carry it, with their mint time in ms; session
    /// ids differ; an external token's session is a fingerprint of the token.
    #[test]
    fn sessions_are_carried() {
        let tokens = service();
        let session = tokens.new_session(7);
        assert_ne!(session, tokens.new_session(7));
        let before = crate::now_ms();
        let access = tokens.mint_in_session(7, TokenType::Access, &session);
        let refresh = tokens.mint_in_session(7, TokenType::Refresh, &session);
        let verified = tokens.verify_access(&access.token).unwrap();
        assert_eq!(verified.session, session);
        assert!(verified.issued_at_ms >= before);
        assert_eq!(verified.expires_at_ms, access.expires_at_ms);
        assert_eq!(
            tokens.verify_refresh(&refresh.token).unwrap().session,
            session
        );
        assert_eq!(
            tokens
                .verify_access(&tokens.mint(7, TokenType::Access).token)
                .unwrap()
                .session,
            ""
        );

        let tokens =
            tokens.with_external(ExternalIssuer::shared_secret(b"app-secret", None, None).unwrap());
        let key = EncodingKey::from_secret(b"app-secret").unwrap();
        let mint = |sub: &str| {
            let claims = serde_json::json!({"sub": sub, "exp": 4_000_000_000u64, "iat": 5});
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
        };
        let (a, b) = (mint("carol"), mint("dave"));
        let a = tokens.verify_access(&a).unwrap();
        assert!(a.session.starts_with("x."));
        assert_ne!(a.session, tokens.verify_access(&b).unwrap().session);
        assert_eq!(a.issued_at_ms, 5_000);
    }

    /// A token from a trusted external issuer names its user by subject.
    #[test]
    fn external_shared_secret_accepted() {
        let tokens = service().with_external(
            ExternalIssuer::shared_secret(b"app-secret", Some("my-app"), None).unwrap(),
        );
        let claims = serde_json::json!({"sub": "carol", "exp": 4_000_000_000u64, "iss": "my-app"});
        let key = EncodingKey::from_secret(b"app-secret").unwrap();
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert_eq!(
            tokens.verify_access(&token).unwrap().subject,
            Subject::External("carol".into())
        );
        let wrong_iss = serde_json::json!({"sub": "carol", "exp": 4_000_000_000u64, "iss": "x"});
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &wrong_iss, &key).unwrap();
        assert!(tokens.verify_access(&token).is_err());
        let no_iss = serde_json::json!({"sub": "carol", "exp": 4_000_000_000u64});
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &no_iss, &key).unwrap();
        assert!(
            tokens.verify_access(&token).is_err(),
            "a pinned issuer is required"
        );
    }

    /// A test-only Ed25519 key pair (generated with openssl for this test).
    const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIEdK+xiVTqpSgsde9jLhnUsxr/RBYKQI7gFczsPPQy8A\n-----END PRIVATE KEY-----\n";
    const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA6HXBeaw3aL+WMOFzdm5xQleLrYSuAdIZJxEbMYDkitE=\n-----END PUBLIC KEY-----\n";

    /// A token signed with the private half of a configured Ed25519 public key is
    /// accepted; the same claims signed with HS256 using the public key as the
    /// secret (key confusion) are refused.
    #[test]
    fn external_public_key_accepted_and_pinned() {
        let external = ExternalIssuer::public_key(ED_PUBLIC.as_bytes(), None, None).unwrap();
        let tokens = service().with_external(external);
        let claims = serde_json::json!({"sub": "dana", "exp": 4_000_000_000u64});
        let key = EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap();
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key).unwrap();
        assert_eq!(
            tokens.verify_access(&token).unwrap().subject,
            Subject::External("dana".into())
        );

        let confused = EncodingKey::from_secret(ED_PUBLIC.as_bytes()).unwrap();
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &confused).unwrap();
        assert!(tokens.verify_access(&token).is_err());
        assert!(ExternalIssuer::public_key(b"not a key", None, None).is_err());
    }
}
