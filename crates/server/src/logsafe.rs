//! User-supplied text in log lines: [`Untrusted`] escapes it and cuts it, so that a username
//! with a line feed cannot forge a log line, an ANSI escape cannot reach an operator's
//! terminal, and one 512 KiB value cannot add 512 KiB to the log.

use std::fmt;

/// How many characters of an untrusted value a log line shows.
pub const LOG_CHARS: usize = 128;

/// Displays a string from a client (or a remote server) for a log line: control characters,
/// invisible and reordering characters and backslashes escaped the way Rust writes them
/// (`\n`, `\u{1b}`, `\u{202e}`, `\\`), and everything after [`LOG_CHARS`] characters replaced
/// by a marker saying how many bytes were left out. Use it at every log site that prints
/// user input: `tracing::info!(username = %Untrusted(&name), ...)`.
#[derive(Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, self.0, LOG_CHARS)
    }
}

impl fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        write_escaped(f, self.0, LOG_CHARS)?;
        f.write_str("\"")
    }
}

fn write_escaped(f: &mut fmt::Formatter<'_>, s: &str, max_chars: usize) -> fmt::Result {
    use fmt::Write;
    for (n, (at, c)) in s.char_indices().enumerate() {
        if n == max_chars {
            return write!(f, "…[cut: {} more bytes]", s.len() - at);
        }
        // `escape_debug` leaves printable characters alone and escapes the rest (control,
        // format, separators, unassigned) and the backslash; quotes need no escape here.
        if c == '"' || c == '\'' {
            f.write_char(c)?;
        } else {
            write!(f, "{}", c.escape_debug())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_forge_a_line_or_drive_a_terminal() {
        let s = "bob\n2026-01-01T00:00:00Z  INFO forged\r\x1b[31mred\x07\u{202e}\u{85}\\n \"q\" é 日本";
        let shown = Untrusted(s).to_string();
        assert_eq!(
            shown,
            "bob\\n2026-01-01T00:00:00Z  INFO forged\\r\\u{1b}[31mred\\u{7}\\u{202e}\\u{85}\\\\n \"q\" é 日本"
        );
        assert!(!shown.chars().any(|c| c.is_control()));
        assert_eq!(format!("{:?}", Untrusted("a\nb")), "\"a\\nb\"");
    }

    #[test]
    fn cuts_long_values_with_a_marker() {
        let long = "é".repeat(LOG_CHARS) + &"x".repeat(512 * 1024);
        let shown = Untrusted(&long).to_string();
        assert_eq!(shown, "é".repeat(LOG_CHARS) + "…[cut: 524288 more bytes]");
        let exact = "y".repeat(LOG_CHARS);
        assert_eq!(Untrusted(&exact).to_string(), exact);
    }
}
