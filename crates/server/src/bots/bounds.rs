//! Size bounds on every engine setting, checked when a bot is saved. Without them one user
//! could store a 900 000-character fallback (sent back as every reply), a megabyte of
//! system prompt, or 30 000 keywords (docs/bots.md lists these bounds).

use serde_json::Value;

use super::rules::CompiledRules;
use super::spec::{bad, EngineSpec, Rule};
use crate::domain::Invalid;

/// The whole `engine` object, as JSON.
pub const ENGINE_MAX_BYTES: usize = 128 * 1024;
/// Rules per bot.
pub const MAX_RULES: usize = 100;
/// Keywords per rule, and characters per keyword.
pub const MAX_KEYWORDS: usize = 50;
pub const MAX_KEYWORD_CHARS: usize = 100;
/// Characters of a regex, before compiling.
pub const MAX_REGEX_CHARS: usize = 1_000;
/// What a bot's regexes may take compiled, together (each gets an equal share) and each.
pub const REGEX_BUDGET_BYTES: usize = 1024 * 1024;
pub const REGEX_MAX_BYTES: usize = 1024 * 1024;
/// Characters of a rule's reply and of the fallback.
pub const MAX_REPLY_CHARS: usize = 4_096;
/// Characters of `system_prompt`.
pub const MAX_SYSTEM_PROMPT_CHARS: usize = 32_768;
/// Characters of `base_url` / `url`.
pub const MAX_URL_CHARS: usize = 2_048;
/// Characters of `model`.
pub const MAX_MODEL_CHARS: usize = 200;
/// Characters of `api_key` and of a webhook `secret`.
pub const MAX_SECRET_CHARS: usize = 4_096;
/// What a provider or webhook may send without a newline (one SSE or NDJSON line), and the
/// size of a webhook's JSON answer: a remote server cannot make natter hold more of it.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

fn at_most(field: &str, s: &str, max: usize) -> Result<(), Invalid> {
    // Bytes first: a cheap upper bound on characters.
    if s.len() > max && s.chars().count() > max {
        return Err(bad(format!("{field}: at most {max} characters (got {})", s.chars().count())));
    }
    Ok(())
}

fn opt(field: &str, s: &Option<String>, max: usize) -> Result<(), Invalid> {
    s.as_deref().map_or(Ok(()), |s| at_most(field, s, max))
}

/// The size of the `engine` object as a whole, whatever its fields.
fn check_size(v: &Value) -> Result<(), Invalid> {
    let len = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
    if len > ENGINE_MAX_BYTES {
        return Err(bad(format!("engine: at most {ENGINE_MAX_BYTES} bytes as JSON (got {len})")));
    }
    Ok(())
}

/// Checks every field's bound, then the object's size, then compiles a rule set's regexes
/// within their size limit. Errors name the field and the bound.
pub fn check(spec: &EngineSpec, raw: &Value) -> Result<(), Invalid> {
    fields(spec)?;
    check_size(raw)?;
    if let EngineSpec::Rules(r) = spec {
        let (_, errors) = CompiledRules::compile(r);
        if let Some((_, e)) = errors.into_iter().next() {
            return Err(bad(e));
        }
    }
    Ok(())
}

fn fields(spec: &EngineSpec) -> Result<(), Invalid> {
    match spec {
        EngineSpec::Echo(_) => Ok(()),
        EngineSpec::Rules(r) => {
            if r.rules.len() > MAX_RULES {
                return Err(bad(format!("engine.rules: at most {MAX_RULES} rules (got {})", r.rules.len())));
            }
            for (i, rule) in r.rules.iter().enumerate() {
                match rule {
                    Rule::Keywords { keywords, reply } => {
                        if keywords.len() > MAX_KEYWORDS {
                            return Err(bad(format!(
                                "engine.rules[{i}].keywords: at most {MAX_KEYWORDS} keywords per rule (got {})",
                                keywords.len()
                            )));
                        }
                        for (j, k) in keywords.iter().enumerate() {
                            at_most(&format!("engine.rules[{i}].keywords[{j}]"), k, MAX_KEYWORD_CHARS)?;
                        }
                        at_most(&format!("engine.rules[{i}].reply"), reply, MAX_REPLY_CHARS)?;
                    }
                    Rule::Regex { regex, reply } => {
                        at_most(&format!("engine.rules[{i}].regex"), regex, MAX_REGEX_CHARS)?;
                        at_most(&format!("engine.rules[{i}].reply"), reply, MAX_REPLY_CHARS)?;
                    }
                }
            }
            opt("engine.fallback", &r.fallback, MAX_REPLY_CHARS)
        }
        EngineSpec::Openai(o) => {
            at_most("engine.base_url", &o.base_url, MAX_URL_CHARS)?;
            at_most("engine.model", &o.model, MAX_MODEL_CHARS)?;
            opt("engine.api_key", &o.api_key, MAX_SECRET_CHARS)?;
            opt("engine.system_prompt", &o.system_prompt, MAX_SYSTEM_PROMPT_CHARS)
        }
        EngineSpec::Webhook(w) => {
            at_most("engine.url", &w.url, MAX_URL_CHARS)?;
            opt("engine.secret", &w.secret, MAX_SECRET_CHARS)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn err(v: Value) -> String {
        EngineSpec::parse(&v).unwrap_err().message
    }

    #[test]
    fn every_field_has_a_bound_named_in_the_error() {
        let long = |n: usize| "x".repeat(n);
        let e = err(json!({"kind": "rules", "rules": [], "fallback": long(MAX_REPLY_CHARS + 1)}));
        assert_eq!(e, format!("engine.fallback: at most 4096 characters (got {})", MAX_REPLY_CHARS + 1));
        let rules: Vec<Value> = (0..=MAX_RULES).map(|i| json!({"keywords": [format!("k{i}")], "reply": "r"})).collect();
        assert!(err(json!({"kind": "rules", "rules": rules})).starts_with("engine.rules: at most 100 rules"));
        let kws: Vec<String> = (0..=MAX_KEYWORDS).map(|i| format!("k{i}")).collect();
        let e = err(json!({"kind": "rules", "rules": [{"keywords": kws, "reply": "r"}]}));
        assert!(e.starts_with("engine.rules[0].keywords: at most 50 keywords"), "{e}");
        let e = err(json!({"kind": "rules", "rules": [{"keywords": ["a", long(101)], "reply": "r"}]}));
        assert!(e.starts_with("engine.rules[0].keywords[1]: at most 100 characters"), "{e}");
        let e = err(json!({"kind": "rules", "rules": [{"regex": long(1001), "reply": "r"}]}));
        assert!(e.starts_with("engine.rules[0].regex: at most 1000 characters"), "{e}");
        let e = err(json!({"kind": "rules", "rules": [{"regex": "a", "reply": long(4097)}]}));
        assert!(e.starts_with("engine.rules[0].reply: at most 4096 characters"), "{e}");
        let e = err(json!({"kind": "rules", "rules": [{"regex": "\\w{200}", "reply": "r"}]}));
        assert!(e.starts_with("engine.rules[0].regex: compiles to more than 1048576 bytes"), "{e}");
        let base = json!({"kind": "openai", "base_url": "http://x/v1", "model": "m"});
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            err(b)
        };
        assert!(with("system_prompt", json!(long(32_769))).starts_with("engine.system_prompt: at most 32768"));
        assert!(with("model", json!(long(201))).starts_with("engine.model: at most 200"));
        assert!(with("api_key", json!(long(4097))).starts_with("engine.api_key: at most 4096"));
        let url = format!("http://x/{}", long(2048));
        assert!(with("base_url", json!(url)).starts_with("engine.base_url: at most 2048"));
        let hook = json!({"kind": "webhook", "url": url, "secret": "0123456789abcdef"});
        assert!(err(hook).starts_with("engine.url: at most 2048"));
        let hook = json!({"kind": "webhook", "url": "http://x/h", "secret": long(4097)});
        assert!(err(hook).starts_with("engine.secret: at most 4096"));
        // The object as a whole, whatever its fields.
        let rules: Vec<Value> = (0..40).map(|_| json!({"regex": "a", "reply": long(4000)})).collect();
        assert!(err(json!({"kind": "rules", "rules": rules})).starts_with("engine: at most 131072 bytes"));
        // Within every bound: accepted.
        let rules: Vec<Value> =
            (0..MAX_RULES).map(|i| json!({"keywords": [format!("k{i}"), "price"], "reply": "r"})).collect();
        assert!(EngineSpec::parse(&json!({"kind": "rules", "rules": rules, "fallback": long(4096)})).is_ok());
    }
}
