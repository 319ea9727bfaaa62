//! Access and refresh tokens.
//!
//! Access tokens are JWTs per RFC 9068 (`typ: at+jwt`), signed with Ed25519
//! (EdDSA). The signing key is the operator's (`JWT_SIGNING_KEY_FILE`), never
//! the repository's except the marked development key; earlier keys stay in
//! `JWT_PREVIOUS_KEY_FILES` so that tokens they signed verify until they
//! expire, and all are published at `GET /.well-known/jwks.json` under their
//! RFC 7638 thumbprint as `kid`. Refresh tokens are 256 random bits; only
//! their SHA-256 is stored (`sessions.rs`), which is also how they are looked
//! up, so no comparison of a secret happens in application code.

use std::collections::HashMap;
use std::time::Duration;

use argon2::password_hash::rand_core::{OsRng, RngCore};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm,
    OctetKeyPairParameters, OctetKeyPairType, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The JWT `typ` of access tokens (RFC 9068, section 2.1).
pub const ACCESS_TOKEN_TYPE: &str = "at+jwt";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not a PEM file")]
    Pem {
        what: String,
        #[source]
        source: pem::PemError,
    },
    #[error("{what} is not an Ed25519 key (PKCS#8 private key or SPKI public key)")]
    NotEd25519 { what: String },
    #[error("{what} is a public key; the signing key must be a private key")]
    NotPrivate { what: String },
}

/// One Ed25519 key: a private one signs, any verifies.
struct Key {
    kid: String,
    public: [u8; 32],
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
}

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before the
/// 32 bytes of the key.
const SPKI_ED25519_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

impl Key {
    fn from_pem(what: &str, text: &str) -> Result<Self, KeyError> {
        let pem = pem::parse(text).map_err(|source| KeyError::Pem {
            what: what.to_owned(),
            source,
        })?;
        let not_ed25519 = || KeyError::NotEd25519 {
            what: what.to_owned(),
        };
        let (public, encoding) = match pem.tag() {
            "PRIVATE KEY" => {
                let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pem.contents())
                    .map_err(|_| not_ed25519())?;
                let public: [u8; 32] = pair
                    .public_key()
                    .as_ref()
                    .try_into()
                    .map_err(|_| not_ed25519())?;
                (public, Some(EncodingKey::from_ed_der(pem.contents())))
            }
            "PUBLIC KEY" => {
                let key = pem
                    .contents()
                    .strip_prefix(&SPKI_ED25519_PREFIX)
                    .ok_or_else(not_ed25519)?;
                (key.try_into().map_err(|_| not_ed25519())?, None)
            }
            _ => return Err(not_ed25519()),
        };
        let x = URL_SAFE_NO_PAD.encode(public);
        let decoding = DecodingKey::from_ed_components(&x).map_err(|_| not_ed25519())?;
        Ok(Self {
            kid: thumbprint(&x),
            public,
            encoding,
            decoding,
        })
    }

    fn jwk(&self) -> Jwk {
        Jwk {
            common: CommonParameters {
                public_key_use: Some(PublicKeyUse::Signature),
                key_algorithm: Some(KeyAlgorithm::EdDSA),
                key_id: Some(self.kid.clone()),
                ..CommonParameters::default()
            },
            algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                key_type: OctetKeyPairType::OctetKeyPair,
                curve: EllipticCurve::Ed25519,
                x: URL_SAFE_NO_PAD.encode(self.public),
            }),
        }
    }
}

/// The RFC 7638 thumbprint of an Ed25519 JWK: SHA-256 of its required
/// members in lexicographic order, base64url.
fn thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// The claims of an access token (RFC 9068, section 2.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    /// The user id.
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    pub client_id: String,
    /// Space-separated scopes (RFC 8693 `scope`).
    pub scope: String,
    /// The session: the refresh-token family the token was issued with.
    pub sid: String,
}

/// A verified access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub user_id: Uuid,
    pub session: Uuid,
    pub scopes: Vec<String>,
}

/// Why an access token was not accepted; details stay in logs at debug level.
#[derive(Debug, thiserror::Error)]
pub enum InvalidToken {
    #[error("not a JWT of type at+jwt signed by a known key")]
    Unrecognised,
    #[error("signature, expiry, issuer or audience check failed")]
    Rejected(#[source] jsonwebtoken::errors::Error),
    #[error("the subject or session is not a UUID")]
    BadSubject,
}

/// What access tokens say about their issuer and how long they last.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// `JWT_ISSUER`, default `http://127.0.0.1:3001`.
    pub issuer: String,
    /// `JWT_AUDIENCE`, default `userstream`.
    pub audience: String,
    /// `ACCESS_TOKEN_TTL_SECS`, default 300.
    pub access_ttl: Duration,
    /// `REFRESH_TOKEN_TTL_SECS`, default 14 days.
    pub refresh_ttl: Duration,
}

/// The signing key, the keys kept for verification, and the JWKS document.
pub struct Keys {
    signing: Key,
    by_kid: HashMap<String, Key>,
    jwks: JwkSet,
    settings: TokenSettings,
    validation: Validation,
}

impl Keys {
    /// `signing` is a PKCS#8 PEM private key; `previous` are PEM keys
    /// (private or public) whose tokens must still verify.
    pub fn new(
        signing: (&str, &str),
        previous: &[(String, String)],
        settings: TokenSettings,
    ) -> Result<Self, KeyError> {
        let (what, text) = signing;
        let signing = Key::from_pem(what, text)?;
        if signing.encoding.is_none() {
            return Err(KeyError::NotPrivate {
                what: what.to_owned(),
            });
        }
        let mut by_kid = HashMap::new();
        let mut keys = vec![signing.jwk()];
        for (what, text) in previous {
            let key = Key::from_pem(what, text)?;
            if key.kid != signing.kid && !by_kid.contains_key(&key.kid) {
                keys.push(key.jwk());
                by_kid.insert(key.kid.clone(), key);
            }
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        Ok(Self {
            signing,
            by_kid,
            jwks: JwkSet { keys },
            settings,
            validation,
        })
    }

    pub fn settings(&self) -> &TokenSettings {
        &self.settings
    }

    /// `GET /.well-known/jwks.json`: the signing key first, then the others.
    pub fn jwks(&self) -> &JwkSet {
        &self.jwks
    }

    /// The `kid` new tokens are signed under.
    pub fn signing_kid(&self) -> &str {
        &self.signing.kid
    }

    /// Signs an access token for `user_id` in `session`.
    pub fn issue(
        &self,
        user_id: Uuid,
        session: Uuid,
        client_id: &str,
        scopes: &[String],
        now: chrono::DateTime<chrono::Utc>,
    ) -> String {
        let claims = AccessClaims {
            iss: self.settings.issuer.clone(),
            sub: user_id.to_string(),
            aud: self.settings.audience.clone(),
            iat: now.timestamp(),
            exp: now.timestamp() + i64::try_from(self.settings.access_ttl.as_secs()).unwrap_or(300),
            jti: Uuid::now_v7().to_string(),
            client_id: client_id.to_owned(),
            scope: scopes.join(" "),
            sid: session.to_string(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some(ACCESS_TOKEN_TYPE.to_owned());
        header.kid = Some(self.signing.kid.clone());
        let key = self
            .signing
            .encoding
            .as_ref()
            .expect("the signing key is private (checked in Keys::new)");
        jsonwebtoken::encode(&header, &claims, key).expect("Ed25519 signing does not fail")
    }

    /// Checks an access token: type, key, signature, expiry, issuer, audience.
    pub fn verify(&self, token: &str) -> Result<Verified, InvalidToken> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| InvalidToken::Unrecognised)?;
        if header.typ.as_deref() != Some(ACCESS_TOKEN_TYPE) || header.alg != Algorithm::EdDSA {
            return Err(InvalidToken::Unrecognised);
        }
        let kid = header.kid.ok_or(InvalidToken::Unrecognised)?;
        let key = if kid == self.signing.kid {
            &self.signing
        } else {
            self.by_kid.get(&kid).ok_or(InvalidToken::Unrecognised)?
        };
        let claims = jsonwebtoken::decode::<AccessClaims>(token, &key.decoding, &self.validation)
            .map_err(InvalidToken::Rejected)?
            .claims;
        Ok(Verified {
            user_id: Uuid::parse_str(&claims.sub).map_err(|_| InvalidToken::BadSubject)?,
            session: Uuid::parse_str(&claims.sid).map_err(|_| InvalidToken::BadSubject)?,
            scopes: claims.scope.split(' ').map(str::to_owned).collect(),
        })
    }
}

/// A new refresh token: 256 random bits, base64url (43 characters).
pub fn new_refresh_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// What is stored of a refresh token, and what it is looked up by.
pub fn refresh_token_digest(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Throwaway keys for these tests only, generated with
    /// `openssl genpkey -algorithm ed25519`.
    const KEY_A: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIBqoA/mO5kLnR1sIIKYLc0tfufUIaZUlfAUYi8LQnkDy\n-----END PRIVATE KEY-----\n";
    const KEY_B: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIInpYw7wG3eh1mpHUiPY2bWkeap1axs9jP06AX1+AceU\n-----END PRIVATE KEY-----\n";

    fn settings() -> TokenSettings {
        TokenSettings {
            issuer: "http://issuer.test".into(),
            audience: "userstream".into(),
            access_ttl: Duration::from_secs(300),
            refresh_ttl: Duration::from_secs(3600),
        }
    }

    fn keys(signing: &str, previous: &[&str]) -> Keys {
        let previous: Vec<_> = previous
            .iter()
            .map(|k| ("previous".to_owned(), (*k).to_owned()))
            .collect();
        Keys::new(("signing", signing), &previous, settings()).unwrap()
    }

    fn issue(keys: &Keys, now: chrono::DateTime<chrono::Utc>) -> (String, Uuid, Uuid) {
        let (user, session) = (Uuid::now_v7(), Uuid::now_v7());
        let scopes = vec!["user".to_owned(), "admin".to_owned()];
        (
            keys.issue(user, session, "cli", &scopes, now),
            user,
            session,
        )
    }

    #[test]
    fn an_issued_token_verifies_with_its_claims() {
        let keys = keys(KEY_A, &[]);
        let (token, user, session) = issue(&keys, chrono::Utc::now());
        let verified = keys.verify(&token).unwrap();
        assert_eq!(verified.user_id, user);
        assert_eq!(verified.session, session);
        assert_eq!(verified.scopes, ["user", "admin"]);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        assert_eq!(header.kid.as_deref(), Some(keys.signing_kid()));
    }

    #[test]
    fn expired_forged_and_foreign_tokens_are_refused() {
        let keys_a = keys(KEY_A, &[]);
        let old = chrono::Utc::now() - chrono::Duration::minutes(10);
        let (expired, _, _) = issue(&keys_a, old);
        assert!(matches!(
            keys_a.verify(&expired),
            Err(InvalidToken::Rejected(_))
        ));

        let (token, _, _) = issue(&keys_a, chrono::Utc::now());
        // A changed payload breaks the signature.
        let mut parts: Vec<&str> = token.split('.').collect();
        let claims = URL_SAFE_NO_PAD.decode(parts[1]).unwrap();
        let forged_claims = String::from_utf8(claims)
            .unwrap()
            .replace("\"user admin\"", "\"user admin root\"");
        let forged_payload = URL_SAFE_NO_PAD.encode(forged_claims);
        parts[1] = &forged_payload;
        assert!(keys_a.verify(&parts.join(".")).is_err());
        // Signed by a key this service does not know.
        let keys_b = keys(KEY_B, &[]);
        assert!(matches!(
            keys_b.verify(&token),
            Err(InvalidToken::Unrecognised)
        ));
        // Another audience.
        let mut other = settings();
        other.audience = "elsewhere".into();
        let elsewhere = Keys::new(("signing", KEY_A), &[], other).unwrap();
        assert!(elsewhere.verify(&token).is_err());
    }

    #[test]
    fn after_a_rotation_old_tokens_verify_and_both_keys_are_published() {
        let before = keys(KEY_A, &[]);
        let (token, user, _) = issue(&before, chrono::Utc::now());
        let after = keys(KEY_B, &[KEY_A]);
        assert_eq!(after.verify(&token).unwrap().user_id, user);
        let kids: Vec<_> = after
            .jwks()
            .keys
            .iter()
            .map(|k| k.common.key_id.clone().unwrap())
            .collect();
        assert_eq!(kids, [after.signing_kid(), before.signing_kid()]);
        // A downstream service builds its key from the published JWK alone.
        let jwk = &after.jwks().keys[1];
        let key = DecodingKey::from_jwk(jwk).unwrap();
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&["userstream"]);
        assert!(jsonwebtoken::decode::<AccessClaims>(&token, &key, &validation).is_ok());
    }

    #[test]
    fn a_public_key_cannot_sign() {
        let public = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA8gGnqqvkLS2cr69fuCBvARGOUuvL8DU+X+0D9e/hm30=\n-----END PUBLIC KEY-----\n";
        assert!(matches!(
            Keys::new(("signing", public), &[], settings()),
            Err(KeyError::NotPrivate { .. })
        ));
        assert!(Keys::new(("signing", "not a key"), &[], settings()).is_err());
    }

    #[test]
    fn refresh_tokens_are_random_and_stored_as_digests() {
        let (a, b) = (new_refresh_token(), new_refresh_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(refresh_token_digest(&a).len(), 32);
        assert_ne!(refresh_token_digest(&a), refresh_token_digest(&b));
    }
}
