//! The close-code and error-code registries: one table, served by `GET /api/ws/codes`,
//! documented in `docs/protocol.md`, and used by every client instead of its own copy.

use serde::Serialize;

/// What a client should do after a close with a given code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RetryPolicy {
    /// Do not reconnect: the request itself is wrong or forbidden.
    Stop,
    /// Get a fresh token (refresh or log in), then reconnect once.
    ReauthOnce,
    /// Reconnect with exponential backoff and jitter, resuming with `after_seq`.
    Backoff,
    /// Reconnect after the delay the reason carries (`retry_after_ms=N`).
    AfterHint,
}

macro_rules! close_codes {
    ($( $(#[$doc:meta])* $variant:ident = $code:literal, $name:literal, $retry:ident, $desc:literal; )*) => {
        /// Every close code the server sends. Each has a name, a retry policy and a help text.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum CloseCode { $( $(#[$doc])* $variant, )* }

        impl CloseCode {
            pub const ALL: &'static [CloseCode] = &[ $(CloseCode::$variant,)* ];
            pub fn code(self) -> u16 { match self { $(CloseCode::$variant => $code,)* } }
            pub fn name(self) -> &'static str { match self { $(CloseCode::$variant => $name,)* } }
            pub fn retry(self) -> RetryPolicy { match self { $(CloseCode::$variant => RetryPolicy::$retry,)* } }
            pub fn description(self) -> &'static str { match self { $(CloseCode::$variant => $desc,)* } }
            pub fn from_code(code: u16) -> Option<CloseCode> {
                match code { $($code => Some(CloseCode::$variant),)* _ => None }
            }
        }
    };
}

close_codes! {
    /// The server closed normally (for example after the client asked to close).
    Normal = 1000, "normal", Stop, "The connection was closed normally.";
    /// The client broke the WebSocket framing rules (RFC 6455 §7.4.1): an unmasked frame,
    /// reserved bits or opcodes, an oversized or fragmented control frame, a stray continuation.
    ProtocolError = 1002, "protocol_error", Stop, "The client sent a frame that breaks the WebSocket protocol (unmasked, reserved bits or opcode, bad control frame, stray continuation); the reason names it. Fix the client.";
    /// A text frame was not valid UTF-8.
    InvalidPayload = 1007, "invalid_payload", Stop, "A text frame was not valid UTF-8. Fix the client.";
    /// Origin header present and not allowed.
    OriginNotAllowed = 1008, "origin_not_allowed", Stop, "The page's Origin is neither the server's own nor in its --allowed-origin list. Add the origin to the server's configuration.";
    /// A frame was larger than the frame limit.
    FrameTooLarge = 1009, "frame_too_large", Backoff, "A frame was larger than the server's frame limit. Reconnect, and do not resend that frame.";
    /// Internal error; the reason carries an error id that is also in the server log.
    InternalError = 1011, "internal_error", Backoff, "The server hit an internal error. The reason carries an error id that is also in the server log. Reconnect with backoff.";
    /// The server is shutting down or restarting.
    ServiceRestart = 1012, "server_restarting", Backoff, "The server is restarting. Reconnect after the hint in the reason (retry_after_ms=N, spread over the clients), then with backoff and jitter, resuming with after_seq.";
    /// The server is overloaded; the reason carries `retry_after_ms=N`.
    TryAgainLater = 1013, "try_again_later", AfterHint, "The server is overloaded or a dependency is down. Retry after the hint in the reason (retry_after_ms=N).";
    /// Malformed request: bad bot id, bad `after_seq`, bad `attempt_id`.
    BadRequest = 4400, "bad_request", Stop, "The request is malformed (bad bot id, after_seq or attempt_id). Fix the request; retrying will not help.";
    /// Token or ticket missing, invalid or expired.
    Unauthorized = 4401, "unauthorized", ReauthOnce, "The token or ticket is missing, invalid or expired (the reason says which). Refresh the token, then reconnect once.";
    /// The user may not chat with this bot.
    Forbidden = 4403, "forbidden", Stop, "This user is not allowed to chat with this bot. Ask the bot's owner to share it.";
    /// The bot does not exist.
    BotNotFound = 4404, "bot_not_found", Stop, "No bot has this id. Check the bot id.";
    /// No traffic from the client within the heartbeat timeout.
    HeartbeatTimeout = 4408, "heartbeat_timeout", Backoff, "Nothing was heard from the client for two heartbeat intervals. Reconnect; keep answering pings (or send app-level pings).";
    /// The client did not read fast enough and its outbound queue filled up.
    SlowConsumer = 4409, "slow_consumer", Backoff, "The client did not read its messages fast enough and its outbound queue filled up. Reconnect with after_seq to get what was missed.";
    /// Too many connections for this user.
    TooManyConnections = 4429, "too_many_connections", Backoff, "This user already has the maximum number of open connections. Close other tabs or retry later with backoff.";
}

impl Serialize for CloseCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.code())
    }
}

macro_rules! error_codes {
    ($( $variant:ident = $code:literal, $desc:literal; )*) => {
        /// Every `code` an `{"type":"error"}` frame or a REST error body can carry.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $( $variant, )* }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[ $(ErrorCode::$variant,)* ];
            pub fn as_str(self) -> &'static str { match self { $(ErrorCode::$variant => $code,)* } }
            pub fn description(self) -> &'static str { match self { $(ErrorCode::$variant => $desc,)* } }
            pub fn parse(s: &str) -> Option<ErrorCode> {
                match s { $($code => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    // Socket frame errors: the connection stays up.
    InvalidJson = "invalid_json", "The frame is not valid JSON.";
    InvalidFrame = "invalid_frame", "A field is missing or has the wrong type; the message names it.";
    UnknownType = "unknown_type", "The frame's type is not one the server knows.";
    BinaryNotSupported = "binary_not_supported", "Binary frames are not part of the protocol; send JSON text frames.";
    InvalidClientId = "invalid_client_id", "client_id must be 1 to 64 characters.";
    EmptyContent = "empty_content", "A message needs some content.";
    ContentTooLong = "content_too_long", "The content is longer than the limit in connection_established.limits.max_content_chars.";
    RateLimited = "rate_limited", "Too many messages on this connection; wait retry_after_ms before sending again.";
    BotError = "bot_error", "The bot's engine failed; the message says why.";
    BotTimeout = "bot_timeout", "The bot's engine took too long to answer.";
    BotBusy = "bot_busy", "The bot has too many replies in progress; try again shortly.";
    UnknownMessage = "unknown_message", "No reply in progress has that message_id.";
    // REST errors.
    BadRequest = "bad_request", "The request is malformed; the message says how.";
    InvalidBody = "invalid_body", "The JSON body is malformed or a field is missing or has the wrong type; the message names it.";
    InvalidId = "invalid_id", "An id in the path is not a valid UUID.";
    InvalidUsername = "invalid_username", "Usernames are 3 to 32 characters of a-z, 0-9, '_', '.' and '-'.";
    InvalidPassword = "invalid_password", "Passwords are at least 8 characters (and at most 1024).";
    InvalidBot = "invalid_bot", "A bot field is invalid; the message names it.";
    InvalidQuery = "invalid_query", "A query parameter is invalid; the message names it.";
    UsernameTaken = "username_taken", "That username is already registered.";
    RegistrationClosed = "registration_closed", "This server does not accept new registrations.";
    InvalidCredentials = "invalid_credentials", "Wrong username or password.";
    MissingToken = "missing_token", "No access token was sent (Authorization: Bearer <token>).";
    InvalidToken = "invalid_token", "The token is malformed or its signature does not match.";
    TokenExpired = "token_expired", "The access token has expired; refresh it.";
    InvalidRefreshToken = "invalid_refresh_token", "The refresh token is unknown, expired or revoked; log in again.";
    RefreshTokenReused = "refresh_token_reused", "A refresh token was used twice; all tokens of that login were revoked. Log in again.";
    Forbidden = "forbidden", "You may not do this to this resource.";
    NotFound = "not_found", "No such resource.";
    UserNotFound = "user_not_found", "No user has that username.";
    Conflict = "conflict", "The request conflicts with the current state.";
    MethodNotAllowed = "method_not_allowed", "This path does not accept that method.";
    PayloadTooLarge = "payload_too_large", "The request body is larger than 1 MiB.";
    UnsupportedMediaType = "unsupported_media_type", "Send the body as application/json.";
    NotReady = "not_ready", "A dependency of the server is unavailable.";
    Internal = "internal", "The server hit an internal error; the message carries an error id that is in the server log.";
    TooManyAttempts = "too_many_attempts", "Too many failed logins for this username or from this address; wait the Retry-After seconds.";
    AuthBusy = "auth_busy", "The server is checking too many passwords at once (503); retry after the Retry-After seconds.";
    TokenRevoked = "token_revoked", "This login was ended (logout, or its refresh token was used twice); log in again.";
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One row of the close-code registry.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CloseCodeInfo {
    pub code: u16,
    pub name: &'static str,
    pub retry: RetryPolicy,
    pub description: &'static str,
}

/// One row of the error-code registry.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorCodeInfo {
    pub code: &'static str,
    pub description: &'static str,
}

/// The body of `GET /api/ws/codes`.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CodeRegistry {
    pub close_codes: Vec<CloseCodeInfo>,
    pub error_codes: Vec<ErrorCodeInfo>,
}

impl CodeRegistry {
    pub fn build() -> Self {
        CodeRegistry {
            close_codes: CloseCode::ALL
                .iter()
                .map(|c| CloseCodeInfo {
                    code: c.code(),
                    name: c.name(),
                    retry: c.retry(),
                    description: c.description(),
                })
                .collect(),
            error_codes: ErrorCode::ALL
                .iter()
                .map(|c| ErrorCodeInfo { code: c.as_str(), description: c.description() })
                .collect(),
        }
    }
}

/// The start of every 1012 reason.
pub const RESTARTING: &str = "server restarting; reconnect with backoff";

/// The most a close frame's reason can carry (RFC 6455 §5.5: 125 bytes of payload, 2 of code).
pub const MAX_CLOSE_REASON_BYTES: usize = 123;

/// A server-initiated close: the one way natter says "close" — a code from [`CloseCode`] and a
/// reason for people, built here so that a retry hint is always written the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: CloseCode,
    /// The whole reason (logs); [`Close::wire_reason`] is what fits in a close frame.
    pub reason: String,
}

impl Close {
    pub fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        Close { code, reason: reason.into() }
    }

    /// 1013 with the retry hint clients read (`RetryPolicy::AfterHint`): `<why>; retry_after_ms=N`.
    pub fn try_again_later(why: &str, retry_after_ms: u64) -> Self {
        Close::new(CloseCode::TryAgainLater, format!("{why}; retry_after_ms={retry_after_ms}"))
    }

    /// 1012 with when to come back: `server restarting; reconnect with backoff; retry_after_ms=N`.
    /// The server draws N per connection, so its clients do not all come back at once.
    pub fn restarting(retry_after_ms: u64) -> Self {
        Close::new(CloseCode::ServiceRestart, format!("{RESTARTING}; retry_after_ms={retry_after_ms}"))
    }

    /// The retry hint a reason carries, if any.
    pub fn retry_after_ms(reason: &str) -> Option<u64> {
        let (_, rest) = reason.rsplit_once("retry_after_ms=")?;
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    }

    /// The reason cut to the 123 bytes a close frame can carry, on a character boundary.
    pub fn wire_reason(&self) -> String {
        cut_reason(&self.reason)
    }
}

/// Cuts a close reason to [`MAX_CLOSE_REASON_BYTES`] on a character boundary.
pub fn cut_reason(s: &str) -> String {
    let mut end = s.len().min(MAX_CLOSE_REASON_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod close_tests {
    use super::*;

    #[test]
    fn close_reasons_fit_a_frame() {
        assert_eq!(cut_reason("short"), "short");
        let long = "é".repeat(100);
        let cut = cut_reason(&long);
        assert!(cut.len() <= MAX_CLOSE_REASON_BYTES && long.starts_with(&cut));
        assert_eq!(cut.len(), 122, "cut on a character boundary, not mid-character");
    }

    #[test]
    fn the_retry_hint_is_written_and_read_one_way() {
        let c = Close::try_again_later("database unavailable", 2500);
        assert_eq!(c.code, CloseCode::TryAgainLater);
        assert_eq!(c.reason, "database unavailable; retry_after_ms=2500");
        assert_eq!(Close::retry_after_ms(&c.reason), Some(2500));
        assert_eq!(Close::retry_after_ms("no hint here"), None);
        let r = Close::restarting(u64::MAX);
        assert_eq!(r.code, CloseCode::ServiceRestart);
        assert_eq!(Close::retry_after_ms(&r.reason), Some(u64::MAX));
        assert!(r.reason.len() <= MAX_CLOSE_REASON_BYTES, "{}", r.reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn close_codes_are_unique_and_round_trip() {
        let mut seen = HashSet::new();
        for c in CloseCode::ALL {
            assert!(seen.insert(c.code()), "duplicate close code {}", c.code());
            assert_eq!(CloseCode::from_code(c.code()), Some(*c));
            assert!(!c.description().is_empty());
        }
        assert_eq!(CloseCode::from_code(1006), None, "1006 is never sent by a server");
    }

    #[test]
    fn error_codes_are_unique_snake_case() {
        let mut seen = HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()));
            assert!(c.as_str().chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'));
            assert_eq!(ErrorCode::parse(c.as_str()), Some(*c));
        }
    }

    #[test]
    fn seed_retry_policies() {
        use RetryPolicy::*;
        for (code, policy) in [
            (4400, Stop),
            (4401, ReauthOnce),
            (4403, Stop),
            (4404, Stop),
            (1008, Stop),
            (1011, Backoff),
            (1012, Backoff),
            (4408, Backoff),
            (1013, AfterHint),
        ] {
            assert_eq!(CloseCode::from_code(code).unwrap().retry(), policy, "code {code}");
        }
    }
}
