//! Creating accounts: the one place a user comes into being, for registration (REST), the
//! demo data and `natter user create`. The password is hashed in the bounded pool
//! ([`PasswordPool`]), off the async threads.

use crate::domain::{Password, Username};
use crate::passwords::{Busy, PasswordPool};
use crate::store::{NewUser, Store, StoreError, User};

/// Why an account was not created.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The password pool's queue is full: retry shortly.
    #[error("the server is checking too many passwords at once; retry shortly")]
    Busy,
    /// `StoreError::UsernameTaken` when the name is in use.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates a user with a hashed password.
pub async fn create_user(
    passwords: &PasswordPool,
    store: &dyn Store,
    username: Username,
    password: Password,
    is_admin: bool,
) -> Result<User, AccountError> {
    let hash = passwords.hash(password.expose()).await.map_err(|Busy| AccountError::Busy)?;
    Ok(store.create_user(NewUser { username: username.into_inner(), password_hash: hash, is_admin }).await?)
}
