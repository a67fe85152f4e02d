//! The chat gateway: close codes, frames, resume, idempotency, fan-out, limits, shutdown.

use natter_proto::ServerFrame;

use crate::helpers::*;

#[tokio::test]
async fn connect_chat_and_get_an_echo() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bot = app.echo_bot(&alice).await;
    let mut ws = app.ws(bot.id, &alice.token, "").await;
    let ServerFrame::ConnectionEstablished { user, bot: b, last_seq, .. } = ws.established().await else { unreachable!() };
    assert_eq!(user.username, "alice");
    assert_eq!(b.id, bot.id);
    assert_eq!(last_seq, 0);
    ws.say("c1", "hello").await;
    let ack = ws.frame().await;
    let ServerFrame::Ack { client_id, message, duplicate } = ack else { panic!("{ack:?}") };
    assert_eq!((client_id.as_str(), message.seq, duplicate), ("c1", 1, false));
    let reply = ws.frame().await;
    let ServerFrame::Message { message: r } = reply else { panic!("{reply:?}") };
    assert_eq!((r.seq, r.content.as_str(), r.in_reply_to), (2, "hello", Some(message.id)));
}
