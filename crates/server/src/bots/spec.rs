//! Engine settings: what a bot's `engine` object may hold, validated when the bot is saved.

use natter_proto::ErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::Invalid;

pub const ENGINE_KINDS: &[&str] = &["echo", "rules", "openai", "webhook"];
/// Settings never shown by the API and kept across updates that leave them out.
const SECRET_FIELDS: &[&str] = &["api_key", "secret"];
/// Where an engine sends its secret: changing one drops the kept secret.
const URL_FIELDS: &[&str] = &["base_url", "url"];

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EchoSpec {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesSpec {
    /// Tried in order; the first match answers.
    pub rules: Vec<Rule>,
    /// The answer when no rule matches.
    #[serde(default)]
    pub fallback: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Rule {
    /// Matches when any keyword appears in the message (case-insensitive).
    Keywords { keywords: Vec<String>, reply: String },
    /// Matches when the regex matches the message.
    Regex { regex: String, reply: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiSpec {
    /// e.g. `https://api.openai.com/v1` or `http://localhost:11434/v1` (Ollama).
    pub base_url: String,
    pub model: String,
    /// Write-only: never returned by the API, never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// How many earlier messages of the conversation to send along (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_messages: Option<u32>,
    /// Give up when no token arrived within this time (default 30 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token_timeout_ms: Option<u64>,
    /// Give up when the whole reply takes longer (default 120 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    pub url: String,
    /// HMAC-SHA256 key for the signature header. Write-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// How many earlier messages to send along (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_messages: Option<u32>,
    /// Give up when the whole reply takes longer (default 30 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// A validated engine configuration, as stored in a bot's `engine` field.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EngineSpec {
    Echo(EchoSpec),
    Rules(RulesSpec),
    Openai(OpenAiSpec),
    Webhook(WebhookSpec),
}

pub(super) fn bad(message: String) -> Invalid {
    Invalid { code: ErrorCode::InvalidBot, message }
}

fn http_url(field: &str, url: &str) -> Result<(), Invalid> {
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(format!("{field}: {url:?} is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(bad(format!("{field}: {url:?} must be an http:// or https:// URL")));
    }
    Ok(())
}

fn positive(field: &str, v: Option<u64>, max: u64) -> Result<(), Invalid> {
    match v {
        Some(n) if n == 0 || n > max => Err(bad(format!("{field}: must be between 1 and {max}"))),
        _ => Ok(()),
    }
}

impl EngineSpec {
    /// Validates a bot's `engine` object. Errors name the field.
    pub fn parse(v: &Value) -> Result<EngineSpec, Invalid> {
        let obj = v.as_object().ok_or_else(|| bad("engine must be an object like {\"kind\": \"echo\"}".into()))?;
        let kind = match obj.get("kind") {
            Some(Value::String(k)) => k.as_str(),
            Some(_) => return Err(bad("engine.kind must be a string".into())),
            None => return Err(bad("engine.kind is missing".into())),
        };
        if !ENGINE_KINDS.contains(&kind) {
            return Err(bad(format!(
                "engine.kind: unknown engine kind {kind:?}; expected one of {}",
                ENGINE_KINDS.join(", ")
            )));
        }
        let spec: EngineSpec = serde_json::from_value(v.clone()).map_err(|e| bad(format!("engine ({kind}): {e}")))?;
        spec.validate()?;
        super::bounds::check(&spec, v)?;
        Ok(spec)
    }

    /// Reads settings as stored: they were validated when the bot was saved, so this neither
    /// checks bounds nor compiles regexes again (it runs on every connect and bot edit).
    pub fn load(stored: &Value) -> Result<EngineSpec, Invalid> {
        serde_json::from_value(stored.clone()).map_err(|e| bad(format!("stored engine settings: {e}")))
    }

    fn validate(&self) -> Result<(), Invalid> {
        match self {
            EngineSpec::Echo(_) => Ok(()),
            EngineSpec::Rules(r) => {
                if r.rules.is_empty() && r.fallback.is_none() {
                    return Err(bad("engine.rules: give at least one rule or a fallback".into()));
                }
                for (i, rule) in r.rules.iter().enumerate() {
                    match rule {
                        Rule::Keywords { keywords, reply } => {
                            if keywords.is_empty() || keywords.iter().any(|k| k.trim().is_empty()) {
                                return Err(bad(format!(
                                    "engine.rules[{i}].keywords: give one or more non-empty keywords"
                                )));
                            }
                            if reply.is_empty() {
                                return Err(bad(format!("engine.rules[{i}].reply: must not be empty")));
                            }
                        }
                        // The regex is compiled, within its size limit, by bounds::check.
                        Rule::Regex { regex: _, reply } => {
                            if reply.is_empty() {
                                return Err(bad(format!("engine.rules[{i}].reply: must not be empty")));
                            }
                        }
                    }
                }
                Ok(())
            }
            EngineSpec::Openai(o) => {
                http_url("engine.base_url", &o.base_url)?;
                if o.model.trim().is_empty() {
                    return Err(bad("engine.model: must not be empty".into()));
                }
                if let Some(t) = o.temperature {
                    if !(0.0..=2.0).contains(&t) {
                        return Err(bad("engine.temperature: must be between 0 and 2".into()));
                    }
                }
                positive("engine.max_tokens", o.max_tokens.map(u64::from), 1_000_000)?;
                if o.context_messages.is_some_and(|n| n > 200) {
                    return Err(bad("engine.context_messages: at most 200".into()));
                }
                positive("engine.first_token_timeout_ms", o.first_token_timeout_ms, 600_000)?;
                positive("engine.timeout_ms", o.timeout_ms, 3_600_000)
            }
            EngineSpec::Webhook(w) => {
                http_url("engine.url", &w.url)?;
                match &w.secret {
                    Some(s) if s.len() >= 16 => {}
                    _ => return Err(bad("engine.secret: give a signing secret of at least 16 characters".into())),
                }
                if w.context_messages.is_some_and(|n| n > 200) {
                    return Err(bad("engine.context_messages: at most 200".into()));
                }
                positive("engine.timeout_ms", w.timeout_ms, 600_000)
            }
        }
    }

    /// The settings as stored.
    pub fn to_stored(&self) -> Value {
        serde_json::to_value(self).expect("engine settings serialize")
    }

    /// The settings as the API shows them: secrets replaced by `<name>_set: true`.
    pub fn public_view(stored: &Value) -> Value {
        let mut v = stored.clone();
        if let Some(obj) = v.as_object_mut() {
            for secret in SECRET_FIELDS {
                if obj.remove(*secret).is_some() {
                    obj.insert(format!("{secret}_set"), Value::Bool(true));
                }
            }
        }
        v
    }

    /// The settings as someone who may only chat sees them: the kind, nothing else (URLs may
    /// carry credentials, a system prompt may be private).
    pub fn kind_only(stored: &Value) -> Value {
        let mut v = serde_json::Map::new();
        if let Some(kind) = stored.get("kind") {
            v.insert("kind".into(), kind.clone());
        }
        Value::Object(v)
    }

    /// An update that leaves a secret out keeps the stored one (secrets are write-only, so a
    /// client editing other settings cannot send them back) — unless it changes the engine's
    /// kind or the URL the secret is sent to: a secret is only ever sent where its owner sent
    /// it, so a bot admin cannot point the bot at their own server and receive the owner's key.
    pub fn keep_secrets(new: &mut Value, old: &Value) {
        let (Some(new_obj), Some(old_obj)) = (new.as_object_mut(), old.as_object()) else { return };
        if new_obj.get("kind") != old_obj.get("kind") {
            return;
        }
        if URL_FIELDS.iter().any(|f| new_obj.get(*f) != old_obj.get(*f)) {
            return;
        }
        for secret in SECRET_FIELDS {
            if !new_obj.contains_key(*secret) {
                if let Some(v) = old_obj.get(*secret) {
                    new_obj.insert(secret.to_string(), v.clone());
                }
            }
        }
    }

    /// How many earlier messages the engine wants with each request.
    pub fn context_messages(&self) -> u32 {
        match self {
            EngineSpec::Echo(_) | EngineSpec::Rules(_) => 0,
            EngineSpec::Openai(o) => o.context_messages.unwrap_or(10),
            EngineSpec::Webhook(w) => w.context_messages.unwrap_or(10),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        EngineSpec::parse(&v).unwrap_err().message
    }

    #[test]
    fn kinds_and_their_fields() {
        assert!(matches!(EngineSpec::parse(&json!({"kind": "echo"})).unwrap(), EngineSpec::Echo(_)));
        assert!(err(json!({"kind": "telepathy"})).starts_with("engine.kind: unknown engine kind \"telepathy\""));
        assert!(err(json!({})).contains("engine.kind"));
        assert!(err(json!("echo")).contains("object"));
        assert!(err(json!({"kind": "echo", "x": 1})).contains("unknown field `x`"));
        let rules = json!({"kind": "rules", "rules": [{"keywords": ["price"], "reply": "10 EUR"}, {"regex": "^hi\\b", "reply": "hello"}], "fallback": "?"});
        assert!(matches!(EngineSpec::parse(&rules).unwrap(), EngineSpec::Rules(_)));
        let e =
            err(json!({"kind": "rules", "rules": [{"keywords": ["a"], "reply": "b"}, {"regex": "(", "reply": "x"}]}));
        assert!(e.starts_with("engine.rules[1].regex: invalid regex"), "{e}");
        assert!(err(json!({"kind": "rules", "rules": []})).contains("at least one rule"));
        assert!(err(json!({"kind": "openai", "base_url": "http://x"})).contains("model"));
        assert!(err(json!({"kind": "openai", "base_url": "ftp://x", "model": "m"})).starts_with("engine.base_url"));
        assert!(err(json!({"kind": "openai", "base_url": "http://x", "model": "m", "temperature": 3}))
            .starts_with("engine.temperature"));
        let ok =
            json!({"kind": "openai", "base_url": "http://localhost:11434/v1", "model": "llama3", "api_key": "sk-1"});
        assert!(matches!(EngineSpec::parse(&ok).unwrap(), EngineSpec::Openai(_)));
        assert!(err(json!({"kind": "webhook", "url": "http://x/hook"})).starts_with("engine.secret"));
        assert!(err(json!({"kind": "webhook", "url": "nope", "secret": "0123456789abcdef"})).starts_with("engine.url"));
    }

    #[test]
    fn secrets_are_hidden_and_kept() {
        let stored = json!({"kind": "openai", "base_url": "http://x", "model": "m", "api_key": "sk-123"});
        assert_eq!(
            EngineSpec::public_view(&stored),
            json!({"kind": "openai", "base_url": "http://x", "model": "m", "api_key_set": true})
        );
        let mut update = json!({"kind": "openai", "base_url": "http://x", "model": "m2"});
        EngineSpec::keep_secrets(&mut update, &stored);
        assert_eq!(update["api_key"], "sk-123");
        let mut other_kind = json!({"kind": "echo"});
        EngineSpec::keep_secrets(&mut other_kind, &stored);
        assert!(other_kind.get("api_key").is_none());
        let mut other_url = json!({"kind": "openai", "base_url": "http://attacker.example/v1", "model": "m"});
        EngineSpec::keep_secrets(&mut other_url, &stored);
        assert!(other_url.get("api_key").is_none(), "a new URL drops the kept key");
        let hook = json!({"kind": "webhook", "url": "http://x/h", "secret": "0123456789abcdef"});
        let mut other_hook = json!({"kind": "webhook", "url": "http://y/h"});
        EngineSpec::keep_secrets(&mut other_hook, &hook);
        assert!(other_hook.get("secret").is_none(), "a new URL drops the kept secret");
        let mut given = json!({"kind": "openai", "base_url": "http://y", "model": "m", "api_key": "sk-new"});
        EngineSpec::keep_secrets(&mut given, &stored);
        assert_eq!(given["api_key"], "sk-new");
        assert_eq!(EngineSpec::kind_only(&stored), json!({"kind": "openai"}));
    }
}
