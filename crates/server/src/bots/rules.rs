//! The rules engine: keyword and regex rules tried in order, then a fallback. Works fully
//! offline — a useful FAQ bot with no model at all.
//!
//! A rule set is compiled once per bot and settings version ([`RulesCache`]), not per message:
//! compiling `\w{200}` takes ~50 ms, and 42 of them re-compiled for each message stalled the
//! server for 2 s per reply. Compiling and matching run on the blocking pool, never on the async
//! workers. Compiled regexes are bounded ([`regex_size_limit`]), so a rule set costs at most
//! about 1 MiB of memory and a few milliseconds per message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aho_corasick::AhoCorasick;
use async_trait::async_trait;
use natter_proto::ErrorCode;
use regex::{Regex, RegexBuilder};
use uuid::Uuid;

use super::bounds::{REGEX_BUDGET_BYTES, REGEX_MAX_BYTES};
use super::spec::{Rule, RulesSpec};
use super::{BotEngine, DeltaSink, EngineError, ReplyRequest};

const DEFAULT_FALLBACK: &str = "Sorry, I don't have an answer for that.";
/// Compiled rule sets kept in memory (each at most ~1 MiB of regexes): the bots chatted with
/// most recently. A bot whose set was dropped compiles it again on its next message.
const CACHE_BOTS: usize = 64;

enum Matcher {
    /// The rule's keywords, lower-cased, searched for in the lower-cased message at once.
    Keywords(AhoCorasick),
    Regex(Regex),
}

/// A rule set ready to answer: regexes compiled, keywords in one automaton per rule.
pub struct CompiledRules {
    rules: Vec<(Matcher, String)>,
    fallback: String,
}

/// The compiled size each regex of a rule set may take: the set's regexes share
/// [`REGEX_BUDGET_BYTES`], and none takes more than [`REGEX_MAX_BYTES`].
pub fn regex_size_limit(spec: &RulesSpec) -> usize {
    let n = spec.rules.iter().filter(|r| matches!(r, Rule::Regex { .. })).count().max(1);
    (REGEX_BUDGET_BYTES / n).min(REGEX_MAX_BYTES)
}

impl CompiledRules {
    /// Compiles a rule set. A rule that does not compile (or exceeds the size limit) is left
    /// out and reported as `(index, reason)`: saving a bot refuses it, and a rule set stored
    /// before a limit was tightened still answers with the rules that fit.
    pub fn compile(spec: &RulesSpec) -> (CompiledRules, Vec<(usize, String)>) {
        let limit = regex_size_limit(spec);
        let mut errors = Vec::new();
        let mut rules = Vec::with_capacity(spec.rules.len());
        for (i, rule) in spec.rules.iter().enumerate() {
            let matcher = match rule {
                Rule::Keywords { keywords, .. } => AhoCorasick::new(keywords.iter().map(|k| k.to_lowercase()))
                    .map(Matcher::Keywords)
                    .map_err(|e| format!("engine.rules[{i}].keywords: {e}")),
                Rule::Regex { regex, .. } => RegexBuilder::new(regex)
                    .size_limit(limit)
                    .dfa_size_limit(limit)
                    .build()
                    .map(Matcher::Regex)
                    .map_err(|e| match e {
                        regex::Error::CompiledTooBig(_) => format!(
                            "engine.rules[{i}].regex: compiles to more than {limit} bytes (a bot's regexes share \
                             {REGEX_BUDGET_BYTES} bytes, at most {REGEX_MAX_BYTES} each); Unicode classes such as \
                             \\w take ~50 KB per repetition: use fewer repetitions or ASCII classes like [a-z0-9_] \
                             or (?-u:\\w)"
                        ),
                        e => format!("engine.rules[{i}].regex: invalid regex: {}", e.to_string().replace('\n', " ")),
                    }),
            };
            let reply = match rule {
                Rule::Keywords { reply, .. } | Rule::Regex { reply, .. } => reply.clone(),
            };
            match matcher {
                Ok(m) => rules.push((m, reply)),
                Err(e) => errors.push((i, e)),
            }
        }
        let fallback = spec.fallback.clone().unwrap_or_else(|| DEFAULT_FALLBACK.to_owned());
        (CompiledRules { rules, fallback }, errors)
    }

    pub fn answer(&self, text: &str) -> &str {
        let mut lower = None;
        for (m, reply) in &self.rules {
            let hit = match m {
                Matcher::Keywords(ac) => ac.is_match(lower.get_or_insert_with(|| text.to_lowercase()).as_str()),
                Matcher::Regex(re) => re.is_match(text),
            };
            if hit {
                return reply;
            }
        }
        &self.fallback
    }
}

/// Compiled rule sets per bot, shared by every socket of the server.
#[derive(Clone, Default)]
pub struct RulesCache {
    /// Per bot: the settings it was compiled from (compared on each use, so an edited bot
    /// compiles again), when it was last used, and the compiled set. Plain mutex: map updates
    /// only, never held across an await or while compiling.
    inner: Arc<Mutex<CacheInner>>,
}

#[derive(Default)]
struct CacheInner {
    tick: u64,
    bots: HashMap<Uuid, (Arc<RulesSpec>, u64, Arc<CompiledRules>)>,
}

impl RulesCache {
    /// The compiled rule set of `bot_id` for these settings, if it is in the cache.
    pub fn cached(&self, bot_id: Uuid, spec: &RulesSpec) -> Option<Arc<CompiledRules>> {
        let mut inner = self.inner.lock().unwrap();
        inner.tick += 1;
        let tick = inner.tick;
        let (s, used, c) = inner.bots.get_mut(&bot_id)?;
        (**s == *spec).then(|| {
            *used = tick;
            c.clone()
        })
    }

    /// The compiled rule set of `bot_id` for these settings: from the cache, or compiled on the
    /// blocking pool and kept.
    pub async fn get(&self, bot_id: Uuid, spec: &RulesSpec) -> Result<Arc<CompiledRules>, EngineError> {
        if let Some(c) = self.cached(bot_id, spec) {
            return Ok(c);
        }
        let spec = Arc::new(spec.clone());
        let to_compile = spec.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            let (compiled, errors) = CompiledRules::compile(&to_compile);
            for (_, e) in errors {
                tracing::warn!(%bot_id, error = %e, "a stored rule does not compile within the limits; it is skipped");
            }
            Arc::new(compiled)
        })
        .await
        .map_err(|e| EngineError { code: ErrorCode::BotError, message: format!("compiling the rules failed: {e}") })?;
        let mut inner = self.inner.lock().unwrap();
        inner.tick += 1;
        let tick = inner.tick;
        if inner.bots.len() >= CACHE_BOTS && !inner.bots.contains_key(&bot_id) {
            let oldest = inner.bots.iter().min_by_key(|(_, (_, used, _))| *used).map(|(id, _)| *id);
            if let Some(id) = oldest {
                inner.bots.remove(&id);
            }
        }
        inner.bots.insert(bot_id, (spec, tick, compiled.clone()));
        Ok(compiled)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().bots.len()
    }
}

pub struct Rules {
    pub compiled: Arc<CompiledRules>,
}

#[async_trait]
impl BotEngine for Rules {
    fn instant(&self) -> bool {
        true
    }

    async fn reply(&self, req: &ReplyRequest, _sink: &mut dyn DeltaSink) -> Result<String, EngineError> {
        // Bounded, but up to a few milliseconds for a large rule set and a long message: off
        // the async workers.
        let compiled = self.compiled.clone();
        let text = req.message.content.clone();
        tokio::task::spawn_blocking(move || compiled.answer(&text).to_owned())
            .await
            .map_err(|e| EngineError { code: ErrorCode::BotError, message: format!("matching the rules failed: {e}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> RulesSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn first_matching_rule_wins_then_fallback() {
        let spec = spec(serde_json::json!({
            "rules": [
                {"keywords": ["Price", "cost"], "reply": "It costs 10 EUR."},
                {"regex": "(?i)^hello\\b", "reply": "Hi!"},
                {"keywords": ["price"], "reply": "never reached"}
            ],
            "fallback": "Ask me about prices."
        }));
        let (r, errors) = CompiledRules::compile(&spec);
        assert!(errors.is_empty());
        assert_eq!(r.answer("what's the PRICE?"), "It costs 10 EUR.");
        assert_eq!(r.answer("How much does it cost"), "It costs 10 EUR.");
        assert_eq!(r.answer("Hello there"), "Hi!");
        assert_eq!(r.answer("say hello"), "Ask me about prices.");
    }

    #[test]
    fn regexes_share_a_size_budget_and_a_rule_too_big_is_left_out() {
        // One regex may use the whole budget: \b\w{3,20}\b (Unicode) fits.
        let one = spec(serde_json::json!({"rules": [{"regex": "\\b\\w{3,20}\\b", "reply": "word"}]}));
        let (r, errors) = CompiledRules::compile(&one);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(r.answer("a hello"), "word");
        // \w{200} needs ~10 MB: refused, naming the rule and the bound; the other rules stay.
        let big = spec(serde_json::json!({"rules": [
            {"keywords": ["hi"], "reply": "hello"},
            {"regex": "\\w{200}", "reply": "x"}
        ], "fallback": "?"}));
        let (r, errors) = CompiledRules::compile(&big);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, 1);
        assert!(errors[0].1.starts_with("engine.rules[1].regex: compiles to more than"), "{}", errors[0].1);
        assert_eq!(r.answer("hi"), "hello");
        assert_eq!(r.answer(&"a".repeat(300)), "?");
    }

    #[tokio::test]
    async fn a_rule_set_is_compiled_once_per_bot_and_version() {
        let cache = RulesCache::default();
        let bot = Uuid::new_v4();
        let v1 = spec(serde_json::json!({"rules": [{"regex": "^a", "reply": "A"}]}));
        let first = cache.get(bot, &v1).await.unwrap();
        let again = cache.get(bot, &v1.clone()).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "the same settings reuse the compiled set");
        let v2 = spec(serde_json::json!({"rules": [{"regex": "^b", "reply": "B"}]}));
        let edited = cache.get(bot, &v2).await.unwrap();
        assert_eq!(edited.answer("b"), "B", "edited settings compile again");
        for _ in 0..CACHE_BOTS + 5 {
            cache.get(Uuid::new_v4(), &v1).await.unwrap();
        }
        assert_eq!(cache.len(), CACHE_BOTS, "the cache is bounded");
    }
}
