//! Step `ledger`: the server's record of this user's last connection attempts (`GET
//! /api/connections`), with this run's attempt marked, which shows how the socket ended and
//! what a proxy changed in the upgrade.

use serde_json::Value;
use uuid::Uuid;

use super::account::Identity;
use super::http::{Api, Server};
use super::report::Step;
use super::socket::{self, Socket};
use super::Registry;

pub(super) async fn step(
    api: &Api,
    server: &Server,
    user: &Identity,
    bot: Option<Uuid>,
    socket: Socket,
    attempt_id: Uuid,
) -> Step {
    // Close the socket first, so the ledger shows how this run's attempt ended.
    socket::close(socket).await;
    let Identity::User { token, .. } = user else {
        return Step::skipped("ledger", "needs a valid token");
    };
    let mut path = "/connections?limit=5".to_owned();
    if let Some(b) = bot {
        path.push_str(&format!("&bot_id={b}"));
    }
    let res = match api.get(&path, Some(token), None).await {
        Ok(r) => r,
        Err(e) => {
            return Step::warn(
                "ledger",
                format!("GET /api/connections: {e}"),
                "the ledger request failed",
                "check the server",
            )
        }
    };
    if res.status == 404 {
        return Step::skipped(
            "ledger",
            format!(
                "server has no connection ledger (natter < the release with GET /api/connections; this one is {})",
                server.version
            ),
        );
    }
    if res.status != 200 {
        return Step::warn(
            "ledger",
            format!(
                "GET /api/connections answered {} {}",
                res.status,
                res.error_code().unwrap_or_else(|| res.describe())
            ),
            "the server's connection ledger did not answer",
            "check the server's log",
        );
    }
    let rows = res.json::<Value>().map(|v| ledger_rows(&v)).unwrap_or_default();
    if rows.is_empty() {
        return Step::ok("ledger", "the server recorded no connection attempts of this user (for this bot)");
    }
    let ours = attempt_id.to_string();
    let mine = rows.iter().any(|r| r.get("attempt_id").and_then(|a| a.as_str()) == Some(ours.as_str()));
    let what = if rows.len() == 1 { "attempt".to_owned() } else { format!("{} attempts", rows.len()) };
    let mine = if mine { " (this run's is marked)" } else { " (this run's is not among them)" };
    let mut detail = format!("the server's record of this user's last {what}{mine}:");
    for r in &rows {
        detail.push('\n');
        detail.push_str(&ledger_line(r, &server.registry, &ours));
    }
    Step::ok("ledger", detail)
}

/// The rows of a ledger answer: a bare array, or the first array field of an object.
pub(super) fn ledger_rows(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Object(o) => ["connections", "attempts", "items", "rows"]
            .iter()
            .find_map(|k| o.get(*k).and_then(|x| x.as_array()).cloned())
            .or_else(|| o.values().find_map(|x| x.as_array()).cloned())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// One ledger row for people: `2026-01-02 03:04:05 established, closed 4408 heartbeat_timeout by server: …`.
pub(super) fn ledger_line(r: &Value, registry: &Registry, our_attempt: &str) -> String {
    let s = |k: &str| r.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
    let started = s("started_at").replace('T', " ");
    let started = started.split('.').next().unwrap_or("").trim_end_matches('Z').to_owned();
    let established = match r.get("established").and_then(|x| x.as_bool()) {
        Some(true) => "established",
        Some(false) => "not established",
        None => "",
    };
    let by = s("closed_by");
    let by = if by.is_empty() { String::new() } else { format!(" by {by}") };
    let end = match r.get("close_code").and_then(|c| c.as_u64()) {
        Some(code) => {
            let reason = s("close_reason");
            let reason = if reason.is_empty() { String::new() } else { format!(": {reason}") };
            format!(", closed {}{by}{reason}", registry.close_name(code as u16))
        }
        None if r.get("ended_at").map(|e| e.is_null()).unwrap_or(true) => ", still open".to_owned(),
        None => format!(", ended without a close frame{by}"),
    };
    let mine = s("attempt_id") == our_attempt;
    let mut line =
        format!("  {started} {established}{end}{}", if mine { " ← this run" } else { "" }).trim_end().to_owned();
    if mine {
        // What the server received, which shows what a proxy changed.
        let seen: Vec<String> = [
            ("Upgrade", "upgrade"),
            ("Connection", "connection"),
            ("X-Forwarded-For", "forwarded_for"),
            ("from", "remote_addr"),
        ]
        .iter()
        .filter_map(|(label, key)| r.get(*key).and_then(|v| v.as_str()).map(|v| format!("{label} {v}")))
        .collect();
        if !seen.is_empty() {
            line.push_str(&format!("\n    the server saw: {}", seen.join(", ")));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ledger_rows_render_close_codes_with_names() {
        let reg = Registry::builtin();
        let v = json!({"connections": [
            {"attempt_id": "a1", "started_at": "2026-01-02T03:04:05.123Z", "established": false, "ended_at": "2026-01-02T03:04:05Z",
             "close_code": 4401, "close_reason": "token expired: refresh it and reconnect", "closed_by": "server"},
            {"attempt_id": "a2", "started_at": "2026-01-02T03:05:00Z", "established": true, "ended_at": null, "close_code": null}
        ]});
        let rows = ledger_rows(&v);
        assert_eq!(rows.len(), 2);
        let line = ledger_line(&rows[0], &reg, "a1");
        assert_eq!(line, "  2026-01-02 03:04:05 not established, closed 4401 unauthorized by server: token expired: refresh it and reconnect ← this run");
        assert_eq!(ledger_line(&rows[1], &reg, "a1"), "  2026-01-02 03:05:00 established, still open");
        let cut = json!({"attempt_id": "a3", "started_at": "2026-01-02T03:06:00Z", "established": true, "ended_at": "2026-01-02T03:07:00Z",
                         "close_code": null, "closed_by": "network", "upgrade": "websocket", "connection": "upgrade", "remote_addr": "10.0.0.2:5000"});
        assert_eq!(
            ledger_line(&cut, &reg, "a3"),
            "  2026-01-02 03:06:00 established, ended without a close frame by network ← this run\n    the server saw: Upgrade websocket, Connection upgrade, from 10.0.0.2:5000"
        );
        assert_eq!(ledger_rows(&json!([{"a": 1}])).len(), 1);
        assert!(ledger_rows(&json!("x")).is_empty());
    }
}
