//! Credentials: argon2id password hashes, HS256 access tokens, opaque refresh tokens and
//! socket tickets (stored only as SHA-256 hashes).

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: Uuid,
    /// The username, so the socket can greet without a lookup.
    pub name: String,
    pub iat: i64,
    pub exp: i64,
    /// The login (refresh-token family) the token belongs to: logout revokes it, and with it
    /// this token (`revocation.rs`). Tokens issued before natter put it there have none and
    /// stay valid until they expire (at most the access-token TTL after the upgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<Uuid>,
}

/// Why an access token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Expired,
    Invalid,
}

/// Signs and checks access tokens. Only HS256 is accepted, whatever the token's header says.
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl TokenKeys {
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "iat", "sub"]);
        TokenKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A token for this user and login (refresh-token family).
    pub fn issue(&self, user_id: Uuid, username: &str, sid: Uuid) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: user_id,
            name: username.to_owned(),
            iat: now,
            exp: now + self.ttl.as_secs() as i64,
            sid: Some(sid),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// The user a genuinely signed token belongs to, expired or not, so a refused attempt can
    /// still be shown to its user in the connection ledger.
    pub fn identify(&self, token: &str) -> Option<Uuid> {
        let mut v = self.validation.clone();
        v.validate_exp = false;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &v).ok().map(|d| d.claims.sub)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map(|d| d.claims).map_err(|e| {
            match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            }
        })
    }
}

/// Loads the signing secret from `<data_dir>/jwt-secret`, creating it (mode 0600) on first start.
pub fn load_or_create_secret(data_dir: &Path) -> std::io::Result<Vec<u8>> {
    let path = data_dir.join("jwt-secret");
    match std::fs::read_to_string(&path) {
        Ok(s) => hex::decode(s.trim()).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} is not hex: {e}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = vec![0u8; 32];
            rand::rng().fill_bytes(&mut secret);
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            use std::io::Write;
            let mut f = opts.open(&path)?;
            f.write_all(hex::encode(&secret).as_bytes())?;
            f.sync_all()?;
            Ok(secret)
        }
        Err(e) => Err(e),
    }
}

/// Hashes a password with argon2id, on the calling thread with memory of its own. For
/// one-off tools and tests; the server hashes through its bounded pool
/// ([`crate::passwords::PasswordPool`]).
pub fn hash_password(password: &str) -> String {
    crate::passwords::hash_with(&mut Vec::new(), password)
}

/// Checks a password against a stored hash, like [`hash_password`]: for tools and tests.
pub fn verify_password(password: &str, hash: &str) -> bool {
    crate::passwords::verify_with(&mut Vec::new(), password, hash)
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

/// A fresh opaque secret (refresh token, ticket): 32 random bytes, base64url.
pub fn new_opaque_token() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>())
}

/// How opaque secrets are stored: SHA-256, hex.
pub fn hash_opaque(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh socket ticket. The login rides in the ticket itself (after a '.', under the stored
/// hash, so it can't be altered): a connection opened with it closes when that login ends.
pub fn new_ticket(family: Option<Uuid>) -> String {
    match family {
        Some(f) => format!("{}.{}", new_opaque_token(), f.simple()),
        None => new_opaque_token(),
    }
}

/// The login a ticket was issued for (see [`new_ticket`]).
pub fn ticket_family(ticket: &str) -> Option<Uuid> {
    ticket.rsplit_once('.').and_then(|(_, f)| Uuid::parse_str(f).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_expire() {
        let keys = TokenKeys::new(b"secret-one", Duration::from_secs(60));
        let id = Uuid::new_v4();
        let sid = Uuid::new_v4();
        let t = keys.issue(id, "alice", sid);
        let c = keys.verify(&t).unwrap();
        assert_eq!((c.sub, c.sid), (id, Some(sid)));
        assert_eq!(c.name, "alice");
        assert_eq!(TokenKeys::new(b"other", Duration::from_secs(60)).verify(&t).unwrap_err(), TokenError::Invalid);

        let expired = Claims { sub: id, name: "a".into(), iat: 0, exp: chrono::Utc::now().timestamp() - 60, sid: None };
        let t =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &expired, &EncodingKey::from_secret(b"secret-one"))
                .unwrap();
        assert_eq!(keys.verify(&t).unwrap_err(), TokenError::Expired);
        assert_eq!(keys.verify("not.a.jwt").unwrap_err(), TokenError::Invalid);
    }

    #[test]
    fn rejects_other_algorithms() {
        let keys = TokenKeys::new(b"secret", Duration::from_secs(60));
        let claims = Claims {
            sub: Uuid::new_v4(),
            name: "a".into(),
            iat: 0,
            exp: chrono::Utc::now().timestamp() + 60,
            sid: None,
        };
        // HS512 with the same secret: a valid signature, but not the algorithm we accept.
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS512), &claims, &EncodingKey::from_secret(b"secret"))
            .unwrap();
        assert_eq!(keys.verify(&t).unwrap_err(), TokenError::Invalid);
        // alg "none": header and payload with an empty signature.
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none =
            format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&serde_json::to_string(&claims).unwrap()));
        assert_eq!(keys.verify(&none).unwrap_err(), TokenError::Invalid);
    }

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        assert!(!verify_password("x", "not a hash"));
        assert!(!verify_password("", crate::passwords::dummy_hash()));
    }

    #[test]
    fn secret_file_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_secret(dir.path()).unwrap();
        let b = load_or_create_secret(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 32);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("jwt-secret")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
