//! The one test suite every [`Store`] implementation must pass. Each implementation's
//! tests call [`run_all`] with a fresh, empty store.
//!
//! One file over 500 lines on purpose: it is the specification of a store, read top to bottom
//! when writing a new one, and its cases share their fixtures (`user`, `chat_setup`,
//! `user_msg`, `bot_reply`); `test_every_store!` at the end makes each case a test per store.

use std::sync::Arc;

use chrono::{Duration, Utc};
use natter_proto::api::{BotRole, ConnectionRecord, MemberRole, Visibility};
use natter_proto::{MessageRole, MessageStatus};
use uuid::Uuid;

use super::*;

pub async fn run_all(store: Arc<dyn Store>) {
    users(&*store).await;
    refresh_tokens(&*store).await;
    bots_and_roles(&*store).await;
    messages(&*store).await;
    concurrent_appends_are_gap_free(store.clone()).await;
    simultaneous_appends(&*store).await;
    tickets(&*store).await;
    ledger(&*store).await;
    connection_slots(store.clone()).await;
    generations(&*store).await;
    one_outcome_per_message(store.clone()).await;
    writers_meet(store.clone()).await;
    closed(&*store).await;
}

/// Last: a closed store refuses everything, and says so through `ping`.
async fn closed(store: &dyn Store) {
    store.ping().await.unwrap();
    let conv = chat_setup(store, "closer").await;
    store.close().await;
    assert!(matches!(store.ping().await, Err(StoreError::Backend(_))));
    assert!(matches!(store.user_by_username("alice").await, Err(StoreError::Backend(_))));
    assert!(matches!(store.append_message(user_msg(conv.id, "late", "x")).await, Err(StoreError::Backend(_))));
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
        store.create_user(NewUser { username: "alice".into(), password_hash: "x".into(), is_admin: false }).await,
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
    for (hash, expires) in
        [("t1", now + Duration::days(1)), ("t2", now + Duration::days(1)), ("old", now - Duration::seconds(1))]
    {
        store
            .insert_refresh_token(NewRefreshToken {
                token_hash: hash.into(),
                user_id: u.id,
                family_id: family,
                expires_at: expires,
            })
            .await
            .unwrap();
    }
    assert_eq!(
        store.use_refresh_token("t1", now).await.unwrap(),
        RefreshUse::Valid { user_id: u.id, family_id: family }
    );
    assert_eq!(store.use_refresh_token("nope", now).await.unwrap(), RefreshUse::Invalid);
    assert_eq!(store.use_refresh_token("old", now).await.unwrap(), RefreshUse::Invalid, "expired");
    // Reuse of t1 revokes the family, so t2 (unused) no longer works either.
    assert!(store.revoked_families(now - Duration::minutes(15)).await.unwrap().is_empty());
    assert_eq!(store.use_refresh_token("t1", now).await.unwrap(), RefreshUse::Reused { family_id: family });
    assert_eq!(store.use_refresh_token("t2", now).await.unwrap(), RefreshUse::Invalid);

    let fam2 = Uuid::new_v4();
    store
        .insert_refresh_token(NewRefreshToken {
            token_hash: "t3".into(),
            user_id: u.id,
            family_id: fam2,
            expires_at: now + Duration::days(1),
        })
        .await
        .unwrap();
    assert_eq!(store.revoke_refresh_token("t3", now).await.unwrap(), Some(fam2));
    assert_eq!(store.use_refresh_token("t3", now).await.unwrap(), RefreshUse::Invalid);
    assert_eq!(store.revoke_refresh_token("unknown", now).await.unwrap(), None);
    // Both families were revoked just now; nothing since a minute from now.
    let mut revoked = store.revoked_families(now - Duration::minutes(15)).await.unwrap();
    revoked.sort();
    let mut both = vec![family, fam2];
    both.sort();
    assert_eq!(revoked, both);
    assert!(store.revoked_families(now + Duration::minutes(1)).await.unwrap().is_empty());
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
    // Members come by username, with their own role.
    let early = user(store, "a-member1").await;
    store.upsert_member(bot.id, early.id, MemberRole::Chat).await.unwrap();
    let members = store.members(bot.id).await.unwrap();
    assert_eq!(
        members.iter().map(|m| (m.username.as_str(), m.role)).collect::<Vec<_>>(),
        vec![("a-member1", MemberRole::Chat), ("member1", MemberRole::Admin)]
    );
    assert!(store.remove_member(bot.id, early.id).await.unwrap());
    assert!(store.upsert_member(Uuid::new_v4(), early.id, MemberRole::Chat).await.is_err(), "no such bot");

    let mine: Vec<_> = store.bots_for_user(member.id).await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].1, BotRole::Admin);
    assert!(store.bots_for_user(stranger.id).await.unwrap().iter().all(|(b, _)| b.id != bot.id));

    let updated = store
        .update_bot(
            bot.id,
            BotChanges { visibility: Some(Visibility::Public), name: Some("Helper 2".into()), ..Default::default() },
        )
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

    // A user's bots come oldest first (ties by id).
    let second = store
        .create_bot(NewBot {
            owner_id: owner.id,
            name: "Second".into(),
            description: String::new(),
            visibility: Visibility::Private,
            engine: serde_json::json!({"kind": "echo"}),
        })
        .await
        .unwrap();
    let owned = store.bots_for_user(owner.id).await.unwrap();
    let mut sorted: Vec<_> = owned.iter().map(|(b, _)| (b.created_at, b.id)).collect();
    sorted.sort();
    assert_eq!(owned.iter().map(|(b, _)| (b.created_at, b.id)).collect::<Vec<_>>(), sorted);
    assert!(owned.iter().any(|(b, r)| b.id == second.id && *r == BotRole::Owner));

    // Deleting a bot deletes its members, conversations, their messages and replies in progress.
    store.upsert_member(bot.id, member.id, MemberRole::Chat).await.unwrap();
    let conv = store.conversation(member.id, bot.id).await.unwrap();
    let kept = store.conversation(member.id, second.id).await.unwrap();
    store.append_message(user_msg(conv.id, "c1", "hi")).await.unwrap();
    store.append_message(user_msg(kept.id, "c1", "hi")).await.unwrap();
    let lease = GenerationLease {
        message_id: Uuid::new_v4(),
        conversation_id: conv.id,
        in_reply_to: Uuid::new_v4(),
        node_id: Uuid::new_v4(),
        lease_until: Utc::now() - Duration::seconds(1),
    };
    store.begin_generation(&lease).await.unwrap();
    store.delete_bot(bot.id).await.unwrap();
    assert!(store.bot(bot.id).await.unwrap().is_none());
    assert!(matches!(store.delete_bot(bot.id).await, Err(StoreError::NotFound)));
    assert!(store.members(bot.id).await.unwrap().is_empty());
    assert!(store.conversations_of_bot(bot.id).await.unwrap().is_empty());
    assert!(store.messages_after(conv.id, 0, 10).await.unwrap().is_empty());
    assert!(matches!(store.append_message(user_msg(conv.id, "c2", "hi")).await, Err(StoreError::NotFound)));
    assert!(!store.generation_in_progress(conv.id, lease.message_id).await.unwrap());
    assert!(store.bots_for_user(member.id).await.unwrap().iter().all(|(b, _)| b.id != bot.id));
    assert!(store.conversation(member.id, bot.id).await.is_err(), "no conversation with a deleted bot");
    assert!(store.conversation(Uuid::new_v4(), second.id).await.is_err(), "nor with an unknown user");
    // The owner's other bot and its conversation are untouched.
    assert_eq!(store.conversations_of_bot(second.id).await.unwrap(), vec![kept.id]);
    assert_eq!(store.messages_after(kept.id, 0, 10).await.unwrap().len(), 1);
    store.delete_bot(second.id).await.unwrap();
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
    assert_eq!(store.conversations_of_bot(conv.bot_id).await.unwrap(), vec![conv.id]);
    assert!(store.conversations_of_bot(Uuid::new_v4()).await.unwrap().is_empty());

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
    let seqs = |msgs: Vec<WireMessage>| msgs.iter().map(|m| m.seq).collect::<Vec<_>>();
    assert_eq!(seqs(store.messages_after(conv.id, -5, 2).await.unwrap()), vec![1, 2]);
    assert!(store.messages_after(conv.id, 0, 0).await.unwrap().is_empty());
    assert_eq!(seqs(store.messages_before(conv.id, 100, 3).await.unwrap()), vec![8, 9, 10], "the newest, oldest first");
    assert_eq!(seqs(store.messages_before(conv.id, 3, 10).await.unwrap()), vec![1, 2]);
    assert!(store.messages_before(conv.id, 1, 10).await.unwrap().is_empty());
    assert!(store.messages_before(conv.id, 5, 0).await.unwrap().is_empty());
    assert!(store.messages_after(Uuid::new_v4(), 0, 10).await.unwrap().is_empty());
    // A message id is stored once: a new message under a stored id fails and takes no seq.
    let mut clash = user_msg(conv.id, "c-clash", "x");
    clash.id = a.message.id;
    assert!(store.append_message(clash).await.is_err());
    assert_eq!(store.conversation(conv.user_id, conv.bot_id).await.unwrap().last_seq, 10);
    assert!(matches!(store.append_message(user_msg(Uuid::new_v4(), "c1", "x")).await, Err(StoreError::NotFound)));

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

/// Every kind of write at once (SQLite has two writers of the file: the appender's connection
/// and the pool's): appends from many tasks, the recovery sweep storing cut-off replies in the
/// same conversation, refresh tokens used (a transaction that reads, then writes) and ledger
/// rows. None fails for a lock, and the conversation's seqs stay gap-free and unique whoever
/// took them.
async fn writers_meet(store: Arc<dyn Store>) {
    let conv = chat_setup(&*store, "meeting").await;
    let node = Uuid::new_v4();
    let now = Utc::now();
    // Replies in progress, to be recovered while the appends run.
    let mut cut = Vec::new();
    for i in 0..20 {
        let asked = store.append_message(user_msg(conv.id, &format!("asked-{i}"), "tell me")).await.unwrap().message.id;
        let id = Uuid::new_v4();
        let lease = GenerationLease {
            message_id: id,
            conversation_id: conv.id,
            in_reply_to: asked,
            node_id: node,
            lease_until: now,
        };
        store.begin_generation(&lease).await.unwrap();
        cut.push(id);
    }
    let mut tasks = Vec::new();
    for t in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                store.append_message(user_msg(conv.id, &format!("w{t}-{i}"), "x")).await.unwrap();
            }
        }));
    }
    let tokens = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                let hash = format!("meet-{i}");
                let token = NewRefreshToken {
                    token_hash: hash.clone(),
                    user_id: conv.user_id,
                    family_id: Uuid::new_v4(),
                    expires_at: now + Duration::days(1),
                };
                store.insert_refresh_token(token).await.unwrap();
                let used = store.use_refresh_token(&hash, now).await.unwrap();
                assert!(matches!(used, RefreshUse::Valid { .. }), "{used:?}");
            }
        })
    };
    let mut recovered = Vec::new();
    while recovered.len() < cut.len() {
        recovered.extend(store.recover_generations(now + Duration::seconds(1)).await.unwrap());
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokens.await.unwrap();
    let mut ids: Vec<Uuid> = recovered.iter().map(|m| m.id).collect();
    ids.sort();
    cut.sort();
    assert_eq!(ids, cut, "each cut-off reply recovered once");
    let all = store.messages_after(conv.id, 0, 1000).await.unwrap();
    let expected = 20 + 20 + 4 * 50;
    assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=expected as i64).collect::<Vec<_>>());
    assert_eq!(store.conversation(conv.user_id, conv.bot_id).await.unwrap().last_seq, expected as i64);
}

/// Messages sent at the same moment (one batch, in a store that batches): seqs per conversation still run
/// 1, 2, 3…, a client_id sent twice in the same batch is stored once, and
/// a message for a missing conversation fails alone.
async fn simultaneous_appends(store: &dyn Store) {
    let owner = store
        .create_user(NewUser { username: "simultaneous".into(), password_hash: "h".into(), is_admin: false })
        .await
        .unwrap();
    let mut convs = Vec::new();
    for i in 0..3 {
        let bot = store
            .create_bot(NewBot {
                owner_id: owner.id,
                name: format!("b{i}"),
                description: String::new(),
                visibility: Visibility::Private,
                engine: serde_json::json!({"kind": "echo"}),
            })
            .await
            .unwrap();
        convs.push(store.conversation(owner.id, bot.id).await.unwrap().id);
    }
    // A stored message first, so the batch starts from last_seq = 1 in conversation 0.
    let msg = |conv: Uuid, client_id: Option<String>| NewMessage {
        id: Uuid::new_v4(),
        conversation_id: conv,
        role: MessageRole::User,
        content: format!("{client_id:?}"),
        client_id,
        in_reply_to: None,
        status: MessageStatus::Complete,
    };
    store.append_message(msg(convs[0], Some("old".into()))).await.unwrap();
    let mut sends = Vec::new();
    for i in 0..60 {
        let conv = convs[i % 3];
        // Every fourth is a resend of the one before it in the same conversation; every
        // tenth a bot-style message without client_id; one resends "old".
        let client_id = match i {
            30 => Some("old".to_string()),
            _ if i % 10 == 9 => None,
            _ if i % 4 == 3 => Some(format!("c{}", i - 3)),
            _ => Some(format!("c{i}")),
        };
        sends.push(msg(conv, client_id));
    }
    sends.insert(17, msg(Uuid::new_v4(), Some("lost".into())));
    // Queued together before an appender runs (the test runtime has one thread).
    let results = futures_util::future::join_all(sends.iter().cloned().map(|m| store.append_message(m))).await;
    for (m, r) in sends.iter().zip(&results) {
        if m.conversation_id == convs[0] || m.conversation_id == convs[1] || m.conversation_id == convs[2] {
            let a = r.as_ref().unwrap();
            assert_eq!(a.message.client_id, m.client_id);
            assert_eq!(a.duplicate, a.message.id != m.id, "{m:?}");
        } else {
            assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
        }
    }
    assert_eq!(results.iter().filter(|r| matches!(r, Ok(a) if a.duplicate)).count(), 13, "12 resends and \"old\"");
    for conv in &convs {
        let stored = store.messages_after(*conv, 0, 1000).await.unwrap();
        let seqs: Vec<i64> = stored.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=stored.len() as i64).collect::<Vec<_>>(), "gap-free in {conv}");
        let mut ids: Vec<_> = stored.iter().filter_map(|m| m.client_id.clone()).collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "each client_id once");
        let last = stored.last().unwrap().seq;
        // last_seq moved with the batch: the next message follows it.
        let next = store.append_message(msg(*conv, Some("after".into()))).await.unwrap();
        assert_eq!(next.message.seq, last + 1);
    }
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

fn record(user: Option<Uuid>, bot: Option<Uuid>, started: chrono::DateTime<Utc>) -> ConnectionRecord {
    let id = Uuid::new_v4();
    ConnectionRecord {
        attempt_id: id,
        connection_id: id,
        user_id: user,
        bot_id: bot,
        remote_addr: Some("127.0.0.1:5555".into()),
        user_agent: Some("test".into()),
        origin: None,
        upgrade: Some("websocket".into()),
        connection: Some("Upgrade".into()),
        sec_websocket_version: Some("13".into()),
        forwarded_for: None,
        started_at: super::from_millis(started.timestamp_millis()),
        established: false,
        ended_at: None,
        close_code: None,
        close_reason: None,
        closed_by: None,
        msgs_in: 0,
        msgs_out: 0,
        bytes_in: 0,
        bytes_out: 0,
        trace_id: None,
        transport: natter_proto::api::TransportKind::Websocket,
    }
}

async fn ledger(store: &dyn Store) {
    let (u1, u2, bot) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let now = Utc::now();
    let mut a = record(Some(u1), Some(bot), now - Duration::seconds(3));
    // A trace id is kept as given (traces exported), and the transport.
    let b = ConnectionRecord {
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        transport: natter_proto::api::TransportKind::Sse,
        ..record(Some(u2), Some(bot), now - Duration::seconds(2))
    };
    let c = record(None, None, now - Duration::seconds(1));
    store.record_connections(&[a.clone(), b.clone(), c.clone()]).await.unwrap();
    // The end of `a` replaces its row.
    a.established = true;
    a.ended_at = Some(super::from_millis(now.timestamp_millis()));
    a.close_code = Some(4408);
    a.close_reason = Some("no traffic".into());
    a.closed_by = Some(natter_proto::api::ClosedBy::Server);
    a.msgs_in = 3;
    a.bytes_out = 1234;
    store.record_connections(std::slice::from_ref(&a)).await.unwrap();
    assert_eq!(store.connections(Some(u1), None, 10).await.unwrap(), vec![a.clone()]);
    assert_eq!(store.connection(a.attempt_id, None).await.unwrap(), Some(a.clone()));
    assert_eq!(store.connections(None, Some(bot), 10).await.unwrap(), vec![b.clone(), a.clone()], "newest first");
    assert_eq!(store.connections(None, None, 2).await.unwrap(), vec![c.clone(), b.clone()]);
    assert!(store.connection(Uuid::new_v4(), None).await.unwrap().is_none());
    // Retention: by age, then by count.
    let old = record(Some(u1), None, now - Duration::days(30));
    store.record_connections(std::slice::from_ref(&old)).await.unwrap();
    assert_eq!(store.prune_connections(now - Duration::days(7), 100).await.unwrap(), 1);
    assert!(store.connection(old.attempt_id, None).await.unwrap().is_none());
    assert_eq!(store.prune_connections(now - Duration::days(7), 2).await.unwrap(), 1);
    assert_eq!(store.connections(None, None, 10).await.unwrap(), vec![c, b.clone()], "the oldest went");
    // A later row of someone else's with the same attempt id hides nothing of u2's.
    let mut shadow = record(Some(u1), None, now);
    shadow.attempt_id = b.attempt_id;
    store.record_connections(std::slice::from_ref(&shadow)).await.unwrap();
    assert_eq!(store.connection(b.attempt_id, Some(u2)).await.unwrap(), Some(b.clone()));
    assert_eq!(store.connection(b.attempt_id, Some(u1)).await.unwrap(), Some(shadow.clone()));
    assert_eq!(store.connection(b.attempt_id, None).await.unwrap(), Some(shadow.clone()), "the newest of everyone's");
    // By connection id too: only its owner (or everyone's lookup) finds it.
    assert!(store.connection(shadow.connection_id, Some(u2)).await.unwrap().is_none());
    assert_eq!(store.connection(shadow.connection_id, Some(u1)).await.unwrap(), Some(shadow));
    // A big batch where each connection's open row and its close arrive together (the ledger
    // writer takes whatever is queued): the close is what stays, for every one of them.
    let many_bot = Uuid::new_v4();
    let opened: Vec<ConnectionRecord> =
        (0..73).map(|i| record(Some(u2), Some(many_bot), now - Duration::milliseconds(i))).collect();
    let closed: Vec<ConnectionRecord> = opened
        .iter()
        .enumerate()
        .map(|(i, o)| ConnectionRecord {
            established: true,
            ended_at: Some(super::from_millis(now.timestamp_millis())),
            close_code: Some(1000),
            msgs_in: i as u64,
            ..o.clone()
        })
        .collect();
    let batch: Vec<ConnectionRecord> = opened.iter().chain(&closed).cloned().collect();
    store.record_connections(&batch).await.unwrap();
    let mut stored = store.connections(None, Some(many_bot), 200).await.unwrap();
    stored.sort_by_key(|r| r.msgs_in);
    assert_eq!(stored, closed);
}

async fn connection_slots(store: Arc<dyn Store>) {
    let (user, other, node) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let now = Utc::now();
    let slot = |user_id, expires_at| SlotClaim { connection_id: Uuid::new_v4(), user_id, node_id: node, expires_at };
    let a = slot(user, now + Duration::seconds(10));
    assert!(store.claim_slot(a, 2, now).await.unwrap());
    assert!(store.claim_slot(slot(user, now + Duration::seconds(10)), 2, now).await.unwrap());
    assert!(
        !store.claim_slot(slot(user, now + Duration::seconds(10)), 2, now).await.unwrap(),
        "third is over the limit"
    );
    assert_eq!(store.slots_in_use(user, now).await.unwrap(), 2);
    assert_eq!(store.slots_in_use(user, now + Duration::seconds(11)).await.unwrap(), 0, "expired slots are not in use");
    assert!(store.claim_slot(slot(other, now + Duration::seconds(10)), 2, now).await.unwrap(), "limits are per user");
    store.release_slot(a.connection_id).await.unwrap();
    store.release_slot(Uuid::new_v4()).await.unwrap();
    assert!(
        store.claim_slot(slot(user, now + Duration::seconds(10)), 2, now).await.unwrap(),
        "a released slot is free"
    );

    // A dead node's slots stop counting when their lease ends; a live node renews its own.
    let later = now + Duration::seconds(20);
    let (held, closed) = (slot(user, later + Duration::seconds(10)), slot(user, later + Duration::seconds(10)));
    assert!(store.claim_slot(held, 2, later).await.unwrap());
    assert!(store.claim_slot(closed, 2, later).await.unwrap());
    store
        .renew_node(node, &[held.connection_id, closed.connection_id], &[], later + Duration::seconds(60))
        .await
        .unwrap();
    let much_later = later + Duration::seconds(30);
    assert!(!store.claim_slot(slot(user, much_later), 2, much_later).await.unwrap(), "renewed slots still count");
    // Issue 15: a socket closed while its slot could not be released is not revived by the
    // renewal; a slot claimed while the renewal runs (it expires later) is kept.
    let claimed_meanwhile = slot(other, later + Duration::seconds(90));
    assert!(store.claim_slot(claimed_meanwhile, 9, later).await.unwrap());
    store.renew_node(node, &[held.connection_id], &[], later + Duration::seconds(80)).await.unwrap();
    assert_eq!(store.slots_in_use(user, much_later).await.unwrap(), 1, "only the held socket's slot is left");
    assert_eq!(store.slots_in_use(user, later + Duration::seconds(79)).await.unwrap(), 1, "and it was renewed");
    assert_eq!(store.slots_in_use(other, later + Duration::seconds(85)).await.unwrap(), 1, "the new slot is kept");
    store.renew_node(Uuid::new_v4(), &[], &[], later + Duration::seconds(200)).await.unwrap();
    assert_eq!(store.slots_in_use(user, much_later).await.unwrap(), 1, "another node's renewal leaves them alone");

    // Concurrent claims never overshoot the limit.
    let racer = Uuid::new_v4();
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let store = store.clone();
        let claim = slot(racer, now + Duration::seconds(10));
        tasks.push(tokio::spawn(async move { store.claim_slot(claim, 3, now).await.unwrap() }));
    }
    let mut won = 0;
    for t in tasks {
        won += t.await.unwrap() as usize;
    }
    assert_eq!(won, 3);
}

async fn generations(store: &dyn Store) {
    let conv = chat_setup(store, "generator").await;
    let ask = |client_id: &'static str| {
        let m = user_msg(conv.id, client_id, "tell me");
        async move { store.append_message(m).await.unwrap().message.id }
    };
    let (asked_cut, asked_stored) = (ask("q1").await, ask("q2").await);
    let node = Uuid::new_v4();
    let now = Utc::now();
    let lease = |message_id, in_reply_to| GenerationLease {
        message_id,
        conversation_id: conv.id,
        in_reply_to,
        node_id: node,
        lease_until: now + Duration::seconds(10),
    };
    let (cut, finished, stored) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for (id, asked) in [(cut, asked_cut), (finished, asked_stored), (stored, asked_stored)] {
        store.begin_generation(&lease(id, asked)).await.unwrap();
    }
    store.checkpoint_generation(cut, "half a rep").await.unwrap();
    assert!(store.generation_in_progress(conv.id, finished).await.unwrap());
    assert!(!store.generation_in_progress(Uuid::new_v4(), finished).await.unwrap(), "of its own conversation only");
    store.end_generation(finished).await.unwrap();
    assert!(!store.generation_in_progress(conv.id, finished).await.unwrap());
    // `stored` was stored, but its node died before forgetting the lease.
    store.append_message(bot_reply(conv.id, stored, asked_stored)).await.unwrap();
    assert!(store.recover_generations(now).await.unwrap().is_empty(), "leases still run");
    store.renew_node(node, &[], &[cut], now + Duration::seconds(30)).await.unwrap();
    assert!(store.recover_generations(now + Duration::seconds(20)).await.unwrap().is_empty(), "renewed");

    let recovered = store.recover_generations(now + Duration::seconds(31)).await.unwrap();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    let m = &recovered[0];
    assert_eq!((m.id, m.seq, m.role, m.status), (cut, 4, MessageRole::Bot, MessageStatus::Incomplete));
    assert_eq!((m.content.as_str(), m.in_reply_to), ("half a rep", Some(asked_cut)));
    assert_eq!(store.messages_after(conv.id, 3, 10).await.unwrap(), recovered, "stored as returned");
    assert!(store.recover_generations(now + Duration::seconds(60)).await.unwrap().is_empty(), "once");
    assert_eq!(store.conversation(conv.user_id, conv.bot_id).await.unwrap().last_seq, 4, "no seq taken for the rest");

    // A node renews only the replies it still runs: one it dropped (it could not store it)
    // expires while the node lives on, and is stored by the sweep.
    let (kept, dropped) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, client_id) in [(kept, "q3"), (dropped, "q4")] {
        store.begin_generation(&lease(id, ask(client_id).await)).await.unwrap();
    }
    store.renew_node(node, &[], &[kept], now + Duration::seconds(100)).await.unwrap();
    let recovered = store.recover_generations(now + Duration::seconds(50)).await.unwrap();
    assert_eq!(recovered.iter().map(|m| m.id).collect::<Vec<_>>(), vec![dropped], "only the dropped one");
}

fn bot_reply(conversation_id: Uuid, id: Uuid, in_reply_to: Uuid) -> NewMessage {
    NewMessage {
        id,
        conversation_id,
        role: MessageRole::Bot,
        content: "whole".into(),
        client_id: None,
        in_reply_to: Some(in_reply_to),
        status: MessageStatus::Complete,
    }
}

/// A user message gets one outcome, however many nodes finish a reply to it (one stalled past
/// its lease while another took over): the second reply is refused, a cut-off one not stored.
async fn one_outcome_per_message(store: Arc<dyn Store>) {
    let conv = chat_setup(&*store, "one-outcome").await;
    let asked = store.append_message(user_msg(conv.id, "u1", "once")).await.unwrap().message.id;
    store.append_message(bot_reply(conv.id, Uuid::new_v4(), asked)).await.unwrap();
    let again = store.append_message(bot_reply(conv.id, Uuid::new_v4(), asked)).await;
    assert!(matches!(again, Err(StoreError::AlreadyAnswered)), "{again:?}");
    let late = GenerationLease {
        message_id: Uuid::new_v4(),
        conversation_id: conv.id,
        in_reply_to: asked,
        node_id: Uuid::new_v4(),
        lease_until: Utc::now(),
    };
    store.begin_generation(&late).await.unwrap();
    let swept = store.recover_generations(Utc::now() + Duration::seconds(1)).await.unwrap();
    assert!(swept.is_empty(), "a cut-off second reply is not stored: {swept:?}");

    // Two replies racing (in one SQLite batch, or two PostgreSQL transactions): one is stored.
    let asked = store.append_message(user_msg(conv.id, "u2", "once")).await.unwrap().message.id;
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.append_message(bot_reply(conv.id, Uuid::new_v4(), asked)).await })
        })
        .collect();
    let mut stored = 0;
    for r in racers {
        match r.await.unwrap() {
            Ok(_) => stored += 1,
            Err(StoreError::AlreadyAnswered) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(stored, 1);
    let all = store.messages_after(conv.id, 0, 100).await.unwrap();
    assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4], "no seq taken by a refused reply");
}

/// Every stored user message is owed one reply until a bot message in reply to it is stored;
/// recovery takes over, once, those no live node is on. Needs a store of its own (the other
/// tests leave user messages unanswered).
pub async fn owed_replies(store: Arc<dyn Store>) {
    let conv = chat_setup(&*store, "owed").await;
    let now = Utc::now();
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let (node_a, node_b) = (Uuid::new_v4(), Uuid::new_v4());
    let secs = Duration::seconds;
    let mut asked = Vec::new();
    for (i, id) in [a, b, c].into_iter().enumerate() {
        let m = NewMessage { id, ..user_msg(conv.id, &format!("o{i}"), "answer me") };
        asked.push(store.append_message(m).await.unwrap().message);
    }
    let dup = NewMessage { id: Uuid::new_v4(), ..user_msg(conv.id, "o0", "answer me") };
    assert!(store.append_message(dup).await.unwrap().duplicate);
    let claim = |node, at| {
        let store = store.clone();
        async move { store.claim_owed(node, at + secs(60), at, at - secs(10), 10).await.unwrap() }
    };
    assert!(claim(node_b, now).await.is_empty(), "fresh messages are left to the node that took them");

    assert!(store.lease_owed(b, node_a, now + secs(10)).await.unwrap(), "queued on node A");
    assert!(!store.lease_owed(b, node_b, now + secs(10)).await.unwrap(), "node A holds it");
    let reply = |in_reply_to| NewMessage {
        id: Uuid::new_v4(),
        conversation_id: conv.id,
        role: MessageRole::Bot,
        content: "done".into(),
        client_id: None,
        in_reply_to: Some(in_reply_to),
        status: MessageStatus::Complete,
    };
    store.append_message(reply(a)).await.unwrap();
    assert!(!store.lease_owed(a, node_a, now + secs(10)).await.unwrap(), "answered: nothing owed");
    let running = GenerationLease {
        message_id: Uuid::new_v4(),
        conversation_id: conv.id,
        in_reply_to: c,
        node_id: node_a,
        lease_until: now + secs(10),
    };
    store.begin_generation(&running).await.unwrap();

    // Node A died: its lease on b ran out; c is being generated, so the generation sweep owns it.
    let taken = claim(node_b, now + secs(20)).await;
    assert_eq!(taken, vec![OwedMessage { message: asked[1].clone(), bot_id: conv.bot_id }]);
    assert!(claim(Uuid::new_v4(), now + secs(20)).await.is_empty(), "taken once");
    store.renew_node(node_b, &[], &[b], now + secs(200)).await.unwrap();
    assert!(claim(Uuid::new_v4(), now + secs(100)).await.is_empty(), "node B renews its lease");
    assert!(!store.lease_owed(b, node_a, now + secs(10)).await.unwrap(), "node B holds it now");

    // The cut-off generation is stored `incomplete`: c is settled with it.
    assert_eq!(store.recover_generations(now + secs(20)).await.unwrap().len(), 1);
    // Node B dropped b (not in its work any more): its lease is not renewed and b is taken over.
    store.renew_node(node_b, &[], &[], now + secs(400)).await.unwrap();
    let retaken: Vec<Uuid> = claim(node_a, now + secs(250)).await.into_iter().map(|o| o.message.id).collect();
    assert_eq!(retaken, vec![b], "a dropped reply is settled by a sweep while its node lives");
    store.append_message(reply(b)).await.unwrap();
    assert!(claim(Uuid::new_v4(), now + secs(1000)).await.is_empty(), "all settled");

    // Pages; sweeps racing each other never take the same message.
    let mut later = Vec::new();
    for i in 0..8 {
        later.push(store.append_message(user_msg(conv.id, &format!("p{i}"), "more")).await.unwrap().message.id);
    }
    let far = now + secs(1000);
    let first = store.claim_owed(node_a, far + secs(60), far, far, 2).await.unwrap();
    assert_eq!(first.len(), 2, "a page at most");
    let racers: Vec<_> = (0..4).map(|_| tokio::spawn(claim(Uuid::new_v4(), far))).collect();
    let mut ids: Vec<Uuid> = first.iter().map(|o| o.message.id).collect();
    for r in racers {
        ids.extend(r.await.unwrap().into_iter().map(|o| o.message.id));
    }
    ids.sort();
    let mut want = later;
    want.sort();
    assert_eq!(ids, want, "each taken exactly once");
}

/// A message stored with its reply worked out beforehand (an instant engine's): the two take
/// consecutive seqs, the message is owed nothing, and a resend stores neither again. Needs a
/// store of its own (it checks that nothing is owed).
pub async fn answered_appends(store: Arc<dyn Store>) {
    let conv = chat_setup(&*store, "answered").await;
    let asked = user_msg(conv.id, "a1", "hello");
    let pair = store.append_answered(asked.clone(), bot_reply(conv.id, Uuid::now_v7(), asked.id)).await.unwrap();
    let reply = pair.reply.expect("stored with its message").unwrap();
    assert_eq!((pair.message.message.seq, pair.message.duplicate), (1, false));
    assert_eq!((reply.message.seq, reply.message.in_reply_to, reply.duplicate), (2, Some(asked.id), false));
    let far = Utc::now() + Duration::seconds(3600);
    let owed = store.claim_owed(Uuid::new_v4(), far, far, far, 10).await.unwrap();
    assert!(owed.is_empty(), "answered in the same step: nothing owed {owed:?}");

    // A resend with another reply: the stored message, no reply, nothing written.
    let resent = NewMessage { id: Uuid::now_v7(), ..asked.clone() };
    let again = store.append_answered(resent, bot_reply(conv.id, Uuid::now_v7(), asked.id)).await.unwrap();
    assert!(again.reply.is_none());
    assert_eq!((again.message.message.id, again.message.duplicate), (asked.id, true));
    // Among other appends, in order, and gap-free.
    let plain = store.append_message(user_msg(conv.id, "a2", "no bot yet")).await.unwrap().message;
    let next = user_msg(conv.id, "a3", "and again");
    let pair = store.append_answered(next.clone(), bot_reply(conv.id, Uuid::now_v7(), next.id)).await.unwrap();
    let seqs = (plain.seq, pair.message.message.seq, pair.reply.unwrap().unwrap().message.seq);
    assert_eq!(seqs, (3, 4, 5));
    let all = store.messages_after(conv.id, 0, 100).await.unwrap();
    assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!(all[1].role, MessageRole::Bot);
}

/// Runs one case against a fresh store of each kind, as a test of its own:
/// `$case::sqlite` (in memory), `$case::postgres` (a schema of its own in
/// `NATTER_TEST_DATABASE_URL`; skipped loudly when that is not set, a failure in CI) and
/// `$case::memory`. A failure names the case and the store.
macro_rules! test_every_store {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use std::sync::Arc;

                #[tokio::test]
                async fn sqlite() {
                    let store = crate::store::SqliteStore::temporary().await.unwrap();
                    super::$case(Arc::new(store)).await;
                }

                #[tokio::test]
                async fn postgres() {
                    let test = concat!(module_path!(), "::postgres");
                    let Some(schema) = crate::store::postgres::TestSchema::from_env(test).await else { return };
                    let store = crate::store::PostgresStore::connect(&schema.url).await.unwrap();
                    super::$case(Arc::new(store)).await;
                }

                #[tokio::test]
                async fn memory() {
                    super::$case(Arc::new(crate::store::MemoryStore::new())).await;
                }
            }
        )*
    };
}

mod cases {
    use super::*;

    // Each case as a function of an `Arc<dyn Store>`, for the macro.
    macro_rules! by_arc {
        ($($case:ident),*) => {
            $(pub(super) async fn $case(store: Arc<dyn Store>) {
                super::$case(&*store).await
            })*
        };
    }
    by_arc!(
        users,
        refresh_tokens,
        bots_and_roles,
        messages,
        simultaneous_appends,
        tickets,
        ledger,
        generations,
        closed
    );
    pub(super) use super::{
        answered_appends, concurrent_appends_are_gap_free, connection_slots, one_outcome_per_message, owed_replies,
        writers_meet,
    };

    test_every_store!(
        users,
        refresh_tokens,
        bots_and_roles,
        messages,
        concurrent_appends_are_gap_free,
        simultaneous_appends,
        tickets,
        ledger,
        connection_slots,
        generations,
        one_outcome_per_message,
        owed_replies,
        answered_appends,
        writers_meet,
        closed,
    );
}
