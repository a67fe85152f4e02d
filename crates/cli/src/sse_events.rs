//! The SSE binding's events as a client reads them (docs/protocol.md, "The SSE binding"), for
//! `natter doctor` and `natter bench`.

use serde::Deserialize;

/// One event of the stream: its `event:` name and its `data:`.
pub struct Event {
    pub name: String,
    pub data: Vec<u8>,
}

/// Takes the first whole event out of `buf`, dropping the comments (keep-alives) before it;
/// `None` until one has arrived whole.
pub fn take(buf: &mut Vec<u8>) -> Option<Event> {
    while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
        let block: Vec<u8> = buf.drain(..end + 2).collect();
        if block.first() == Some(&b':') {
            continue;
        }
        let (mut name, mut data) = (String::from("message"), Vec::new());
        for line in block.split(|&b| b == b'\n') {
            let field = |prefix: &[u8]| line.strip_prefix(prefix).map(|v| v.strip_prefix(b" ").unwrap_or(v));
            if let Some(v) = field(b"event:") {
                name = String::from_utf8_lossy(v).into_owned();
            } else if let Some(v) = field(b"data:") {
                data.extend_from_slice(v);
            }
        }
        return Some(Event { name, data });
    }
    None
}

/// The `stream` event's data: where the stream's frames go.
#[derive(Deserialize)]
pub struct StreamEvent {
    pub post: String,
}

/// The `close` event's data.
#[derive(Deserialize)]
pub struct CloseEvent {
    pub code: u16,
    #[serde(default)]
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_whole_without_the_keep_alives() {
        let mut buf = b": keep-alive\n\nevent: ack\nid: 7\ndata: {\"a\":1}\n\nevent: pong\ndata:{}".to_vec();
        let e = take(&mut buf).unwrap();
        assert_eq!((e.name.as_str(), e.data.as_slice()), ("ack", br#"{"a":1}"#.as_slice()));
        assert!(take(&mut buf).is_none(), "the pong has not arrived whole");
        buf.extend_from_slice(b"\n\n");
        let e = take(&mut buf).unwrap();
        assert_eq!((e.name.as_str(), e.data.as_slice()), ("pong", b"{}".as_slice()));
        assert!(buf.is_empty());
    }
}
