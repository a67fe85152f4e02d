//! The steps about the user: `token` (log in or take the given token, and ask the server
//! whose it is — the [`Identity`]) and `bot` (which bot, and would the socket be accepted —
//! the [`BotChoice`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use natter_proto::api::{BotView, Preflight, TokenPair, UserView};
use serde_json::json;
use uuid::Uuid;

use super::http::{Api, Resp};
use super::jwt::{self, JwtInfo};
use super::report::{human, relative, Step};
use super::{DoctorArgs, Registry};

/// Who the doctor is, after the token step.
pub(super) enum Identity {
    /// No --token and no --username: the steps that need a user are skipped.
    Nobody,
    /// Credentials were given, but the server accepted no token from them: the login failed
    /// (no token), or the token was refused or could not be checked.
    Unverified { token: Option<String> },
    /// The server accepted the token as this user's.
    User { token: String, username: String },
}

impl Identity {
    pub fn token(&self) -> Option<&str> {
        match self {
            Identity::Nobody => None,
            Identity::Unverified { token } => token.as_deref(),
            Identity::User { token, .. } => Some(token),
        }
    }

    pub fn verified(&self) -> bool {
        matches!(self, Identity::User { .. })
    }
}

/// The bot the socket steps use, after the bot step.
pub(super) struct BotChoice {
    /// The given bot (even when the bot step could not check it), or the one it picked.
    pub id: Option<Uuid>,
    /// The server's preflight says the socket would be accepted.
    pub accepted: bool,
}

pub(super) async fn token(api: &Api, args: &DoctorArgs, skew: Option<f64>) -> (Step, Identity) {
    let token = match (&args.username, &args.password, &args.token) {
        (Some(user), Some(password), _) => match login(api, user, password).await {
            Ok(token) => token,
            Err(step) => return (step, Identity::Unverified { token: None }),
        },
        (_, _, Some(token)) => token.clone(),
        _ => {
            let step = Step::skipped(
                "token",
                "no --token or --username/--password given; the steps that need a user are skipped",
            );
            return (step, Identity::Nobody);
        }
    };
    let local = jwt::decode(&token);
    let now = Utc::now().timestamp() + skew.unwrap_or(0.0).round() as i64;
    let facts = token_facts(&local, now, skew);
    let res = match api.get("/auth/me", Some(&token), None).await {
        Ok(r) => r,
        Err(e) => {
            let step = Step::fail("token", format!("GET /api/auth/me: {e}"), "the request failed", "check the server");
            return (step, Identity::Unverified { token: Some(token) });
        }
    };
    if res.status != 200 {
        return (refused(&res, &local, now, &facts, api), Identity::Unverified { token: Some(token) });
    }
    let Some(me) = res.json::<UserView>() else {
        let step = Step::fail(
            "token",
            "GET /api/auth/me answered 200 with something else",
            "this is not natter's API",
            "check the base URL",
        );
        return (step, Identity::Unverified { token: Some(token) });
    };
    let detail = format!("accepted by GET /api/auth/me: user {} ({}){facts}", me.username, me.id);
    let step = match local {
        Ok(JwtInfo { exp: Some(exp), .. }) if exp - now < 60 => Step::warn(
            "token",
            detail,
            format!("the token expires {}: a socket opened now cannot reconnect with it", relative(exp - now)),
            "refresh it (POST /api/auth/refresh) before connecting",
        ),
        _ => Step::ok("token", detail),
    };
    (step, Identity::User { token, username: me.username })
}

/// Logs in; a failed login is the token step's verdict.
async fn login(api: &Api, user: &str, password: &str) -> Result<String, Step> {
    let body = json!({"username": user, "password": password});
    match api.request(reqwest::Method::POST, "/auth/login", None, None, Some(body)).await {
        Ok(r) if r.status == 200 => match r.json::<TokenPair>() {
            Some(pair) => Ok(pair.access_token),
            None => Err(Step::fail(
                "token",
                "login answered 200 without a token",
                "this is not natter's login endpoint",
                "check the base URL",
            )),
        },
        Ok(r) if r.error_code().as_deref() == Some("invalid_credentials") => Err(Step::fail(
            "token",
            format!("POST /api/auth/login as {user}: {} invalid_credentials", r.status),
            "the server refused the login: wrong username or password",
            "check both (usernames are lower-case); create an account with POST /api/auth/register or the web app",
        )),
        Ok(r) => Err(Step::fail(
            "token",
            format!("POST /api/auth/login as {user}: {} {}", r.status, r.error_code().unwrap_or_else(|| r.describe())),
            format!("the login failed: {}", r.error_message()),
            "check the username and password, and the server's log",
        )),
        Err(e) => Err(Step::fail(
            "token",
            format!("POST /api/auth/login: {e}"),
            "the login request failed",
            "check the server",
        )),
    }
}

/// `; token: alg HS256, issued 3 min ago, expires in 12 min (…)`, from the token itself.
fn token_facts(local: &Result<JwtInfo, String>, now: i64, skew: Option<f64>) -> String {
    let mut facts = Vec::new();
    if let Ok(info) = local {
        if let Some(alg) = &info.alg {
            facts.push(format!("alg {alg}"));
        }
        if let Some(iat) = info.iat {
            facts.push(format!("issued {}", relative(iat - now)));
        }
        if let Some(exp) = info.exp {
            let at = DateTime::from_timestamp(exp, 0)
                .map(|d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_default();
            let verb = if exp < now { "expired" } else { "expires" };
            facts.push(format!("{verb} {} ({at})", relative(exp - now)));
        }
        if let Some(s) = skew {
            facts.push(format!("times by the server's clock ({s:+.1} s from this machine's)"));
        }
    }
    if facts.is_empty() {
        String::new()
    } else {
        format!("; token: {}", facts.join(", "))
    }
}

/// The token step's verdict when `GET /api/auth/me` refused the token.
fn refused(res: &Resp, local: &Result<JwtInfo, String>, now: i64, facts: &str, api: &Api) -> Step {
    let code = res.error_code().unwrap_or_default();
    let detail = format!("GET /api/auth/me answered {} {code}{facts}", res.status);
    match (code.as_str(), local) {
        ("token_expired", _) => {
            let when = match local {
                Ok(JwtInfo { exp: Some(exp), iat, .. }) => {
                    let life = iat.map(|i| format!("; such tokens live {}", human(Duration::from_secs((exp - i).max(0) as u64)))).unwrap_or_default();
                    format!(" {}{life}", relative(exp - now))
                }
                _ => String::new(),
            };
            Step::fail(
                "token",
                detail,
                format!("the access token expired{when}"),
                "log in again (POST /api/auth/login) or refresh it (POST /api/auth/refresh); clients should refresh before `exp`",
            )
        }
        (_, Err(what)) => Step::fail(
            "token",
            detail,
            format!("the token is malformed: {what}"),
            "pass the whole `access_token` from POST /api/auth/login's answer (three base64url parts joined by dots)",
        ),
        ("invalid_token", Ok(_)) => Step::fail(
            "token",
            detail,
            "the server does not accept the token's signature: it was issued by another natter server, or this server's signing secret (<data-dir>/jwt-secret) changed since",
            format!("log in again against {}", api.target.http_base()),
        ),
        _ => Step::fail("token", detail, format!("the token was refused: {}", res.error_message()), "log in again"),
    }
}

pub(super) async fn bot(api: &Api, given: Option<&str>, user: &Identity, registry: &Registry) -> (Step, BotChoice) {
    let given_id = match given.map(|raw| (raw, Uuid::parse_str(raw.trim()))) {
        Some((raw, Err(_))) => {
            let step = Step::fail(
                "bot",
                format!("{raw:?} is not a bot id"),
                "bot ids are UUIDs; the socket would close with 4400 bad_request",
                "copy the id from GET /api/bots or from the web app's address bar",
            );
            return (step, BotChoice { id: None, accepted: false });
        }
        Some((_, Ok(id))) => Some(id),
        None => None,
    };
    // The socket steps use a given bot id even when this step cannot check it.
    let unchecked = BotChoice { id: given_id, accepted: false };
    let (token, username) = match user {
        Identity::User { token, username } => (token.as_str(), username.as_str()),
        Identity::Nobody => {
            return (Step::skipped("bot", "needs a user (--token or --username/--password)"), unchecked)
        }
        Identity::Unverified { .. } => {
            return (Step::skipped("bot", "needs a valid token (the token step failed)"), unchecked)
        }
    };
    let (id, picked) = match given_id {
        Some(id) => (id, String::new()),
        None => match first_bot(api, token).await {
            Some(first) => first,
            None => {
                let step = Step::skipped("bot", "no --bot given, and this user has no bot to chat with");
                return (step, unchecked);
            }
        },
    };
    let view = api
        .get(&format!("/bots/{id}"), Some(token), None)
        .await
        .ok()
        .filter(|r| r.status == 200)
        .and_then(|r| r.json::<BotView>());
    let about = match &view {
        Some(b) => {
            let engine = b.engine.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
            format!(
                "{picked}{} ({id}): {engine} engine, {}, you are {}",
                b.name,
                b.visibility.as_str(),
                b.my_role.as_str()
            )
        }
        None => format!("{picked}bot {id}"),
    };
    let (step, accepted) = match preflight(api, token, id, &about).await {
        Ok(p) if p.ok => (Step::ok("bot", format!("{about}; preflight: the socket would be accepted")), true),
        Ok(p) => (refusal(p, id, &about, view.as_ref(), username, registry), false),
        Err(step) => (step, false),
    };
    (step, BotChoice { id: Some(id), accepted })
}

/// The first bot this user can chat with, and how the report says it was picked.
async fn first_bot(api: &Api, token: &str) -> Option<(Uuid, String)> {
    let bots = api.get("/bots", Some(token), None).await.ok().and_then(|r| r.json::<Vec<BotView>>())?;
    let first = bots.first()?;
    let picked = match bots.len() {
        1 => "no --bot given; picked this user's only bot: ".to_owned(),
        n => format!("no --bot given; picked the first of this user's {n} bots: "),
    };
    Some((first.id, picked))
}

/// The server's verdict on a socket to this bot; a failed request is the bot step's verdict.
async fn preflight(api: &Api, token: &str, id: Uuid, about: &str) -> Result<Preflight, Step> {
    match api.get(&format!("/ws/preflight/{id}"), Some(token), None).await {
        Ok(r) => r.json::<Preflight>().ok_or_else(|| {
            Step::fail(
                "bot",
                format!("{about}; GET /api/ws/preflight answered {} with {}", r.status, r.describe()),
                "the server has no preflight endpoint (not natter, or an old one)",
                "check the base URL",
            )
        }),
        Err(e) => Err(Step::fail(
            "bot",
            format!("{about}; preflight: {e}"),
            "the preflight request failed",
            "check the server",
        )),
    }
}

/// The bot step's verdict when the preflight says the socket would be closed.
fn refusal(p: Preflight, id: Uuid, about: &str, view: Option<&BotView>, username: &str, registry: &Registry) -> Step {
    let code = p.close_code.unwrap_or(0);
    let reason = p.reason.unwrap_or_default();
    let (cause, mut fix) = registry.explain_close(code, &reason);
    if code == 4403 {
        fix = match view {
            Some(b) => format!("{fix} The owner, {}, can share it: POST /api/bots/{id}/members {{\"username\": \"{username}\", \"role\": \"chat\"}}", b.owner.username),
            None => format!("{fix} The owner can share it with POST /api/bots/{id}/members."),
        };
    }
    Step::fail(
        "bot",
        format!("{about}; preflight: the socket would close with {}: {reason}", registry.close_name(code)),
        cause,
        fix,
    )
}
