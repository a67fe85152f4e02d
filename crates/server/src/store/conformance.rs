//! The one test suite every [`Store`] implementation must pass. Each implementation's
//! tests call [`run_all`] with a fresh, empty store.

use std::sync::Arc;

use chrono::{Duration, Utc};
use natter_proto::api::{BotRole, MemberRole, Visibility};
use natter_proto::{MessageRole, MessageStatus};
use uuid::Uuid;

use super::*;

pub async fn run_all(store: Arc<dyn Store>) {
    users(&*store).await;
    refresh_tokens(&*store).await;
    bots_and_roles(&*store).await;
    messages(&*store).await;
    concurrent_appends_are_gap_free(store.clone()).await;
    tickets(&*store).await;
    closed(&*store).await;
}

/// Last: a closed store refuses everything, and says so through `ping`.
async fn closed(store: &dyn Store) {
    store.ping().await.unwrap();
    store.close().await;
    assert!(matches!(store.ping().await, Err(StoreError::Backend(_))));
    assert!(matches!(store.user_by_username("alice").await, Err(StoreError::Backend(_))));
}

async fn user(store: &dyn Store, name: &str) -> User {
    store
        .create_user(NewUser { username: name.into(), password_hash: format!("hash-of-{name}"), is_admin: false })
        .await
        .unwrap()
}

async fn users(store: &dyn Store) {
    store.ping().await.unwrap();
    let alice = user(store, "alice").await;
    assert_eq!(alice.username, "alice");
    assert!(!alice.is_admin);
    assert!(matches!(
        store
            .create_user(NewUser { username: "alice".into(), password_hash: "x".into(), is_admin: false })
            .await,
        Err(StoreError::UsernameTaken)
    ));
    assert_eq!(store.user_by_username("alice").await.unwrap().unwrap(), alice);
    assert_eq!(store.user_by_id(alice.id).await.unwrap().unwrap(), alice);
    assert!(store.user_by_username("nobody").await.unwrap().is_none());
    assert!(store.user_by_id(Uuid::new_v4()).await.unwrap().is_none());
    store.set_admin("alice", true).await.unwrap();
    assert!(store.user_by_id(alice.id).await.unwrap().unwrap().is_admin);
    assert!(matches!(store.set_admin("nobody", true).await, Err(StoreError::NotFound)));
}

async fn refresh_tokens(store: &dyn Store) {
    let u = user(store, "refresher").await;
    let family = Uuid::new_v4();
    let now = Utc::now();
    for (hash, expires) in [("t1", now + Duration::days(1)), ("t2", now + Duration::days(1)), ("old", now - Duration::seconds(1))] {
        store
            .insert_refresh_token(NewRefreshToken { token_hash: hash.into(), user_id: u.id, family_id: family, expires_at: expires })
            .await
            .unwrap();
    }
    assert_eq!(store.use_refresh_token("t1", now).await.unwrap(), RefreshUse::Valid { user_id: u.id, family_id: family });
    assert_eq!(store.use_refresh_token("nope", now).await.unwrap(), RefreshUse::Invalid);
    assert_eq!(store.use_refresh_token("old", now).await.unwrap(), RefreshUse::Invalid, "expired");
    // Reuse of t1 revokes the family, so t2 (unused) no longer works either.
    assert_eq!(store.use_refresh_token("t1", now).await.unwrap(), RefreshUse::Reused);
    assert_eq!(store.use_refresh_token("t2", now).await.unwrap(), RefreshUse::Invalid);

    let fam2 = Uuid::new_v4();
    store
        .insert_refresh_token(NewRefreshToken { token_hash: "t3".into(), user_id: u.id, family_id: fam2, expires_at: now + Duration::days(1) })
        .await
        .unwrap();
    store.revoke_refresh_token("t3", now).await.unwrap();
    assert_eq!(store.use_refresh_token("t3", now).await.unwrap(), RefreshUse::Invalid);
    store.revoke_refresh_token("unknown", now).await.unwrap();
}

async fn bots_and_roles(store: &dyn Store) {
    let owner = user(store, "owner1").await;
    let member = user(store, "member1").await;
    let stranger = user(store, "stranger1").await;
    let bot = store
        .create_bot(NewBot {
            owner_id: owner.id,
            name: "Helper".into(),
            description: "helps".into(),
            visibility: Visibility::Private,
            engine: serde_json::json!({"kind": "echo"}),
        })
        .await
        .unwrap();
    assert_eq!(bot.owner_username, "owner1");
    assert_eq!(store.bot(bot.id).await.unwrap().unwrap(), bot);
    assert!(store.bot(Uuid::new_v4()).await.unwrap().is_none());

    assert_eq!(store.bot_role(&bot, owner.id).await.unwrap(), Some(BotRole::Owner));
    assert_eq!(store.bot_role(&bot, stranger.id).await.unwrap(), None);
    store.upsert_member(bot.id, member.id, MemberRole::Chat).await.unwrap();
    assert_eq!(store.bot_role(&bot, member.id).await.unwrap(), Some(BotRole::Chat));
    store.upsert_member(bot.id, member.id, MemberRole::Admin).await.unwrap();
    assert_eq!(store.bot_role(&bot, member.id).await.unwrap(), Some(BotRole::Admin));
    let members = store.members(bot.id).await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].username, "member1");
    assert_eq!(members[0].role, MemberRole::Admin);

    let mine: Vec<_> = store.bots_for_user(member.id).await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].1, BotRole::Admin);
    assert!(store.bots_for_user(stranger.id).await.unwrap().iter().all(|(b, _)| b.id != bot.id));

    let updated = store
        .update_bot(bot.id, BotChanges { visibility: Some(Visibility::Public), name: Some("Helper 2".into()), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(updated.name, "Helper 2");
    assert_eq!(updated.description, "helps", "untouched fields stay");
    assert_eq!(store.bot_role(&updated, stranger.id).await.unwrap(), Some(BotRole::Public));
    let visible = store.bots_for_user(stranger.id).await.unwrap();
    assert!(visible.iter().any(|(b, r)| b.id == bot.id && *r == BotRole::Public));

    assert!(store.remove_member(bot.id, member.id).await.unwrap());
    assert!(!store.remove_member(bot.id, member.id).await.unwrap());
    assert!(matches!(store.update_bot(Uuid::new_v4(), BotChanges::default()).await, Err(StoreError::NotFound)));

    store.delete_bot(bot.id).await.unwrap();
    assert!(store.bot(bot.id).await.unwrap().is_none());
    assert!(matches!(store.delete_bot(bot.id).await, Err(StoreError::NotFound)));
}

async fn chat_setup(store: &dyn Store, name: &str) -> Conversation {
    let u = user(store, name).await;
    let bot = store
        .create_bot(NewBot {
            owner_id: u.id,
            name: "B".into(),
            description: String::new(),
            visibility: Visibility::Private,
            engine: serde_json::json!({"kind": "echo"}),
        })
        .await
        .unwrap();
    store.conversation(u.id, bot.id).await.unwrap()
}

fn user_msg(conv: Uuid, client_id: &str, content: &str) -> NewMessage {
    NewMessage {
        id: Uuid::new_v4(),
        conversation_id: conv,
        role: MessageRole::User,
        content: content.into(),
        client_id: Some(client_id.into()),
        in_reply_to: None,
        status: MessageStatus::Complete,
    }
}

async fn messages(store: &dyn Store) {
    let conv = chat_setup(store, "chatter").await;
    assert_eq!(conv.last_seq, 0);
    let again = store.conversation(conv.user_id, conv.bot_id).await.unwrap();
    assert_eq!(again.id, conv.id, "one conversation per user and bot");

    let a = store.append_message(user_msg(conv.id, "c1", "hello")).await.unwrap();
    assert!(!a.duplicate);
    assert_eq!(a.message.seq, 1);
    let reply = store
        .append_message(NewMessage {
            id: Uuid::new_v4(),
            conversation_id: conv.id,
            role: MessageRole::Bot,
            content: "hello".into(),
            client_id: None,
            in_reply_to: Some(a.message.id),
            status: MessageStatus::Incomplete,
        })
        .await
        .unwrap();
    assert_eq!(reply.message.seq, 2);
    assert_eq!(reply.message.in_reply_to, Some(a.message.id));

    // Same client_id: not stored again, same message back.
    let dup = store.append_message(user_msg(conv.id, "c1", "different text")).await.unwrap();
    assert!(dup.duplicate);
    assert_eq!(dup.message, a.message);

    for i in 3..=10 {
        let m = store.append_message(user_msg(conv.id, &format!("c{i}"), &format!("m{i}"))).await.unwrap();
        assert_eq!(m.message.seq, i);
    }
    assert_eq!(store.conversation(conv.user_id, conv.bot_id).await.unwrap().last_seq, 10);

    let all = store.messages_after(conv.id, 0, 100).await.unwrap();
    assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    assert_eq!(all[0], a.message, "stored exactly as returned");
    assert_eq!(all[1].status, MessageStatus::Incomplete);
    let page = store.messages_after(conv.id, 4, 3).await.unwrap();
    assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![5, 6, 7]);
    let older = store.messages_before(conv.id, 6, 3).await.unwrap();
    assert_eq!(older.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
    assert!(store.messages_after(conv.id, 10, 5).await.unwrap().is_empty());

    // Another conversation has its own numbering.
    let other = chat_setup(store, "chatter2").await;
    let m = store.append_message(user_msg(other.id, "c1", "x")).await.unwrap();
    assert_eq!(m.message.seq, 1);
    assert!(!m.duplicate, "client_id is unique per conversation, not globally");
}

async fn concurrent_appends_are_gap_free(store: Arc<dyn Store>) {
    let conv = chat_setup(&*store, "racer").await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                // Every fifth send is a resend of the previous one.
                let n = if i % 5 == 4 { i - 1 } else { i };
                store.append_message(user_msg(conv.id, &format!("t{t}-{n}"), "x")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all = store.messages_after(conv.id, 0, 1000).await.unwrap();
    let expected = 8 * 20;
    assert_eq!(all.len(), expected);
    assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=expected as i64).collect::<Vec<_>>());
}

async fn tickets(store: &dyn Store) {
    let u = user(store, "ticketed").await;
    let bot = Uuid::new_v4();
    let now = Utc::now();
    store.create_ticket("h1", u.id, bot, now + Duration::seconds(30)).await.unwrap();
    store.create_ticket("h2", u.id, bot, now - Duration::seconds(1)).await.unwrap();
    assert_eq!(store.peek_ticket("h1", now).await.unwrap(), Some((u.id, bot)), "peek does not consume");
    assert_eq!(store.peek_ticket("h2", now).await.unwrap(), None);
    assert_eq!(store.consume_ticket("h1", now).await.unwrap(), Some((u.id, bot)));
    assert_eq!(store.consume_ticket("h1", now).await.unwrap(), None, "single use");
    assert_eq!(store.consume_ticket("h2", now).await.unwrap(), None, "expired");
    assert_eq!(store.consume_ticket("zz", now).await.unwrap(), None);
}
