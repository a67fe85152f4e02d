//! The rules engine: keyword and regex rules tried in order, then a fallback. Works fully
//! offline — a useful FAQ bot with no model at all.

use async_trait::async_trait;
use regex::Regex;

use super::spec::{Rule, RulesSpec};
use super::{BotEngine, DeltaSink, EngineError, ReplyRequest};

enum Matcher {
    Keywords(Vec<String>),
    Regex(Regex),
}

pub struct Rules {
    rules: Vec<(Matcher, String)>,
    fallback: String,
}

impl Rules {
    /// Builds the engine from validated settings (regexes were checked when the bot was saved).
    pub fn new(spec: &RulesSpec) -> Rules {
        let rules = spec
            .rules
            .iter()
            .filter_map(|r| match r {
                Rule::Keywords { keywords, reply } => {
                    Some((Matcher::Keywords(keywords.iter().map(|k| k.to_lowercase()).collect()), reply.clone()))
                }
                Rule::Regex { regex, reply } => Regex::new(regex).ok().map(|re| (Matcher::Regex(re), reply.clone())),
            })
            .collect();
        let fallback = spec.fallback.clone().unwrap_or_else(|| "Sorry, I don't have an answer for that.".to_owned());
        Rules { rules, fallback }
    }

    pub fn answer(&self, text: &str) -> &str {
        let lower = text.to_lowercase();
        for (m, reply) in &self.rules {
            let hit = match m {
                Matcher::Keywords(ks) => ks.iter().any(|k| lower.contains(k.as_str())),
                Matcher::Regex(re) => re.is_match(text),
            };
            if hit {
                return reply;
            }
        }
        &self.fallback
    }
}

#[async_trait]
impl BotEngine for Rules {
    fn instant(&self) -> bool {
        true
    }

    async fn reply(&self, req: &ReplyRequest, _sink: &mut dyn DeltaSink) -> Result<String, EngineError> {
        Ok(self.answer(&req.message.content).to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_rule_wins_then_fallback() {
        let spec: RulesSpec = serde_json::from_value(serde_json::json!({
            "rules": [
                {"keywords": ["Price", "cost"], "reply": "It costs 10 EUR."},
                {"regex": "(?i)^hello\\b", "reply": "Hi!"},
                {"keywords": ["price"], "reply": "never reached"}
            ],
            "fallback": "Ask me about prices."
        }))
        .unwrap();
        let r = Rules::new(&spec);
        assert_eq!(r.answer("what's the PRICE?"), "It costs 10 EUR.");
        assert_eq!(r.answer("How much does it cost"), "It costs 10 EUR.");
        assert_eq!(r.answer("Hello there"), "Hi!");
        assert_eq!(r.answer("say hello"), "Ask me about prices.");
    }
}
