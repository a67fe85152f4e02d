//! `/api/bots/*`: bots, their members, and the caller's conversation history.
//!
//! Who may do what: anyone with a role (owner, admin, chat member, anyone on a public bot)
//! may view a bot, chat with it and read their own history; the owner and admins may edit
//! it and manage members; only the owner may delete it. A member may remove themselves.
//! Engine settings (URLs, model, system prompt…) are shown to the owner and admins only;
//! others see the engine's kind. Being a site admin gives no role on other users' bots.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use natter_proto::api::{AddMember, BotRef, BotRole, BotView, CreateBot, MemberView, MessagesPage, UpdateBot, UserRef};
use natter_proto::ErrorCode;
use serde::Deserialize;
use uuid::Uuid;

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiPath, ApiQuery, AuthUser};
use crate::bots::EngineSpec;
use crate::bus::ConvEvent;
use crate::domain::{bot_description, bot_name, Username};
use crate::state::AppState;
use crate::store::{Bot, BotChanges, NewBot};

pub fn bot_view(bot: &Bot, role: BotRole) -> BotView {
    let engine =
        if role >= BotRole::Admin { EngineSpec::public_view(&bot.engine) } else { EngineSpec::kind_only(&bot.engine) };
    BotView {
        id: bot.id,
        name: bot.name.clone(),
        description: bot.description.clone(),
        visibility: bot.visibility,
        engine,
        owner: UserRef { id: bot.owner_id, username: bot.owner_username.clone() },
        my_role: role,
        created_at: bot.created_at,
        updated_at: bot.updated_at,
    }
}

/// Tells every socket of these conversations that their bot changed: each re-checks its
/// access (closing with 4403 or 4404 when it is gone) and reloads the bot's engine.
async fn announce_bot_changed(state: &AppState, conversations: Vec<Uuid>) {
    for conv in conversations {
        if let Err(e) = state.bus.publish(conv, ConvEvent::BotChanged).await {
            tracing::warn!(conversation_id = %conv, error = %e, "announcing a bot change failed");
        }
    }
}

async fn announce(state: &AppState, bot_id: Uuid) -> ApiResult<()> {
    state.access.forget_bot(bot_id);
    let conversations = state.store.conversations_of_bot(bot_id).await?;
    announce_bot_changed(state, conversations).await;
    Ok(())
}

pub fn bot_ref(bot: &Bot) -> BotRef {
    BotRef { id: bot.id, name: bot.name.clone() }
}

/// Loads a bot and the caller's role: 404 if it does not exist, 403 if the caller has no role
/// or less than `needed`.
async fn bot_with_role(
    state: &AppState,
    id: Uuid,
    user: &AuthUser,
    needed: BotRole,
    action: &str,
) -> ApiResult<(Bot, BotRole)> {
    let bot = state.store.bot(id).await?.ok_or_else(|| ApiError::not_found(format!("no bot with id {id}")))?;
    let role = state.store.bot_role(&bot, user.id).await?;
    match role {
        Some(r) if r >= needed => Ok((bot, r)),
        Some(_) => Err(ApiError::forbidden(format!("you may not {action} this bot"))),
        None => Err(ApiError::forbidden("this bot is private and not shared with you")),
    }
}

/// Validates engine settings on the blocking pool: compiling a rule set's regexes takes up to
/// some tens of milliseconds, too long for an async worker.
async fn parse_engine(v: serde_json::Value) -> ApiResult<serde_json::Value> {
    let parsed = tokio::task::spawn_blocking(move || EngineSpec::parse(&v))
        .await
        .map_err(|e| ApiError::internal(format!("validating engine settings: {e}")))?;
    Ok(parsed?.to_stored())
}

/// A validated engine's URL against the egress policy of the bot's owner.
async fn check_egress(state: &AppState, owner_id: Uuid, engine: &serde_json::Value) -> ApiResult<()> {
    let admin = crate::bots::egress::user_is_admin(&*state.store, owner_id).await;
    Ok(state.replier.egress().policy().check_engine(engine, admin)?)
}

#[utoipa::path(get, path = "/api/bots", tag = "bots", security(("bearer" = [])),
    responses((status = 200, body = Vec<BotView>, description = "Bots the caller owns, is a member of, or that are public")))]
pub async fn list(State(state): State<AppState>, user: AuthUser) -> ApiResult<Json<Vec<BotView>>> {
    let bots = state.store.bots_for_user(user.id).await?;
    Ok(Json(bots.iter().map(|(b, r)| bot_view(b, *r)).collect()))
}

#[utoipa::path(post, path = "/api/bots", tag = "bots", security(("bearer" = [])), request_body = CreateBot,
    responses((status = 201, body = BotView), (status = 400, body = natter_proto::api::ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    ApiJson(body): ApiJson<CreateBot>,
) -> ApiResult<(StatusCode, Json<BotView>)> {
    let engine = match &body.engine {
        Some(e) => parse_engine(e.clone()).await?,
        None => EngineSpec::Echo(Default::default()).to_stored(),
    };
    check_egress(&state, user.id, &engine).await?;
    let bot = state
        .store
        .create_bot(NewBot {
            owner_id: user.id,
            name: bot_name(&body.name)?,
            description: bot_description(body.description.as_deref().unwrap_or(""))?,
            visibility: body.visibility.unwrap_or_default(),
            engine,
        })
        .await?;
    tracing::info!(bot_id = %bot.id, user_id = %user.id, "bot created");
    Ok((StatusCode::CREATED, Json(bot_view(&bot, BotRole::Owner))))
}

#[utoipa::path(get, path = "/api/bots/{id}", tag = "bots", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = BotView), (status = 403, body = natter_proto::api::ErrorBody), (status = 404, body = natter_proto::api::ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    user: AuthUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<BotView>> {
    let (bot, role) = bot_with_role(&state, id, &user, BotRole::Public, "view").await?;
    Ok(Json(bot_view(&bot, role)))
}

#[utoipa::path(patch, path = "/api/bots/{id}", tag = "bots", security(("bearer" = [])), params(("id" = Uuid, Path)), request_body = UpdateBot,
    responses((status = 200, body = BotView), (status = 400, body = natter_proto::api::ErrorBody), (status = 403, body = natter_proto::api::ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    user: AuthUser,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateBot>,
) -> ApiResult<Json<BotView>> {
    let (current, role) = bot_with_role(&state, id, &user, BotRole::Admin, "edit").await?;
    // Secrets are write-only: an engine update that leaves them out keeps the stored ones.
    let engine = body.engine.map(|mut e| {
        EngineSpec::keep_secrets(&mut e, &current.engine);
        e
    });
    let engine = match engine {
        Some(e) => Some(parse_engine(e).await?),
        None => None,
    };
    let changes = BotChanges {
        name: body.name.as_deref().map(bot_name).transpose()?,
        description: body.description.as_deref().map(bot_description).transpose()?,
        visibility: body.visibility,
        engine,
    };
    if let Some(engine) = &changes.engine {
        check_egress(&state, current.owner_id, engine).await?;
    }
    let bot = state.store.update_bot(id, changes).await?;
    announce(&state, id).await?;
    Ok(Json(bot_view(&bot, role)))
}

#[utoipa::path(delete, path = "/api/bots/{id}", tag = "bots", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 204, description = "Deleted, with its conversations"), (status = 403, body = natter_proto::api::ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    user: AuthUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    bot_with_role(&state, id, &user, BotRole::Owner, "delete").await?;
    // The conversations go with the bot: note them first, to tell their sockets.
    let conversations = state.store.conversations_of_bot(id).await?;
    state.store.delete_bot(id).await?;
    state.access.forget_bot(id);
    announce_bot_changed(&state, conversations).await;
    tracing::info!(bot_id = %id, user_id = %user.id, "bot deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/bots/{id}/members", tag = "bots", security(("bearer" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = Vec<MemberView>)))]
pub async fn members(
    State(state): State<AppState>,
    user: AuthUser,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<MemberView>>> {
    bot_with_role(&state, id, &user, BotRole::Admin, "see the members of").await?;
    let members = state.store.members(id).await?;
    Ok(Json(
        members
            .into_iter()
            .map(|m| MemberView { user: UserRef { id: m.user_id, username: m.username }, role: m.role })
            .collect(),
    ))
}

#[utoipa::path(post, path = "/api/bots/{id}/members", tag = "bots", security(("bearer" = [])), params(("id" = Uuid, Path)), request_body = AddMember,
    responses((status = 200, body = MemberView, description = "Added, or role changed"), (status = 404, body = natter_proto::api::ErrorBody), (status = 409, body = natter_proto::api::ErrorBody)))]
pub async fn add_member(
    State(state): State<AppState>,
    user: AuthUser,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<AddMember>,
) -> ApiResult<Json<MemberView>> {
    let (bot, _) = bot_with_role(&state, id, &user, BotRole::Admin, "manage the members of").await?;
    let member = state.store.user_by_username(&body.username).await?.ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, ErrorCode::UserNotFound, format!("no user named {:?}", body.username))
    })?;
    if member.id == bot.owner_id {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::Conflict,
            "the owner already has every right on the bot",
        ));
    }
    state.store.upsert_member(id, member.id, body.role).await?;
    // A role changed: admission asks the store again (a new member had nothing to remember).
    state.access.forget_bot(id);
    Ok(Json(MemberView { user: UserRef { id: member.id, username: member.username }, role: body.role }))
}

#[utoipa::path(delete, path = "/api/bots/{id}/members/{username}", tag = "bots", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("username" = String, Path)),
    responses((status = 204, description = "Removed"), (status = 404, body = natter_proto::api::ErrorBody)))]
pub async fn remove_member(
    State(state): State<AppState>,
    user: AuthUser,
    ApiPath((id, username)): ApiPath<(Uuid, String)>,
) -> ApiResult<StatusCode> {
    // A member may always leave; otherwise only the owner and admins manage members.
    let needed = if username == user.username { BotRole::Public } else { BotRole::Admin };
    bot_with_role(&state, id, &user, needed, "manage the members of").await?;
    // A name no user can have (a NUL, say) is not looked up.
    let known = match Username::parse(&username) {
        Ok(_) => state.store.user_by_username(&username).await?,
        Err(_) => None,
    };
    let member = known.ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, ErrorCode::UserNotFound, format!("no user named {username:?}"))
    })?;
    if !state.store.remove_member(id, member.id).await? {
        return Err(ApiError::not_found(format!("{username:?} is not a member of this bot")));
    }
    announce(&state, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct MessagesQuery {
    /// Messages with seq greater than this (default 0).
    pub after_seq: Option<i64>,
    /// Instead: the newest messages with seq less than this (for scrolling back).
    pub before_seq: Option<i64>,
    /// 1 to 500, default 50.
    pub limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/bots/{id}/messages", tag = "bots", security(("bearer" = [])),
    params(("id" = Uuid, Path), MessagesQuery),
    responses((status = 200, body = MessagesPage), (status = 400, body = natter_proto::api::ErrorBody)))]
pub async fn messages(
    State(state): State<AppState>,
    user: AuthUser,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<MessagesQuery>,
) -> ApiResult<Json<MessagesPage>> {
    let bad = |m: &str| ApiError::bad_request(ErrorCode::InvalidQuery, m);
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(bad("limit must be between 1 and 500"));
    }
    if q.after_seq.is_some() && q.before_seq.is_some() {
        return Err(bad("give after_seq or before_seq, not both"));
    }
    if q.after_seq.is_some_and(|s| s < 0) || q.before_seq.is_some_and(|s| s < 1) {
        return Err(bad("after_seq must be >= 0 and before_seq >= 1"));
    }
    bot_with_role(&state, id, &user, BotRole::Public, "read").await?;
    let conv = state.store.conversation(user.id, id).await?;
    let mut msgs = match q.before_seq {
        Some(before) => state.store.messages_before(conv.id, before, limit + 1).await?,
        None => state.store.messages_after(conv.id, q.after_seq.unwrap_or(0), limit + 1).await?,
    };
    let has_more = msgs.len() > limit as usize;
    if has_more {
        if q.before_seq.is_some() {
            msgs.remove(0);
        } else {
            msgs.truncate(limit as usize);
        }
    }
    Ok(Json(MessagesPage { messages: msgs, last_seq: conv.last_seq, has_more }))
}
