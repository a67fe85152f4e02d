//! Validated values: parse once at the edge, trust afterwards.

use natter_proto::ErrorCode;

/// Why a value was refused, with the error code the API answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub code: ErrorCode,
    pub message: String,
}

fn invalid(code: ErrorCode, message: impl Into<String>) -> Invalid {
    Invalid { code, message: message.into() }
}

/// 3 to 32 characters of `a-z 0-9 _ . -`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    pub fn parse(s: &str) -> Result<Username, Invalid> {
        let len = s.chars().count();
        if !(3..=32).contains(&len) {
            return Err(invalid(ErrorCode::InvalidUsername, format!("username must be 3 to 32 characters, got {len}")));
        }
        if let Some(bad) = s.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(*c))) {
            return Err(invalid(
                ErrorCode::InvalidUsername,
                format!("username may only contain a-z, 0-9, '_', '.' and '-'; found {bad:?}"),
            ));
        }
        Ok(Username(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn into_inner(self) -> String {
        self.0
    }
}

/// A new password: 8 to 1024 characters. Never printed.
pub struct Password(String);

impl Password {
    pub fn parse(s: &str) -> Result<Password, Invalid> {
        let len = s.chars().count();
        if len < 8 {
            return Err(invalid(ErrorCode::InvalidPassword, "password must be at least 8 characters"));
        }
        if len > 1024 {
            return Err(invalid(ErrorCode::InvalidPassword, "password must be at most 1024 characters"));
        }
        Ok(Password(s.to_owned()))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// A bot's name: 1 to 100 characters after trimming.
pub fn bot_name(s: &str) -> Result<String, Invalid> {
    let t = s.trim();
    let len = t.chars().count();
    if len == 0 || len > 100 {
        return Err(invalid(ErrorCode::InvalidBot, format!("name must be 1 to 100 characters, got {len}")));
    }
    Ok(t.to_owned())
}

/// A bot's description: at most 2000 characters.
pub fn bot_description(s: &str) -> Result<String, Invalid> {
    let len = s.chars().count();
    if len > 2000 {
        return Err(invalid(ErrorCode::InvalidBot, format!("description must be at most 2000 characters, got {len}")));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for ok in ["abc", "a_b.c-d", "user123", &"x".repeat(32)] {
            assert!(Username::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["ab", "Abc", "a b", "élan", &"x".repeat(33), ""] {
            assert_eq!(Username::parse(bad).unwrap_err().code, ErrorCode::InvalidUsername, "{bad}");
        }
    }

    #[test]
    fn passwords() {
        assert!(Password::parse("12345678").is_ok());
        assert!(Password::parse("1234567").is_err());
        assert!(Password::parse(&"p".repeat(1025)).is_err());
        assert_eq!(format!("{:?}", Password::parse("secret-pass").unwrap()), "Password(<redacted>)");
    }

    #[test]
    fn bot_fields() {
        assert_eq!(bot_name("  Echo ").unwrap(), "Echo");
        assert!(bot_name("   ").is_err());
        assert!(bot_name(&"n".repeat(101)).is_err());
        assert!(bot_description(&"d".repeat(2001)).is_err());
    }
}
