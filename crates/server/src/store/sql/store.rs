//! [`Store`] for both SQL stores: users, refresh tokens, bots and members, conversations and
//! messages, tickets and the connection ledger.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use natter_proto::api::{BotRole, ConnectionRecord, MemberRole};
use natter_proto::WireMessage;
use sqlx::{Encode, Executor, Type};
use uuid::Uuid;

use super::super::rows::*;
use super::super::*;
use super::{in_tx, Dialect, RowsAffected, SqlAppend, SqlCoordination};

/// The bound on `S::Db` lists the values bound as they are: sqlx implements `Encode` for each
/// backend by name, so generic code names the types it binds.
#[async_trait]
impl<S> Store for S
where
    S: SqlAppend + SqlCoordination,
    for<'q> &'q str: Encode<'q, S::Db> + Type<S::Db>,
    for<'q> Option<&'q str>: Encode<'q, S::Db>,
    for<'q> i64: Encode<'q, S::Db> + Type<S::Db>,
    for<'q> Option<i64>: Encode<'q, S::Db>,
    for<'q> Option<<S::Db as Dialect>::Id>: Encode<'q, S::Db>,
    for<'q> Option<<S::Db as Dialect>::Code>: Encode<'q, S::Db>,
{
    async fn ping(&self) -> StoreResult<()> {
        if !self.appending() {
            return Err(StoreError::Backend("the message appender has stopped".into()));
        }
        sqlx::query("SELECT 1").execute(self.pinger()).await?;
        Ok(())
    }

    async fn close(&self) {
        self.close_appender().await;
        // Closing the writer last lets SQLite checkpoint the WAL into the main file.
        self.health_pool().close().await;
        self.read_pool().close().await;
        self.write_pool().close().await;
    }

    async fn create_user(&self, user: NewUser) -> StoreResult<User> {
        let id = Uuid::new_v4();
        let now = millis(Utc::now());
        let res = sqlx::query(
            "INSERT INTO users (id, username, password_hash, is_admin, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(S::Db::id_param(id))
        .bind(user.username.as_str())
        .bind(user.password_hash.as_str())
        .bind(S::Db::flag_param(user.is_admin))
        .bind(now)
        .execute(self.writer())
        .await;
        match res {
            Ok(_) => Ok(User {
                id,
                username: user.username,
                password_hash: user.password_hash,
                is_admin: user.is_admin,
                created_at: from_millis(now),
            }),
            Err(e) if is_unique_violation(&e) => Err(StoreError::UsernameTaken),
            Err(e) => Err(e.into()),
        }
    }

    async fn user_by_username(&self, username: &str) -> StoreResult<Option<User>> {
        let row =
            sqlx::query("SELECT * FROM users WHERE username = $1").bind(username).fetch_optional(self.reader()).await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<User>> {
        let row = sqlx::query("SELECT * FROM users WHERE id = $1")
            .bind(S::Db::id_param(id))
            .fetch_optional(self.reader())
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn set_admin(&self, username: &str, is_admin: bool) -> StoreResult<()> {
        let res = sqlx::query("UPDATE users SET is_admin = $1 WHERE username = $2")
            .bind(S::Db::flag_param(is_admin))
            .bind(username)
            .execute(self.writer())
            .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn insert_refresh_token(&self, t: NewRefreshToken) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, user_id, family_id, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(t.token_hash.as_str())
        .bind(S::Db::id_param(t.user_id))
        .bind(S::Db::id_param(t.family_id))
        .bind(millis(Utc::now()))
        .bind(millis(t.expires_at))
        .execute(self.writer())
        .await?;
        Ok(())
    }

    async fn use_refresh_token(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<RefreshUse> {
        let mut tx = self.begin_write().await?;
        // Locked (on PostgreSQL): two nodes presenting the same token at once see it one after
        // the other.
        let sql = format!(
            "SELECT user_id, family_id, expires_at, used_at, revoked_at FROM refresh_tokens WHERE token_hash = $1{}",
            S::Db::FOR_UPDATE
        );
        let row = sqlx::query(&sql).bind(token_hash).fetch_optional(in_tx(&mut tx)).await?;
        let Some(row) = row else { return Ok(RefreshUse::Invalid) };
        let family_id = row.id("family_id")?;
        match token_verdict(row.opt_int("used_at")?, row.opt_int("revoked_at")?, row.int("expires_at")?, millis(now)) {
            TokenVerdict::Reused => {
                sqlx::query("UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE family_id = $2")
                    .bind(millis(now))
                    .bind(S::Db::id_param(family_id))
                    .execute(in_tx(&mut tx))
                    .await?;
                tx.commit().await?;
                return Ok(RefreshUse::Reused { family_id });
            }
            TokenVerdict::Dead => return Ok(RefreshUse::Invalid),
            TokenVerdict::Fresh => {}
        }
        sqlx::query("UPDATE refresh_tokens SET used_at = $1 WHERE token_hash = $2")
            .bind(millis(now))
            .bind(token_hash)
            .execute(in_tx(&mut tx))
            .await?;
        tx.commit().await?;
        Ok(RefreshUse::Valid { user_id: row.id("user_id")?, family_id })
    }

    async fn revoke_refresh_token(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<Uuid>> {
        let row = sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = COALESCE(revoked_at, $1) \
             WHERE family_id = (SELECT family_id FROM refresh_tokens WHERE token_hash = $2) RETURNING family_id",
        )
        .bind(millis(now))
        .bind(token_hash)
        .fetch_optional(self.writer())
        .await?;
        row.as_ref().map(|r| r.id("family_id")).transpose()
    }

    async fn revoked_families(&self, since: DateTime<Utc>) -> StoreResult<Vec<Uuid>> {
        let rows = sqlx::query("SELECT DISTINCT family_id FROM refresh_tokens WHERE revoked_at >= $1")
            .bind(millis(since))
            .fetch_all(self.reader())
            .await?;
        rows.iter().map(|r| r.id("family_id")).collect()
    }

    async fn create_bot(&self, bot: NewBot) -> StoreResult<Bot> {
        let id = Uuid::new_v4();
        let now = millis(Utc::now());
        let engine = bot.engine.to_string();
        sqlx::query(
            "INSERT INTO bots (id, owner_id, name, description, visibility, engine, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(S::Db::id_param(id))
        .bind(S::Db::id_param(bot.owner_id))
        .bind(bot.name.as_str())
        .bind(bot.description.as_str())
        .bind(bot.visibility.as_str())
        .bind(engine.as_str())
        .bind(now)
        .bind(now)
        .execute(self.writer())
        .await?;
        bot_on::<S::Db>(self.writer(), id).await?.ok_or(StoreError::NotFound)
    }

    async fn bot(&self, id: Uuid) -> StoreResult<Option<Bot>> {
        bot_on::<S::Db>(self.reader(), id).await
    }

    async fn update_bot(&self, id: Uuid, c: BotChanges) -> StoreResult<Bot> {
        let engine = c.engine.map(|e| e.to_string());
        let res = sqlx::query(
            "UPDATE bots SET name = COALESCE($1, name), description = COALESCE($2, description), \
             visibility = COALESCE($3, visibility), engine = COALESCE($4, engine), updated_at = $5 WHERE id = $6",
        )
        .bind(c.name.as_deref())
        .bind(c.description.as_deref())
        .bind(c.visibility.map(|v| v.as_str()))
        .bind(engine.as_deref())
        .bind(millis(Utc::now()))
        .bind(S::Db::id_param(id))
        .execute(self.writer())
        .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        bot_on::<S::Db>(self.writer(), id).await?.ok_or(StoreError::NotFound)
    }

    async fn delete_bot(&self, id: Uuid) -> StoreResult<()> {
        let res =
            sqlx::query("DELETE FROM bots WHERE id = $1").bind(S::Db::id_param(id)).execute(self.writer()).await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn bots_for_user(&self, user_id: Uuid) -> StoreResult<Vec<(Bot, BotRole)>> {
        let sql = format!(
            "SELECT {BOT_COLS}, m.role AS member_role FROM {BOTS} \
             LEFT JOIN bot_members m ON m.bot_id = b.id AND m.user_id = $1 \
             WHERE b.owner_id = $1 OR m.user_id IS NOT NULL OR b.visibility = 'public' \
             ORDER BY b.created_at, b.id"
        );
        let rows = sqlx::query(&sql).bind(S::Db::id_param(user_id)).fetch_all(self.reader()).await?;
        rows.iter()
            .map(|row| {
                let bot = bot_from_row(row)?;
                let member = row.opt_text("member_role")?;
                let role = role_of(&bot, user_id, member.as_deref().map(member_role)).unwrap_or(BotRole::Public);
                Ok((bot, role))
            })
            .collect()
    }

    async fn bot_role(&self, bot: &Bot, user_id: Uuid) -> StoreResult<Option<BotRole>> {
        if bot.owner_id == user_id {
            return Ok(Some(BotRole::Owner));
        }
        let row = sqlx::query("SELECT role FROM bot_members WHERE bot_id = $1 AND user_id = $2")
            .bind(S::Db::id_param(bot.id))
            .bind(S::Db::id_param(user_id))
            .fetch_optional(self.reader())
            .await?;
        let member = row.map(|r| r.text("role")).transpose()?;
        Ok(role_of(bot, user_id, member.as_deref().map(member_role)))
    }

    async fn upsert_member(&self, bot_id: Uuid, user_id: Uuid, role: MemberRole) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO bot_members (bot_id, user_id, role, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (bot_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(S::Db::id_param(bot_id))
        .bind(S::Db::id_param(user_id))
        .bind(BotRole::from(role).as_str())
        .bind(millis(Utc::now()))
        .execute(self.writer())
        .await?;
        Ok(())
    }

    async fn remove_member(&self, bot_id: Uuid, user_id: Uuid) -> StoreResult<bool> {
        let res = sqlx::query("DELETE FROM bot_members WHERE bot_id = $1 AND user_id = $2")
            .bind(S::Db::id_param(bot_id))
            .bind(S::Db::id_param(user_id))
            .execute(self.writer())
            .await?;
        Ok(res.rows_affected() > 0)
    }

    async fn members(&self, bot_id: Uuid) -> StoreResult<Vec<Member>> {
        let rows = sqlx::query(
            "SELECT m.user_id, u.username, m.role FROM bot_members m JOIN users u ON u.id = m.user_id \
             WHERE m.bot_id = $1 ORDER BY u.username",
        )
        .bind(S::Db::id_param(bot_id))
        .fetch_all(self.reader())
        .await?;
        rows.iter().map(member_from_row).collect()
    }

    async fn conversations_of_bot(&self, bot_id: Uuid) -> StoreResult<Vec<Uuid>> {
        let rows = sqlx::query("SELECT id FROM conversations WHERE bot_id = $1")
            .bind(S::Db::id_param(bot_id))
            .fetch_all(self.reader())
            .await?;
        rows.iter().map(|r| r.id("id")).collect()
    }

    async fn conversation(&self, user_id: Uuid, bot_id: Uuid) -> StoreResult<Conversation> {
        const FIND: &str = "SELECT id, last_seq FROM conversations WHERE user_id = $1 AND bot_id = $2";
        let (user, bot) = (S::Db::id_param(user_id), S::Db::id_param(bot_id));
        if let Some(row) = sqlx::query(FIND).bind(user).bind(bot).fetch_optional(self.reader()).await? {
            return Ok(Conversation { id: row.id("id")?, user_id, bot_id, last_seq: row.int("last_seq")? });
        }
        sqlx::query(
            "INSERT INTO conversations (id, user_id, bot_id, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (user_id, bot_id) DO NOTHING",
        )
        .bind(S::Db::id_param(Uuid::new_v4()))
        .bind(S::Db::id_param(user_id))
        .bind(S::Db::id_param(bot_id))
        .bind(millis(Utc::now()))
        .execute(self.writer())
        .await?;
        let (user, bot) = (S::Db::id_param(user_id), S::Db::id_param(bot_id));
        let row = sqlx::query(FIND).bind(user).bind(bot).fetch_one(self.writer()).await?;
        Ok(Conversation { id: row.id("id")?, user_id, bot_id, last_seq: row.int("last_seq")? })
    }

    async fn append_message(&self, m: NewMessage) -> StoreResult<Appended> {
        SqlAppend::append_message(self, m).await
    }

    async fn append_answered(&self, m: NewMessage, reply: NewMessage) -> StoreResult<AppendedPair> {
        SqlAppend::append_answered(self, m, reply).await
    }

    async fn messages_after(&self, conversation_id: Uuid, after_seq: i64, limit: u32) -> StoreResult<Vec<WireMessage>> {
        let sql =
            format!("SELECT {MSG_COLS} FROM messages WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3");
        let rows = sqlx::query(&sql)
            .bind(S::Db::id_param(conversation_id))
            .bind(after_seq)
            .bind(limit as i64)
            .fetch_all(self.reader())
            .await?;
        rows.iter().map(message_from_row).collect()
    }

    async fn messages_before(
        &self,
        conversation_id: Uuid,
        before_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<WireMessage>> {
        let sql = format!(
            "SELECT {MSG_COLS} FROM messages WHERE conversation_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(S::Db::id_param(conversation_id))
            .bind(before_seq)
            .bind(limit as i64)
            .fetch_all(self.reader())
            .await?;
        let mut msgs = rows.iter().map(message_from_row).collect::<StoreResult<Vec<_>>>()?;
        msgs.reverse();
        Ok(msgs)
    }

    async fn create_ticket(
        &self,
        ticket_hash: &str,
        user_id: Uuid,
        bot_id: Uuid,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        // Expired tickets are swept as new ones are made, so the table stays small.
        sqlx::query("DELETE FROM ws_tickets WHERE expires_at <= $1")
            .bind(millis(Utc::now()))
            .execute(in_tx(&mut tx))
            .await?;
        sqlx::query("INSERT INTO ws_tickets (ticket_hash, user_id, bot_id, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(ticket_hash)
            .bind(S::Db::id_param(user_id))
            .bind(S::Db::id_param(bot_id))
            .bind(millis(expires_at))
            .execute(in_tx(&mut tx))
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn consume_ticket(&self, ticket_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<(Uuid, Uuid)>> {
        let row = sqlx::query("DELETE FROM ws_tickets WHERE ticket_hash = $1 RETURNING user_id, bot_id, expires_at")
            .bind(ticket_hash)
            .fetch_optional(self.writer())
            .await?;
        let Some(row) = row else { return Ok(None) };
        if row.int("expires_at")? <= millis(now) {
            return Ok(None);
        }
        Ok(Some((row.id("user_id")?, row.id("bot_id")?)))
    }

    async fn peek_ticket(&self, ticket_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<(Uuid, Uuid)>> {
        let row = sqlx::query("SELECT user_id, bot_id FROM ws_tickets WHERE ticket_hash = $1 AND expires_at > $2")
            .bind(ticket_hash)
            .bind(millis(now))
            .fetch_optional(self.reader())
            .await?;
        row.map(|row| Ok((row.id("user_id")?, row.id("bot_id")?))).transpose()
    }

    async fn record_connections(&self, rows: &[ConnectionRecord]) -> StoreResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "INSERT INTO connections ({LEDGER_COLS}) VALUES ({LEDGER_PARAMS}) \
             ON CONFLICT (connection_id) DO UPDATE SET {LEDGER_UPDATE}"
        );
        let mut tx = self.begin_write().await?;
        for r in rows {
            let id = S::Db::id_param;
            sqlx::query(&sql)
                .bind(id(r.connection_id))
                .bind(id(r.attempt_id))
                .bind(r.user_id.map(id))
                .bind(r.bot_id.map(id))
                .bind(r.remote_addr.as_deref())
                .bind(r.user_agent.as_deref())
                .bind(r.origin.as_deref())
                .bind(r.upgrade.as_deref())
                .bind(r.connection.as_deref())
                .bind(r.sec_websocket_version.as_deref())
                .bind(r.forwarded_for.as_deref())
                .bind(millis(r.started_at))
                .bind(S::Db::flag_param(r.established))
                .bind(r.ended_at.map(millis))
                .bind(r.close_code.map(S::Db::code_param))
                .bind(r.close_reason.as_deref())
                .bind(r.closed_by.map(|c| c.as_str()))
                .bind(r.msgs_in as i64)
                .bind(r.msgs_out as i64)
                .bind(r.bytes_in as i64)
                .bind(r.bytes_out as i64)
                .bind(r.trace_id.as_deref())
                .bind(r.transport.as_str())
                .execute(in_tx(&mut tx))
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn connections(
        &self,
        user_id: Option<Uuid>,
        bot_id: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<ConnectionRecord>> {
        let sql = format!(
            "SELECT {LEDGER_COLS} FROM connections WHERE ($1 IS NULL OR user_id = $1) AND ($2 IS NULL OR bot_id = $2) \
             ORDER BY started_at DESC, connection_id LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(user_id.map(S::Db::id_param))
            .bind(bot_id.map(S::Db::id_param))
            .bind(limit as i64)
            .fetch_all(self.reader())
            .await?;
        rows.iter().map(ledger_from_row).collect()
    }

    async fn connection(&self, attempt_id: Uuid, user_id: Option<Uuid>) -> StoreResult<Option<ConnectionRecord>> {
        let sql = format!(
            "SELECT {LEDGER_COLS} FROM connections WHERE (attempt_id = $1 OR connection_id = $1) \
             AND ($2 IS NULL OR user_id = $2) ORDER BY started_at DESC LIMIT 1"
        );
        let row = sqlx::query(&sql)
            .bind(S::Db::id_param(attempt_id))
            .bind(user_id.map(S::Db::id_param))
            .fetch_optional(self.reader())
            .await?;
        row.as_ref().map(ledger_from_row).transpose()
    }

    async fn prune_connections(&self, older_than: DateTime<Utc>, keep: u64) -> StoreResult<u64> {
        let mut tx = self.begin_write().await?;
        let old = sqlx::query("DELETE FROM connections WHERE started_at < $1")
            .bind(millis(older_than))
            .execute(in_tx(&mut tx))
            .await?;
        // No upper limit: a LIMIT both dialects take (SQLite has no OFFSET without LIMIT).
        let over = sqlx::query(
            "DELETE FROM connections WHERE connection_id IN \
             (SELECT connection_id FROM connections ORDER BY started_at DESC, connection_id LIMIT $2 OFFSET $1)",
        )
        .bind(keep as i64)
        .bind(i64::MAX)
        .execute(in_tx(&mut tx))
        .await?;
        tx.commit().await?;
        Ok(old.rows_affected() + over.rows_affected())
    }
}

/// A bot with its owner's name, read with `e` (the writer, to read back what it wrote).
async fn bot_on<'e, D: Dialect>(e: impl Executor<'e, Database = D>, id: Uuid) -> StoreResult<Option<Bot>> {
    let sql = format!("SELECT {BOT_COLS} FROM {BOTS} WHERE b.id = $1");
    let row = sqlx::query(&sql).bind(D::id_param(id)).fetch_optional(e).await?;
    row.as_ref().map(bot_from_row).transpose()
}
