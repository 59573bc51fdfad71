//! JWT access and refresh tokens.
//!
//! Confab signs its own tokens with HS256 and a server secret: the subject is the
//! user id, `typ` tells an access token from a refresh token. An operator may also
//! trust an external identity provider: tokens signed with its shared secret or
//! public key are accepted, their subject naming the user (created on first use).
//! Algorithms are pinned by configuration, never taken from the token.

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
}

/// Who a valid access token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A Confab user, by id (our own tokens).
    User(i64),
    /// A user named by an external identity provider.
    External(String),
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
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(issuer) = issuer {
            validation.set_issuer(&[issuer]);
        }
        match audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        Self { key, validation }
    }
}

/// Mints and verifies tokens.
#[derive(Clone)]
pub struct TokenService {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    access_ttl: Duration,
    refresh_ttl: Duration,
    external: Option<ExternalIssuer>,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
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
        validation.leeway = 30;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        validation.validate_aud = false;
        Ok(Self {
            encoding: EncodingKey::from_secret(secret).map_err(bad_key)?,
            decoding: DecodingKey::from_secret(secret).map_err(bad_key)?,
            validation,
            access_ttl,
            refresh_ttl,
            external: None,
        })
    }

    /// Also accepts tokens from `external`.
    pub fn with_external(mut self, external: ExternalIssuer) -> Self {
        self.external = Some(external);
        self
    }

    /// Returns a new token of type `typ` for `user_id`.
    pub fn mint(&self, user_id: i64, typ: TokenType) -> Minted {
        let ttl = match typ {
            TokenType::Access => self.access_ttl,
            TokenType::Refresh => self.refresh_ttl,
        };
        let now = crate::now_ms() as u64 / 1000;
        let exp = now + ttl.as_secs();
        let claims = Claims {
            sub: user_id.to_string(),
            exp,
            iat: now,
            iss: Some(ISSUER.to_owned()),
            typ: Some(typ),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
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
    pub fn verify_access(&self, token: &str) -> Result<Subject, AuthError> {
        match self.decode_own(token) {
            Ok(claims) => own_subject(claims, TokenType::Access),
            Err(own_error) => match &self.external {
                Some(external) => {
                    let data =
                        jsonwebtoken::decode::<Claims>(token, &external.key, &external.validation)
                            .map_err(classify)?;
                    if data.claims.sub.is_empty() {
                        return Err(AuthError::WrongType);
                    }
                    Ok(Subject::External(data.claims.sub))
                }
                None => Err(own_error),
            },
        }
    }

    /// Verifies a refresh token and returns its user id.
    ///
    /// # Errors
    ///
    /// Fails on any token that is not a valid, unexpired Confab refresh token.
    pub fn verify_refresh(&self, token: &str) -> Result<i64, AuthError> {
        match own_subject(self.decode_own(token)?, TokenType::Refresh)? {
            Subject::User(id) => Ok(id),
            Subject::External(_) => Err(AuthError::WrongType),
        }
    }

    fn decode_own(&self, token: &str) -> Result<Claims, AuthError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(classify)
    }
}

fn own_subject(claims: Claims, expected: TokenType) -> Result<Subject, AuthError> {
    if claims.typ != Some(expected) {
        return Err(AuthError::WrongType);
    }
    let id = claims.sub.parse().map_err(|_| AuthError::WrongType)?;
    Ok(Subject::User(id))
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
            tokens.verify_access(&access.token).unwrap(),
            Subject::User(42)
        );
        assert_eq!(tokens.verify_refresh(&refresh.token).unwrap(), 42);
        assert!(matches!(
            tokens.verify_access(&refresh.token),
            Err(AuthError::WrongType)
        ));
        assert!(matches!(
            tokens.verify_refresh(&access.token),
            Err(AuthError::WrongType)
        ));
    }

    /// A token signed with another secret, or garbage, is refused.
    #[test]
    fn foreign_and_garbage_tokens_refused() {
        let other =
            TokenService::new(b"another-secret", Duration::from_secs(60), Duration::ZERO).unwrap();
        let token = other.mint(1, TokenType::Access).token;
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
        };
        let key = EncodingKey::from_secret(b"test-secret-test-secret-test-secret").unwrap();
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert!(matches!(
            service().verify_access(&token),
            Err(AuthError::Expired)
        ));
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
            tokens.verify_access(&token).unwrap(),
            Subject::External("carol".into())
        );
        let wrong_iss = serde_json::json!({"sub": "carol", "exp": 4_000_000_000u64, "iss": "x"});
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &wrong_iss, &key).unwrap();
        assert!(tokens.verify_access(&token).is_err());
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
            tokens.verify_access(&token).unwrap(),
            Subject::External("dana".into())
        );

        let confused = EncodingKey::from_secret(ED_PUBLIC.as_bytes()).unwrap();
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &confused).unwrap();
        assert!(tokens.verify_access(&token).is_err());
        assert!(ExternalIssuer::public_key(b"not a key", None, None).is_err());
    }
}
