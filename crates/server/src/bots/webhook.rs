//! The webhook engine: POSTs the message to your URL, signed with HMAC-SHA256, and takes
//! either a JSON `{"reply"}` or a streamed NDJSON body of `{"delta"}` lines.
//!
//! Signature: `X-Natter-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>` with
//! `X-Natter-Timestamp: <unix seconds>`. Receivers should recompute it over the raw body and
//! reject timestamps more than 5 minutes from their clock, so a captured request cannot be
//! replayed later (docs/bots.md).

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use natter_proto::ErrorCode;
use serde_json::{json, Value};
use sha2::Sha256;

use super::bounds::MAX_LINE_BYTES;
use super::egress::{for_log, sanitize, Egress};
use super::openai::{answered, refused, root_cause, unreachable};
use super::spec::WebhookSpec;
use super::{BotEngine, DeltaSink, EngineError, ReplyRequest};

pub struct Webhook {
    pub spec: WebhookSpec,
    pub http: Egress,
}

fn failed(message: String) -> EngineError {
    EngineError { code: ErrorCode::BotError, message }
}

/// `sha256=<hex>` over `"<timestamp>.<body>"`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The body of a JSON answer, refused past `max` bytes (instead of held whole, however big).
async fn read_at_most(resp: reqwest::Response, max: usize) -> Result<String, EngineError> {
    let mut body = Vec::new();
    let mut bytes = resp.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        let chunk = chunk
            .map_err(|e| failed(format!("reading the webhook's answer failed: {}", sanitize(&root_cause(&e), 200))))?;
        if body.len() + chunk.len() > max {
            return Err(failed(format!(
                "the webhook's JSON answer is longer than {max} bytes; stream long replies as NDJSON"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| failed("the webhook's answer is not UTF-8".into()))
}

impl Webhook {
    async fn call(&self, req: &ReplyRequest, sink: &mut dyn DeltaSink) -> Result<String, EngineError> {
        let body = json!({
            "bot": {"id": req.bot_id, "name": req.bot_name},
            "conversation": {"id": req.message.conversation_id},
            "message": req.message,
            "history": req.history,
        })
        .to_string();
        let ts = chrono::Utc::now().timestamp();
        let secret = self.spec.secret.as_deref().unwrap_or_default();
        let bot_id = req.bot_id;
        let request = self.http.post(bot_id, &self.spec.url).await.map_err(|r| refused(bot_id, "webhook", &r))?;
        let resp = request
            .header("content-type", "application/json")
            .header("x-natter-timestamp", ts.to_string())
            .header("x-natter-signature", signature(secret, ts, body.as_bytes()))
            .body(body)
            .send()
            .await
            .map_err(|e| unreachable(bot_id, "webhook", &e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(answered(bot_id, "webhook", resp).await);
        }
        let ndjson = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("application/x-ndjson") || c.starts_with("application/jsonl"));
        if !ndjson {
            let text = read_at_most(resp, MAX_LINE_BYTES).await?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|_| failed("the webhook's answer is not JSON {\"reply\": \"…\"} nor NDJSON".into()))?;
            return v["reply"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| failed("the webhook's JSON answer has no string field \"reply\"".into()));
        }
        let mut bytes = resp.bytes_stream();
        let mut buf = Vec::new();
        let mut text = String::new();
        loop {
            match bytes.next().await {
                None => break,
                Some(Err(e)) => {
                    return Err(failed(format!(
                        "the webhook's stream broke mid-reply: {}",
                        sanitize(&root_cause(&e), 200)
                    )))
                }
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
            }
            if buf.len() > MAX_LINE_BYTES && !buf.contains(&b'\n') {
                return Err(failed(format!("the webhook sent a line longer than {MAX_LINE_BYTES} bytes")));
            }
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                self.line(bot_id, &line, &mut text, sink).await?;
            }
        }
        if !buf.is_empty() {
            let rest = std::mem::take(&mut buf);
            self.line(bot_id, &rest, &mut text, sink).await?;
        }
        Ok(text)
    }

    async fn line(
        &self,
        bot_id: uuid::Uuid,
        line: &[u8],
        text: &mut String,
        sink: &mut dyn DeltaSink,
    ) -> Result<(), EngineError> {
        let line = String::from_utf8_lossy(line);
        let line = line.trim();
        if line.is_empty() {
            return Ok(());
        }
        let v: Value = serde_json::from_str(line).map_err(|_| {
            tracing::warn!(%bot_id, line = %for_log(line), "malformed NDJSON line from the bot's webhook");
            failed("the webhook sent a malformed NDJSON line".into())
        })?;
        let piece = v["delta"]
            .as_str()
            .ok_or_else(|| failed("an NDJSON line from the webhook has no string field \"delta\"".into()))?;
        if !piece.is_empty() {
            text.push_str(piece);
            sink.delta(piece).await;
        }
        Ok(())
    }
}

#[async_trait]
impl BotEngine for Webhook {
    async fn reply(&self, req: &ReplyRequest, sink: &mut dyn DeltaSink) -> Result<String, EngineError> {
        let ms = self.spec.timeout_ms.unwrap_or(30_000);
        tokio::time::timeout(Duration::from_millis(ms), self.call(req, sink)).await.map_err(|_| EngineError {
            code: ErrorCode::BotTimeout,
            message: format!("the webhook took longer than {ms} ms"),
        })?
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Known answer, computed independently with Python's hmac module.
        let sig = super::signature("key", 1_700_000_000, b"{}");
        assert_eq!(sig, "sha256=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae");
        assert_ne!(sig, super::signature("key", 1_700_000_001, b"{}"), "the timestamp is signed");
        assert_ne!(sig, super::signature("other", 1_700_000_000, b"{}"));
    }
}
