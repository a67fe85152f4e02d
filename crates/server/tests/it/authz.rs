//! Who may do what: every REST endpoint and the chat socket × every kind of caller, in one
//! table. The table is checked against `/api/openapi.json`, so an endpoint added without its
//! row (or a row left behind by a removed endpoint) fails [`every_endpoint_has_a_row`].
//!
//! Callers: anonymous; a stranger (a user with no role on the bot); a chat member; a bot
//! admin; the owner; a stranger calling about a *public* bot; a site admin with no role on
//! the bot. Every caller but `PublicStranger` calls about a private bot. A fresh bot is made
//! for every cell, so a cell that deletes or edits cannot disturb the next one.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Actor {
    Anonymous,
    Stranger,
    Chat,
    Admin,
    Owner,
    PublicStranger,
    SiteAdmin,
}

const ACTORS: [Actor; 7] = [
    Actor::Anonymous,
    Actor::Stranger,
    Actor::Chat,
    Actor::Admin,
    Actor::Owner,
    Actor::PublicStranger,
    Actor::SiteAdmin,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Health,
    Ready,
    OpenApi,
    Register,
    Login,
    Refresh,
    Logout,
    Me,
    ListBots,
    CreateBot,
    GetBot,
    PatchBot,
    DeleteBot,
    ListMembers,
    AddMember,
    /// `DELETE /api/bots/{id}/members/{username}` of another member.
    RemoveMember,
    /// The same, with the caller's own username.
    Leave,
    Messages,
    Ticket,
    Codes,
    /// `GET /api/ws/preflight/{bot_id}`: always 200; the verdict is in the body, and the
    /// table's status is what the socket would do (200 = admitted, else the close code).
    Preflight,
    /// The chat socket: 200 = `connection_established`, else the close code.
    Socket,
    /// The chat as an event stream (`GET /api/sse/chat/{bot_id}`): as the socket.
    SseStream,
    /// `POST /api/sse/chat/{bot_id}/frames`: a client frame for a stream (a ping here).
    SseFrame,
    /// `GET /api/connections` (the caller's own rows).
    Connections,
    /// `GET /api/connections?all=true`.
    AllConnections,
    /// `GET /api/connections/{attempt_id}` of an attempt made by the owner.
    Connection,
}

impl Endpoint {
    /// The route as the OpenAPI document spells it (`None`: not a REST operation).
    fn route(self) -> Option<(&'static str, &'static str)> {
        use Endpoint::*;
        Some(match self {
            Health => ("get", "/api/health"),
            Ready => ("get", "/api/ready"),
            OpenApi => return None, // serves the document itself
            Register => ("post", "/api/auth/register"),
            Login => ("post", "/api/auth/login"),
            Refresh => ("post", "/api/auth/refresh"),
            Logout => ("post", "/api/auth/logout"),
            Me => ("get", "/api/auth/me"),
            ListBots => ("get", "/api/bots"),
            CreateBot => ("post", "/api/bots"),
            GetBot => ("get", "/api/bots/{id}"),
            PatchBot => ("patch", "/api/bots/{id}"),
            DeleteBot => ("delete", "/api/bots/{id}"),
            ListMembers => ("get", "/api/bots/{id}/members"),
            AddMember => ("post", "/api/bots/{id}/members"),
            RemoveMember | Leave => ("delete", "/api/bots/{id}/members/{username}"),
            Messages => ("get", "/api/bots/{id}/messages"),
            Ticket => ("post", "/api/ws/ticket"),
            Codes => ("get", "/api/ws/codes"),
            Preflight => ("get", "/api/ws/preflight/{bot_id}"),
            Socket => return None,    // an upgrade, described in docs/protocol.md
            SseStream => return None, // an event stream, described in docs/protocol.md
            SseFrame => ("post", "/api/sse/chat/{bot_id}/frames"),
            Connections | AllConnections => ("get", "/api/connections"),
            Connection => ("get", "/api/connections/{attempt_id}"),
        })
    }
}

/// The expected status of each endpoint for each actor, in the order of [`ACTORS`]. Public
/// endpoints answer everyone; anonymous is 401 elsewhere; no role on a private bot is 403
/// (a site admin has no role on other people's bots); owner and bot admins edit and manage
/// members; only the owner deletes; a member may leave; someone else's connection attempt
/// is 404 except to site admins. For the socket and preflight, the close code.
#[rustfmt::skip]
const TABLE: &[(Endpoint, [u16; 7])] = &[
    //                           anon  stranger chat  admin owner public site-admin
    (Endpoint::Health,         [200,  200,     200,  200,  200,  200,   200]),
    (Endpoint::Ready,          [200,  200,     200,  200,  200,  200,   200]),
    (Endpoint::OpenApi,        [200,  200,     200,  200,  200,  200,   200]),
    (Endpoint::Register,       [201,  201,     201,  201,  201,  201,   201]),
    (Endpoint::Login,          [200,  200,     200,  200,  200,  200,   200]),
    // The refresh token is the credential: anonymous has none that is valid.
    (Endpoint::Refresh,        [401,  200,     200,  200,  200,  200,   200]),
    (Endpoint::Logout,         [204,  204,     204,  204,  204,  204,   204]),
    (Endpoint::Me,             [401,  200,     200,  200,  200,  200,   200]),
    (Endpoint::ListBots,       [401,  200,     200,  200,  200,  200,   200]),
    (Endpoint::CreateBot,      [401,  201,     201,  201,  201,  201,   201]),
    (Endpoint::GetBot,         [401,  403,     200,  200,  200,  200,   403]),
    (Endpoint::PatchBot,       [401,  403,     403,  200,  200,  403,   403]),
    (Endpoint::DeleteBot,      [401,  403,     403,  403,  204,  403,   403]),
    (Endpoint::ListMembers,    [401,  403,     403,  200,  200,  403,   403]),
    (Endpoint::AddMember,      [401,  403,     403,  200,  200,  403,   403]),
    (Endpoint::RemoveMember,   [401,  403,     403,  204,  204,  403,   403]),
    // The owner, a public stranger and a site admin are not members: nothing to leave.
    (Endpoint::Leave,          [401,  403,     204,  204,  404,  404,   403]),
    (Endpoint::Messages,       [401,  403,     200,  200,  200,  200,   403]),
    (Endpoint::Ticket,         [401,  403,     200,  200,  200,  200,   403]),
    (Endpoint::Codes,          [200,  200,     200,  200,  200,  200,   200]),
    (Endpoint::Preflight,      [4401, 4403,    200,  200,  200,  200,   4403]),
    (Endpoint::Socket,         [4401, 4403,    200,  200,  200,  200,   4403]),
    (Endpoint::SseStream,      [4401, 4403,    200,  200,  200,  200,   4403]),
    (Endpoint::SseFrame,       [401,  403,     200,  200,  200,  200,   403]),
    (Endpoint::Connections,    [401,  200,     200,  200,  200,  200,   200]),
    (Endpoint::AllConnections, [401,  403,     403,  403,  403,  403,   200]),
    (Endpoint::Connection,     [401,  404,     404,  404,  200,  404,   200]),
];

/// The users of the table: `owner` owns every bot, `admin` is its admin, `chat` and
/// `target` its chat members.
struct Cast {
    owner: TestUser,
    admin: TestUser,
    chat: TestUser,
    target: TestUser,
    stranger: TestUser,
    site_admin: TestUser,
}

impl Cast {
    fn user(&self, actor: Actor) -> Option<&TestUser> {
        match actor {
            Actor::Anonymous => None,
            Actor::Stranger | Actor::PublicStranger => Some(&self.stranger),
            Actor::Chat => Some(&self.chat),
            Actor::Admin => Some(&self.admin),
            Actor::Owner => Some(&self.owner),
            Actor::SiteAdmin => Some(&self.site_admin),
        }
    }
}

async fn add_member(app: &TestApp, by: &TestUser, bot: Uuid, username: &str, role: &str) {
    let (status, body) = app
        .post(&format!("/api/bots/{bot}/members"), Some(&by.token), json!({"username": username, "role": role}))
        .await;
    assert_eq!(status, 200, "{body}");
}

/// What the socket does for this caller: 200 once established, else the close code.
async fn socket_outcome(app: &TestApp, bot: Uuid, token: Option<&str>, extra: &str) -> (u16, Value) {
    let query = match token {
        Some(t) => format!("token={t}{extra}"),
        None => extra.trim_start_matches('&').to_owned(),
    };
    let mut ws = WsClient::connect(&app.ws_url(&bot.to_string(), &query)).await;
    match ws.next().await {
        Next::Frame(natter_proto::ServerFrame::ConnectionEstablished { .. }) => {
            ws.close().await;
            (200, Value::Null)
        }
        Next::Frame(other) => panic!("unexpected first frame {other:?}"),
        Next::Close(code, reason) => (code, json!({ "reason": reason })),
    }
}

async fn call(app: &TestApp, cast: &Cast, ep: Endpoint, actor: Actor, bot: Uuid, n: usize) -> (u16, Value) {
    let caller = cast.user(actor);
    let token = caller.map(|u| u.token.as_str());
    let bot_path = format!("/api/bots/{bot}");
    match ep {
        Endpoint::Health => app.get("/api/health", token).await,
        Endpoint::Ready => app.get("/api/ready", token).await,
        Endpoint::OpenApi => app.get("/api/openapi.json", token).await,
        Endpoint::Register => {
            app.post("/api/auth/register", token, json!({"username": format!("new{n}"), "password": PASSWORD})).await
        }
        Endpoint::Login => {
            let who = caller.map_or(cast.target.username.as_str(), |u| u.username.as_str());
            app.post("/api/auth/login", token, json!({"username": who, "password": PASSWORD})).await
        }
        // A fresh login, so the cast's own tokens stay unrotated and unrevoked.
        Endpoint::Refresh => {
            let refresh = match caller {
                Some(u) => app.login(&u.username).await.refresh_token,
                None => "not-a-refresh-token".to_owned(),
            };
            app.post("/api/auth/refresh", token, json!({"refresh_token": refresh})).await
        }
        Endpoint::Logout => {
            let who = caller.map_or(cast.target.username.as_str(), |u| u.username.as_str());
            let pair = app.login(who).await;
            app.post("/api/auth/logout", token, json!({"refresh_token": pair.refresh_token})).await
        }
        Endpoint::Me => app.get("/api/auth/me", token).await,
        Endpoint::ListBots => app.get("/api/bots", token).await,
        Endpoint::CreateBot => app.post("/api/bots", token, json!({"name": "Made"})).await,
        Endpoint::GetBot => app.get(&bot_path, token).await,
        Endpoint::PatchBot => app.patch(&bot_path, token, json!({"name": "Renamed"})).await,
        Endpoint::DeleteBot => app.delete(&bot_path, token).await,
        Endpoint::ListMembers => app.get(&format!("{bot_path}/members"), token).await,
        Endpoint::AddMember => {
            app.post(&format!("{bot_path}/members"), token, json!({"username": cast.target.username, "role": "admin"}))
                .await
        }
        Endpoint::RemoveMember => app.delete(&format!("{bot_path}/members/{}", cast.target.username), token).await,
        Endpoint::Leave => {
            let me = caller.map_or(cast.target.username.as_str(), |u| u.username.as_str());
            app.delete(&format!("{bot_path}/members/{me}"), token).await
        }
        Endpoint::Messages => app.get(&format!("{bot_path}/messages"), token).await,
        Endpoint::Ticket => app.post("/api/ws/ticket", token, json!({"bot_id": bot})).await,
        Endpoint::Codes => app.get("/api/ws/codes", token).await,
        Endpoint::Preflight => {
            let q = token.map(|t| format!("?token={t}")).unwrap_or_default();
            let (status, body) = app.get(&format!("/api/ws/preflight/{bot}{q}"), None).await;
            assert_eq!(status, 200, "preflight always answers 200: {body}");
            match body["ok"].as_bool() {
                Some(true) => (200, body),
                _ => (body["close_code"].as_u64().unwrap_or(0) as u16, body),
            }
        }
        Endpoint::Socket => socket_outcome(app, bot, token, "").await,
        Endpoint::SseStream => {
            let q = token.map(|t| format!("token={t}")).unwrap_or_default();
            let mut sse = crate::sse::SseClient::open(app, bot, &q, None).await;
            let first = sse.event().await;
            match first.name.as_str() {
                "connection_established" => (200, first.data),
                _ => (first.data["code"].as_u64().unwrap_or(0) as u16, first.data),
            }
        }
        Endpoint::SseFrame => {
            let path = format!("/api/sse/chat/{bot}/frames?stream={}", Uuid::new_v4());
            app.post(&path, token, json!({"type": "ping"})).await
        }
        Endpoint::Connections => app.get("/api/connections", token).await,
        Endpoint::AllConnections => app.get("/api/connections?all=true", token).await,
        Endpoint::Connection => {
            let attempt = Uuid::new_v4();
            let (code, _) = socket_outcome(app, bot, Some(&cast.owner.token), &format!("&attempt_id={attempt}")).await;
            assert_eq!(code, 200);
            // The ledger is written in batches off the socket path: wait for the row.
            for _ in 0..100 {
                if app.get(&format!("/api/connections/{attempt}"), Some(&cast.owner.token)).await.0 == 200 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            app.get(&format!("/api/connections/{attempt}"), token).await
        }
    }
}

/// The bot as the owner sees it: (status, name, sorted member roles), to check refusals change nothing.
async fn bot_state(app: &TestApp, owner: &TestUser, bot: Uuid) -> (u16, Value, Vec<(String, String)>) {
    let (status, view) = app.get(&format!("/api/bots/{bot}"), Some(&owner.token)).await;
    let (_, members) = app.get(&format!("/api/bots/{bot}/members"), Some(&owner.token)).await;
    let mut roles: Vec<(String, String)> = members
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| (m["user"]["username"].as_str().unwrap().to_owned(), m["role"].as_str().unwrap().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    roles.sort();
    (status, view["name"].clone(), roles)
}

/// Whether a bot view shows engine settings: anything beyond the engine's kind.
fn shows_engine(view: &Value) -> bool {
    view.get("engine").and_then(Value::as_object).is_some_and(|e| e.keys().any(|k| k != "kind"))
}

#[tokio::test]
async fn every_endpoint_and_the_socket_for_every_caller() {
    let app = TestApp::spawn().await;
    let cast = Cast {
        owner: app.user("owner").await,
        admin: app.user("admin").await,
        chat: app.user("chatter").await,
        target: app.user("target").await,
        stranger: app.user("stranger").await,
        site_admin: app.user("root").await,
    };
    app.state.store.set_admin("root", true).await.unwrap();
    let mut failures = Vec::new();
    let mut n = 0;
    for (ep, expected) in TABLE {
        for (actor, want) in ACTORS.iter().zip(expected) {
            n += 1;
            let visibility = if *actor == Actor::PublicStranger { "public" } else { "private" };
            let bot = app
                .bot(
                    &cast.owner,
                    json!({"name": "M", "visibility": visibility,
                           "engine": {"kind": "rules", "rules": [{"keywords": ["hi"], "reply": "secret rule"}],
                                      "fallback": "owner-only fallback"}}),
                )
                .await
                .id;
            add_member(&app, &cast.owner, bot, &cast.admin.username, "admin").await;
            add_member(&app, &cast.owner, bot, &cast.chat.username, "chat").await;
            add_member(&app, &cast.owner, bot, &cast.target.username, "chat").await;
            let before = bot_state(&app, &cast.owner, bot).await;

            let (status, body) = call(&app, &cast, *ep, *actor, bot, n).await;
            if status != *want {
                failures.push(format!("{ep:?} by {actor:?}: expected {want}, got {status} {body}"));
                continue;
            }
            let want_code = match (ep, status) {
                (Endpoint::Refresh, 401) => Some("invalid_refresh_token"),
                (_, 401) => Some("missing_token"),
                (_, 403) => Some("forbidden"),
                (_, 404) => Some("not_found"),
                _ => None,
            };
            if let Some(code) = want_code {
                if body["error"]["code"] != code || !body["error"]["message"].is_string() {
                    failures.push(format!("{ep:?} by {actor:?}: expected code {code}, got {body}"));
                }
            }
            if status >= 400 && !matches!(ep, Endpoint::Socket | Endpoint::Preflight) {
                // A refused request changes nothing.
                let after = bot_state(&app, &cast.owner, bot).await;
                if after != before {
                    failures
                        .push(format!("{ep:?} by {actor:?} was refused but changed the bot: {before:?} -> {after:?}"));
                }
            }
            // Engine settings (prompts, URLs, rules) are for the owner and bot admins only.
            let may_see_engine = matches!(actor, Actor::Admin | Actor::Owner);
            if let (Endpoint::GetBot | Endpoint::PatchBot, 200) = (ep, status) {
                if shows_engine(&body) != may_see_engine {
                    failures.push(format!("{ep:?} by {actor:?}: engine shown = {}: {body}", shows_engine(&body)));
                }
                let role = match actor {
                    Actor::Chat => "chat",
                    Actor::Admin => "admin",
                    Actor::Owner => "owner",
                    _ => "public",
                };
                if body["my_role"] != role {
                    failures.push(format!("{ep:?} by {actor:?}: my_role should be {role}: {body}"));
                }
            }
            if let (Endpoint::ListBots, 200) = (ep, status) {
                for view in body.as_array().unwrap() {
                    let own = matches!(view["my_role"].as_str(), Some("owner" | "admin"));
                    if shows_engine(view) != own || view.to_string().contains("owner-only fallback") && !own {
                        failures.push(format!("ListBots by {actor:?}: engine of a bot with role {}", view["my_role"]));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "authorisation table:\n{}", failures.join("\n"));
}

#[tokio::test]
async fn every_endpoint_has_a_row() {
    let app = TestApp::spawn().await;
    let (status, doc) = app.get("/api/openapi.json", None).await;
    assert_eq!(status, 200);
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| ops.as_object().unwrap().keys().map(move |m| (m.clone(), path.clone())))
        .filter(|(m, _)| ["get", "post", "put", "patch", "delete"].contains(&m.as_str()))
        .collect();
    let tabled: BTreeSet<(String, String)> =
        TABLE.iter().filter_map(|(ep, _)| ep.route()).map(|(m, p)| (m.to_owned(), p.to_owned())).collect();
    let missing: Vec<_> = documented.difference(&tabled).collect();
    let stale: Vec<_> = tabled.difference(&documented).collect();
    assert!(missing.is_empty(), "endpoints without a row in the authorisation table: {missing:?}");
    assert!(stale.is_empty(), "rows for endpoints the API does not have: {stale:?}");
}
