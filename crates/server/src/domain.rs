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

/// A bot's name: 1 to 100 characters after trimming, with at least one visible character,
/// and none of: control characters (C0, DEL, C1: NUL, ESC, CR, LF, BEL, ...), the bidi
/// embedding/override/isolate controls (which reorder the text around them) and the line and
/// paragraph separators. Zero-width joiners and variation selectors stay allowed inside a
/// name (emoji need them), but a name of nothing but whitespace and invisible characters is
/// refused.
pub fn bot_name(s: &str) -> Result<String, Invalid> {
    let t = s.trim();
    let len = t.chars().count();
    if len == 0 || len > 100 {
        return Err(invalid(ErrorCode::InvalidBot, format!("name must be 1 to 100 characters, got {len}")));
    }
    if let Some((i, c)) = t.chars().enumerate().find(|(_, c)| c.is_control() || is_reordering_or_separator(*c)) {
        return Err(invalid(
            ErrorCode::InvalidBot,
            format!("name must not contain control characters; found U+{:04X} at character {}", c as u32, i + 1),
        ));
    }
    if t.chars().all(|c| c.is_whitespace() || is_invisible(c)) {
        return Err(invalid(ErrorCode::InvalidBot, "name must contain a visible character"));
    }
    Ok(t.to_owned())
}

/// A bot's description: at most 2000 characters; free text, so tab, line feed and carriage
/// return are allowed, but no other control character (NUL, ESC, BEL, DEL, C1 ...).
pub fn bot_description(s: &str) -> Result<String, Invalid> {
    let len = s.chars().count();
    if len > 2000 {
        return Err(invalid(ErrorCode::InvalidBot, format!("description must be at most 2000 characters, got {len}")));
    }
    if let Some((i, c)) = s.chars().enumerate().find(|(_, c)| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
        return Err(invalid(
            ErrorCode::InvalidBot,
            format!(
                "description must not contain control characters other than tab and line breaks; found U+{:04X} at character {}",
                c as u32,
                i + 1
            ),
        ));
    }
    Ok(s.to_owned())
}

/// NUL (U+0000) is refused in every string a client sends: PostgreSQL cannot store it in
/// `text` or `jsonb` (SQLite can), so one check at the edge makes every store answer alike.
/// Returns the message naming `field`.
pub fn no_nul(field: &str, s: &str) -> Result<(), String> {
    match s.find('\0') {
        None => Ok(()),
        Some(at) => Err(format!("{field} must not contain NUL (U+0000); found at byte {at}")),
    }
}

/// Text from elsewhere (a bot engine's reply) with each NUL replaced by U+FFFD, so that every
/// store keeps the same text.
pub fn replace_nul(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}").into()
    } else {
        s.into()
    }
}

/// Where the first string (or object key) holding a NUL is in a JSON value, as a field path
/// like `engine.rules[2].reply`; `None` when there is none.
pub fn json_nul_path(v: &serde_json::Value) -> Option<String> {
    fn walk(v: &serde_json::Value, path: &mut String) -> bool {
        match v {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = walk(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            serde_json::Value::Object(map) => map.iter().any(|(k, item)| {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                // A key with a NUL is named with the NUL escaped.
                path.push_str(&k.replace('\0', "\\u0000"));
                let found = k.contains('\0') || walk(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            _ => false,
        }
    }
    let mut path = String::new();
    walk(v, &mut path).then_some(path)
}

/// Bidi embeddings, overrides and isolates (U+202A..U+202E, U+2066..U+2069) reorder the text
/// that follows them; line and paragraph separators (U+2028, U+2029) break lines.
fn is_reordering_or_separator(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
}

/// Characters that draw nothing: Unicode's default-ignorable code points (zero-width spaces
/// and joiners, format characters, variation selectors, tags, ...) and the blank-looking
/// fillers (Hangul fillers, braille blank).
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{2800}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
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

    #[test]
    fn names_refuse_control_and_invisible_characters() {
        for bad in ["a\0b", "a\x1b[31mb", "a\rb", "a\nb", "a\x07", "a\u{85}b", "a\u{202E}b", "a\u{2028}b"] {
            let e = bot_name(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidBot, "{bad:?}");
            assert!(e.message.starts_with("name must not contain control characters"), "{}", e.message);
        }
        for bad in ["\u{200B}", "\u{200B}\u{200D}\u{FEFF}", " \u{3164} ", "\u{2800}", "\u{00A0}\u{2060}"] {
            assert_eq!(bot_name(bad).unwrap_err().message, "name must contain a visible character", "{bad:?}");
        }
        for ok in ["Echo", "élan vital", "日本語ボット", "👨\u{200D}👩\u{200D}👧 family", "a\u{200B}b", "❤\u{FE0F}"]
        {
            assert!(bot_name(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn descriptions_allow_tabs_and_line_breaks_only() {
        assert!(bot_description("line one\r\nline two\n\tindented").is_ok());
        for bad in ["a\0b", "a\x1b[31m", "a\x07", "a\x7f", "a\u{9b}"] {
            let e = bot_description(bad).unwrap_err();
            assert!(e.message.starts_with("description must not contain control characters"), "{bad:?}");
        }
    }

    #[test]
    fn nul_is_found_and_named() {
        assert!(no_nul("content", "fine\n").is_ok());
        assert_eq!(no_nul("content", "ab\0").unwrap_err(), "content must not contain NUL (U+0000); found at byte 2");
        let v = serde_json::json!({"name": "ok", "engine": {"rules": [{"reply": "x"}, {"reply": "a\0"}]}});
        assert_eq!(json_nul_path(&v).as_deref(), Some("engine.rules[1].reply"));
        assert_eq!(json_nul_path(&serde_json::json!({"a\0": 1})).as_deref(), Some("a\\u0000"));
        assert_eq!(json_nul_path(&serde_json::json!({"a": ["b", 1, null]})), None);
    }
}
