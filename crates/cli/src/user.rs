//! `natter user`: account administration straight on the store (no server needed).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use natter_server::accounts::AccountError;
use natter_server::domain::{Password, Username};
use natter_server::store::StoreError;
use natter_server::Config;

use crate::serve::ServeArgs;

/// Where a command that works on the store finds it: the server's own settings.
#[derive(Args, Debug)]
pub struct StoreArgs {
    /// TOML config file (as for `natter serve`).
    #[arg(long, env = "NATTER_CONFIG", value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Data directory (as for `natter serve`) [default: ./natter-data]
    #[arg(long, env = "NATTER_DATA_DIR", value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Database (as for `natter serve`).
    #[arg(long, env = "NATTER_DATABASE_URL", value_name = "URL", global = true)]
    database_url: Option<String>,
}

impl StoreArgs {
    /// The configuration `natter serve` would run with, for its store settings.
    pub fn resolve(self) -> anyhow::Result<Config> {
        let serve = ServeArgs {
            config: self.config,
            data_dir: self.data_dir,
            database_url: self.database_url,
            ..Default::default()
        };
        Ok(serve.resolve()?.0)
    }
}

#[derive(Args, Debug)]
pub struct UserArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(subcommand)]
    action: UserAction,
}

#[derive(Subcommand, Debug)]
enum UserAction {
    /// Create a user. The password is read from NATTER_PASSWORD, or from standard input.
    Create {
        username: String,
        /// Make the user an admin (sees everyone's connection ledger).
        #[arg(long)]
        admin: bool,
    },
    /// Make an existing user an admin.
    Promote { username: String },
    /// Take admin rights away from a user.
    Demote { username: String },
}

fn read_password() -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("NATTER_PASSWORD") {
        return Ok(p);
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("password: ");
        std::io::stderr().flush().ok();
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line).context("reading the password from standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

pub async fn run(args: UserArgs) -> anyhow::Result<()> {
    let config = args.store.resolve()?;
    // Its message already names the cause (see `serve::run`).
    let store = natter_server::app::open_store(&config).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    match args.action {
        UserAction::Create { username, admin } => {
            let name = Username::parse(&username).map_err(|e| anyhow::anyhow!("{}", e.message))?;
            let password = Password::parse(&read_password()?).map_err(|e| anyhow::anyhow!("{}", e.message))?;
            // The same pool as the server's (one worker: one hash in this one-off process).
            let pool = natter_server::passwords::PasswordPool::new(1, 1);
            match natter_server::accounts::create_user(&pool, &*store, name, password, admin).await {
                Ok(u) => println!("created {}{} ({})", u.username, if admin { ", an admin" } else { "" }, u.id),
                Err(AccountError::Store(StoreError::UsernameTaken)) => {
                    bail!("a user named {username:?} already exists")
                }
                Err(e) => return Err(e.into()),
            }
        }
        UserAction::Promote { username } => set_admin(&*store, &username, true).await?,
        UserAction::Demote { username } => set_admin(&*store, &username, false).await?,
    }
    Ok(())
}

async fn set_admin(store: &dyn natter_server::store::Store, username: &str, admin: bool) -> anyhow::Result<()> {
    match store.set_admin(username, admin).await {
        Ok(()) => {
            println!("{username} is {}an admin", if admin { "now " } else { "no longer " });
            Ok(())
        }
        Err(StoreError::NotFound) => bail!("no user named {username:?}"),
        Err(e) => Err(e.into()),
    }
}
