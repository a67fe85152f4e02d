//! The OpenAI-compatible engine: any Chat Completions endpoint (OpenAI, Ollama, llama.cpp
//! server, vLLM, LM Studio), with `stream: true`, forwarding tokens as they arrive.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use natter_proto::{ErrorCode, MessageRole};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::egress::{for_log, refusal, sanitize, Egress, Refused};
use super::spec::OpenAiSpec;
use super::{BotEngine, DeltaSink, EngineError, ReplyRequest};

pub struct OpenAi {
    pub spec: OpenAiSpec,
    pub http: Egress,
}

fn failed(message: String) -> EngineError {
    EngineError { code: ErrorCode::BotError, message }
}

fn timed_out(message: String) -> EngineError {
    EngineError { code: ErrorCode::BotTimeout, message }
}

/// The provider's own words from an error body (`{"error": {"message"}}`), or the body.
pub(super) fn provider_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let msg = parsed
        .as_ref()
        .and_then(|v| v["error"]["message"].as_str().or(v["error"].as_str()).or(v["message"].as_str()))
        .map(str::to_owned)
        .unwrap_or_else(|| body.chars().take(200).collect());
    msg.trim().to_owned()
}

impl OpenAi {
    fn body(&self, req: &ReplyRequest) -> Value {
        let mut messages = Vec::new();
        if let Some(p) = &self.spec.system_prompt {
            messages.push(json!({"role": "system", "content": p}));
        }
        for m in req.history.iter().chain(std::iter::once(&req.message)) {
            let role = match m.role {
                MessageRole::User => "user",
                MessageRole::Bot => "assistant",
            };
            messages.push(json!({"role": role, "content": m.content}));
        }
        let mut body = json!({"model": self.spec.model, "messages": messages, "stream": true});
        if let Some(t) = self.spec.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(n) = self.spec.max_tokens {
            body["max_tokens"] = json!(n);
        }
        body
    }

    async fn stream(
        &self,
        req: &ReplyRequest,
        sink: &mut dyn DeltaSink,
        first_deadline: Instant,
    ) -> Result<String, EngineError> {
        let first_ms = self.spec.first_token_timeout_ms.unwrap_or(30_000);
        let no_token = || timed_out(format!("the provider sent no token within {first_ms} ms"));
        let url = format!("{}/chat/completions", self.spec.base_url.trim_end_matches('/'));
        let bot_id = req.bot_id;
        let mut request = self.http.post(bot_id, &url).await.map_err(|r| refused(bot_id, "provider", &r))?;
        request = request.json(&self.body(req));
        if let Some(key) = &self.spec.api_key {
            request = request.bearer_auth(key);
        }
        let resp = tokio::time::timeout_at(first_deadline, request.send())
            .await
            .map_err(|_| no_token())?
            .map_err(|e| unreachable(bot_id, "provider", &e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(answered(bot_id, "provider", resp).await);
        }
        let mut bytes = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut text = String::new();
        loop {
            let next = if text.is_empty() {
                tokio::time::timeout_at(first_deadline, bytes.next()).await.map_err(|_| no_token())?
            } else {
                bytes.next().await
            };
            let chunk = match next {
                None => return Err(failed("the provider closed the stream before [DONE]".into())),
                Some(Err(e)) => {
                    return Err(failed(format!(
                        "the connection to the provider broke mid-reply: {}",
                        sanitize(&root_cause(&e), 200)
                    )))
                }
                Some(Ok(c)) => c,
            };
            buf.extend_from_slice(&chunk);
            if buf.len() > super::bounds::MAX_LINE_BYTES && !buf.contains(&b'\n') {
                let max = super::bounds::MAX_LINE_BYTES;
                return Err(failed(format!("the provider sent a line longer than {max} bytes")));
            }
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\r', '\n']);
                let Some(data) = line.strip_prefix("data:") else { continue };
                let data = data.trim();
                if data == "[DONE]" {
                    return Ok(text);
                }
                let v: Value = serde_json::from_str(data).map_err(|_| {
                    tracing::warn!(%bot_id, chunk = %for_log(data), "malformed stream chunk from the bot's provider");
                    failed("the provider sent a malformed stream chunk".into())
                })?;
                if v.get("error").is_some() {
                    tracing::warn!(%bot_id, error = %for_log(&provider_message(data)), "the bot's provider reported an error mid-stream");
                    return Err(failed("the provider reported an error mid-stream".into()));
                }
                if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
                    if !piece.is_empty() {
                        text.push_str(piece);
                        sink.delta(piece).await;
                    }
                }
            }
        }
    }
}

/// The innermost error message (reqwest's top level says only "error sending request").
pub(super) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The egress policy refused the bot's address: the reason goes to the log, the chat hears
/// only that (the address may be internal, and is the owner's business).
pub(super) fn refused(bot_id: uuid::Uuid, what: &str, r: &Refused) -> EngineError {
    tracing::warn!(%bot_id, reason = %r, "a bot's request was refused by the egress policy");
    failed(format!("cannot reach the {what}: its address is refused by this server's egress policy"))
}

/// The request failed before an answer.
pub(super) fn unreachable(bot_id: uuid::Uuid, what: &str, e: &reqwest::Error) -> EngineError {
    if let Some(r) = refusal(e) {
        return refused(bot_id, what, r);
    }
    failed(format!("cannot reach the {what}: {}", sanitize(&root_cause(e), 200)))
}

/// The remote answered an error status: the chat hears the status only (the body is the
/// remote's words, possibly long, possibly crafted); the log gets the body, escaped and cut.
pub(super) async fn answered(bot_id: uuid::Uuid, what: &str, resp: reqwest::Response) -> EngineError {
    let status = resp.status();
    let body = read_capped(resp, 8 * 1024).await;
    tracing::warn!(%bot_id, %status, body = %for_log(&body), "the bot's {what} answered an error");
    let hint = match status.as_u16() {
        401 | 403 => " (check the bot's credentials)",
        300..=399 => " (redirects are not followed)",
        _ => "",
    };
    failed(format!("the {what} answered {status}{hint}"))
}

/// At most about `max` bytes of a body, as text.
async fn read_capped(mut resp: reqwest::Response, max: usize) -> String {
    let mut buf = Vec::new();
    while buf.len() < max {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[async_trait]
impl BotEngine for OpenAi {
    async fn reply(&self, req: &ReplyRequest, sink: &mut dyn DeltaSink) -> Result<String, EngineError> {
        let start = Instant::now();
        let first = start + Duration::from_millis(self.spec.first_token_timeout_ms.unwrap_or(30_000));
        let total_ms = self.spec.timeout_ms.unwrap_or(120_000);
        tokio::time::timeout(Duration::from_millis(total_ms), self.stream(req, sink, first))
            .await
            .map_err(|_| timed_out(format!("the reply took longer than {total_ms} ms")))?
    }
}
