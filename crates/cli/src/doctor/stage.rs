//! The steps the doctor runs, in order: their names in the report and the layers they check.

/// Every step, in the order the doctor runs them (the discriminant is the position).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Url,
    Dns,
    Tcp,
    Tls,
    Health,
    Cors,
    Token,
    Bot,
    Handshake,
    Established,
    Ping,
    Watch,
    Send,
    SseStream,
    SsePing,
    Ledger,
}

impl Stage {
    pub const ALL: [Stage; 16] = [
        Stage::Url,
        Stage::Dns,
        Stage::Tcp,
        Stage::Tls,
        Stage::Health,
        Stage::Cors,
        Stage::Token,
        Stage::Bot,
        Stage::Handshake,
        Stage::Established,
        Stage::Ping,
        Stage::Watch,
        Stage::Send,
        Stage::SseStream,
        Stage::SsePing,
        Stage::Ledger,
    ];

    /// The step's name in the report. Names are part of the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Url => "url",
            Stage::Dns => "dns",
            Stage::Tcp => "tcp",
            Stage::Tls => "tls",
            Stage::Health => "health",
            Stage::Cors => "cors",
            Stage::Token => "token",
            Stage::Bot => "bot",
            Stage::Handshake => "handshake",
            Stage::Established => "established",
            Stage::Ping => "ping",
            Stage::Watch => "watch",
            Stage::Send => "send",
            Stage::SseStream => "sse_stream",
            Stage::SsePing => "sse_ping",
            Stage::Ledger => "ledger",
        }
    }

    /// What a person would call this layer, for the summary.
    fn layer(self) -> &'static str {
        match self {
            Stage::Url => "the URL",
            Stage::Dns => "name resolution (DNS)",
            Stage::Tcp => "the network (TCP connect)",
            Stage::Tls => "TLS",
            Stage::Health => "the HTTP API",
            Stage::Cors => "CORS / Origin",
            Stage::Token => "the credentials",
            Stage::Bot => "the bot or its permissions",
            Stage::Handshake => "the WebSocket upgrade (a proxy in between)",
            Stage::Established => "the chat socket's admission",
            Stage::Ping => "the open socket (ping)",
            Stage::Watch => "the idle connection (an idle timeout in between)",
            Stage::Send => "the message round trip",
            Stage::SseStream => "the HTTP streaming transport (SSE): the event stream",
            Stage::SsePing => "the HTTP streaming transport (SSE): frames by POST",
            Stage::Ledger => "the server's connection ledger",
        }
    }

    /// The steps that check the WebSocket itself: when only these fail and the SSE steps pass,
    /// the WebSocket is blocked on the way but chat works over HTTP streaming.
    pub const WEBSOCKET: [Stage; 3] = [Stage::Handshake, Stage::Established, Stage::Ping];

    /// The steps that check the HTTP streaming transport (SSE), the clients' fallback.
    pub const SSE: [Stage; 2] = [Stage::SseStream, Stage::SsePing];

    /// What a person would call the layer of the step with this name, for the summary.
    pub fn layer_of(step: &str) -> &'static str {
        Stage::ALL.iter().find(|s| s.name() == step).map_or("an unknown layer", |s| s.layer())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_listed_in_their_order_with_distinct_names() {
        for (i, stage) in Stage::ALL.iter().enumerate() {
            assert_eq!(*stage as usize, i, "{stage:?}");
            assert_ne!(Stage::layer_of(stage.name()), "an unknown layer", "{stage:?}");
        }
        let mut names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Stage::ALL.len());
        assert_eq!(Stage::layer_of("nonsense"), "an unknown layer");
    }
}
