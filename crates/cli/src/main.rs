//! `natter`: the binary. Parses arguments and hands over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod backup;
mod bench;
mod doctor;
mod serve;
mod sse_events;
mod user;

#[derive(Parser)]
#[command(name = "natter", version, about = "Self-hosted real-time chat server for bots")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: REST API, chat gateway and web app.
    Serve(Box<serve::ServeArgs>),
    /// Find out why a chat connection fails: check every layer and name the broken one.
    Doctor(Box<doctor::DoctorArgs>),
    /// Manage accounts: create users, make admins.
    User(user::UserArgs),
    /// Copy a SQLite database to a file, consistently, while the server runs.
    Backup(backup::BackupArgs),
    /// Put a backup in place of the SQLite database (the server must be stopped).
    Restore(backup::RestoreArgs),
    /// Measure a server: connect, idle, chat, fanout and storm (restart) scenarios.
    Bench(Box<bench::BenchArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Fairness between sockets: one poll of the IO driver can wake more tasks than a worker's
    // local queue holds (256); the rest go to the shared queue, which a worker otherwise
    // looks at only every 61 ticks. Under load those tasks starved for ~300 ms (chat p50 3 ms
    // but p99 340 ms at 1 000 sockets). Taking from the shared queue every second tick keeps
    // the order close to FIFO (p99 67 ms). Every tick (1) starves the local queue instead:
    // some sockets then waited over 10 s — docs/performance.md.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .global_queue_interval(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await.map(|()| ExitCode::SUCCESS),
            Command::Doctor(args) => Ok(doctor::run(*args).await),
            Command::User(args) => user::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Backup(args) => backup::backup(args).await.map(|()| ExitCode::SUCCESS),
            Command::Restore(args) => backup::restore(args).await.map(|()| ExitCode::SUCCESS),
            Command::Bench(args) => bench::run(*args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("natter: {e:#}");
            ExitCode::from(1)
        }
    }
}
