//! Codes that go by mail (email verification, password reset).
//!
//! A code is eight decimal digits from the system's CSPRNG. The log keeps it
//! only sealed: AES-256-GCM under a key that the command API and the notifier
//! hold (`MAIL_CODE_KEY`), with the purpose and the user id as associated
//! data, so a sealed code cannot be moved to another user or used for the
//! other purpose. The write side opens it to check what a user typed; the
//! notifier opens it to write the mail. No other reader has the key, and
//! `events_public` drops the sealed value as well.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::domain::SealedCode;

/// How many digits a code has.
pub const DIGITS: usize = 8;

/// The version prefix of a sealed value, for a later change of scheme.
const SCHEME: &str = "v1.";

/// What a code proves; bound into its seal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    EmailVerification,
    PasswordReset,
}

impl Purpose {
    fn label(self) -> &'static str {
        match self {
            Self::EmailVerification => "email-verification",
            Self::PasswordReset => "password-reset",
        }
    }
}

/// A code in the clear. It never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Code(String);

impl Code {
    /// A fresh random code.
    pub fn generate() -> Self {
        let rng = SystemRandom::new();
        let mut digits = String::with_capacity(DIGITS);
        while digits.len() < DIGITS {
            let mut byte = [0u8; 1];
            rng.fill(&mut byte).expect("the system CSPRNG is available");
            // Rejection sampling keeps every digit equally likely.
            if byte[0] < 250 {
                digits.push(char::from(b'0' + byte[0] % 10));
            }
        }
        Self(digits)
    }

    /// The digits, for the mail that carries them.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `typed` is this code, in constant time, as [`as_typed`] reads it.
    pub fn matches(&self, typed: &str) -> bool {
        let typed = as_typed(typed);
        typed.len() == self.0.len() && bool::from(typed.as_bytes().ct_eq(self.0.as_bytes()))
    }
}

/// What a user typed as a code, without the spaces and hyphens a mail client
/// may show or a user may type.
pub fn as_typed(typed: &str) -> String {
    typed.chars().filter(|c| !matches!(c, ' ' | '-')).collect()
}

impl std::fmt::Debug for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Code(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "MAIL_CODE_KEY must be 32 bytes in base64 (e.g. `openssl rand -base64 32`), got {0} bytes"
    )]
    Length(usize),
    #[error("MAIL_CODE_KEY is not base64")]
    Encoding(#[from] base64::DecodeError),
}

/// A sealed code that could not be opened: another key, another user or
/// purpose, or a damaged value.
#[derive(Debug, thiserror::Error)]
#[error("the sealed code cannot be opened with this key")]
pub struct OpenError;

/// The key that seals and opens codes.
pub struct CodeKey(LessSafeKey);

impl std::fmt::Debug for CodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CodeKey(<redacted>)")
    }
}

impl CodeKey {
    /// A key from 32 bytes in standard or URL-safe base64.
    pub fn from_base64(encoded: &str) -> Result<Self, KeyError> {
        let encoded = encoded.trim();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .or_else(|_| URL_SAFE_NO_PAD.decode(encoded.trim_end_matches('=')))?;
        let unbound =
            UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| KeyError::Length(bytes.len()))?;
        Ok(Self(LessSafeKey::new(unbound)))
    }

    pub fn seal(&self, purpose: Purpose, user_id: Uuid, code: &Code) -> SealedCode {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system CSPRNG is available");
        let mut sealed = code.0.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated_data(purpose, user_id)),
                &mut sealed,
            )
            .expect("AES-GCM seals a short code");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        SealedCode::new(format!("{SCHEME}{}", URL_SAFE_NO_PAD.encode(out)))
    }

    pub fn open(
        &self,
        purpose: Purpose,
        user_id: Uuid,
        sealed: &SealedCode,
    ) -> Result<Code, OpenError> {
        let raw = sealed
            .expose()
            .strip_prefix(SCHEME)
            .and_then(|b64| URL_SAFE_NO_PAD.decode(b64).ok())
            .ok_or(OpenError)?;
        if raw.len() < NONCE_LEN {
            return Err(OpenError);
        }
        let (nonce, body) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError)?;
        let mut body = body.to_vec();
        let plain = self
            .0
            .open_in_place(
                nonce,
                Aad::from(associated_data(purpose, user_id)),
                &mut body,
            )
            .map_err(|_| OpenError)?;
        String::from_utf8(plain.to_vec())
            .map(Code)
            .map_err(|_| OpenError)
    }
}

fn associated_data(purpose: Purpose, user_id: Uuid) -> Vec<u8> {
    format!("userstream/{}/{user_id}", purpose.label()).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> CodeKey {
        CodeKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([byte; 32])).unwrap()
    }

    #[test]
    fn a_sealed_code_opens_only_for_its_user_purpose_and_key() {
        let user = Uuid::new_v4();
        let code = Code::generate();
        let sealed = key(1).seal(Purpose::PasswordReset, user, &code);
        assert!(!sealed.expose().contains(code.expose()));
        assert_eq!(
            key(1).open(Purpose::PasswordReset, user, &sealed).unwrap(),
            code
        );
        assert!(key(2).open(Purpose::PasswordReset, user, &sealed).is_err());
        assert!(key(1)
            .open(Purpose::EmailVerification, user, &sealed)
            .is_err());
        assert!(key(1)
            .open(Purpose::PasswordReset, Uuid::new_v4(), &sealed)
            .is_err());
        assert!(key(1)
            .open(
                Purpose::PasswordReset,
                user,
                &SealedCode::new("v1.AAAA".into())
            )
            .is_err());
    }

    #[test]
    fn codes_are_eight_random_digits_and_match_as_typed() {
        let a = Code::generate();
        assert_eq!(a.expose().len(), DIGITS);
        assert!(a.expose().bytes().all(|b| b.is_ascii_digit()));
        assert_ne!(a, Code::generate(), "two codes in a row differ (1 in 10^8)");
        let spaced = format!("{} {}", &a.expose()[..4], &a.expose()[4..]);
        assert!(a.matches(&spaced));
        assert!(!a.matches(&a.expose()[..7]));
        assert!(!a.matches(""));
        assert!(!format!("{a:?}").contains(a.expose()));
    }

    #[test]
    fn keys_must_be_32_bytes() {
        assert!(matches!(
            CodeKey::from_base64("c2hvcnQ="),
            Err(KeyError::Length(5))
        ));
        assert!(CodeKey::from_base64("not base64 !").is_err());
    }
}
