//! Looking inside an access token without verifying it: the doctor has no key, it only wants
//! to say "this token expired 3 minutes ago" or "this is not a JWT at all" before asking the
//! server. Error messages describe the token's shape and never quote it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// What an access token's header and payload say.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JwtInfo {
    pub alg: Option<String>,
    /// The user id.
    pub sub: Option<String>,
    /// The username (natter puts it in `name`).
    pub name: Option<String>,
    pub iat: Option<i64>,
    pub exp: Option<i64>,
}

fn decode_part(part: &str, which: &str) -> Result<serde_json::Value, String> {
    // Tolerate padding, which some tools add although JWTs use unpadded base64url.
    let bytes =
        URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).map_err(|_| format!("its {which} is not base64url"))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| format!("its {which} is not JSON"))?;
    if !value.is_object() {
        return Err(format!("its {which} is not a JSON object"));
    }
    Ok(value)
}

/// Decodes the header and payload. The error says what is wrong with the token's shape.
pub fn decode(token: &str) -> Result<JwtInfo, String> {
    let token = token.trim();
    if token.is_empty() {
        return Err("it is empty".into());
    }
    if token.len() > 8 && token[..7].eq_ignore_ascii_case("bearer ") {
        return Err("it starts with \"Bearer \"; pass only the token itself".into());
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        let n = parts.len();
        return Err(format!(
            "it has {n} dot-separated part{}, a JWT has 3 (header.payload.signature)",
            if n == 1 { "" } else { "s" }
        ));
    }
    let header = decode_part(parts[0], "header")?;
    let payload = decode_part(parts[1], "payload")?;
    if parts[2].is_empty() {
        return Err("it has no signature".into());
    }
    let s = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let n = |k: &str| payload.get(k).and_then(|x| x.as_i64().or_else(|| x.as_f64().map(|f| f as i64)));
    Ok(JwtInfo {
        alg: s(&header, "alg"),
        sub: s(&payload, "sub"),
        name: s(&payload, "name"),
        iat: n("iat"),
        exp: n("exp"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(header: &str, payload: &str) -> String {
        format!("{}.{}.c2ln", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload))
    }

    #[test]
    fn decodes_claims_without_a_key() {
        let t = jwt(r#"{"alg":"HS256","typ":"JWT"}"#, r#"{"sub":"u-1","name":"alice","iat":100,"exp":1000}"#);
        let info = decode(&t).unwrap();
        assert_eq!(info.alg.as_deref(), Some("HS256"));
        assert_eq!(info.sub.as_deref(), Some("u-1"));
        assert_eq!(info.name.as_deref(), Some("alice"));
        assert_eq!((info.iat, info.exp), (Some(100), Some(1000)));
        // Missing claims are None, not an error.
        let info = decode(&jwt(r#"{"alg":"HS256"}"#, "{}")).unwrap();
        assert_eq!(info.exp, None);
    }

    #[test]
    fn names_what_is_wrong_without_quoting_the_token() {
        let e = decode("not-a-jwt-at-all").unwrap_err();
        assert!(e.contains("1 dot-separated part,"), "{e}");
        assert!(!e.contains("not-a-jwt"), "{e}");
        assert!(decode("a.b").unwrap_err().contains("2 dot-separated parts"));
        assert!(decode("").unwrap_err().contains("empty"));
        assert!(decode("Bearer x.y.z").unwrap_err().contains("Bearer"));
        assert!(decode("!!!.e30.c2ln").unwrap_err().contains("header is not base64url"));
        let not_json = format!("{}.{}.c2ln", URL_SAFE_NO_PAD.encode("{}"), URL_SAFE_NO_PAD.encode("hello"));
        assert!(decode(&not_json).unwrap_err().contains("payload is not JSON"));
        let unsigned = format!("{}.{}.", URL_SAFE_NO_PAD.encode("{}"), URL_SAFE_NO_PAD.encode("{}"));
        assert!(decode(&unsigned).unwrap_err().contains("no signature"));
    }
}
