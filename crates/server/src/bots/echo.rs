//! The echo engine: replies with the user's text. The default engine, and the one tests
//! and benchmarks lean on.

use async_trait::async_trait;

use super::{BotEngine, DeltaSink, EngineError, ReplyRequest};

pub struct Echo;

#[async_trait]
impl BotEngine for Echo {
    fn instant(&self) -> bool {
        true
    }

    async fn reply(&self, req: &ReplyRequest, _sink: &mut dyn DeltaSink) -> Result<String, EngineError> {
        // One piece: a delta frame would only repeat the final message.
        Ok(req.message.content.clone())
    }
}
