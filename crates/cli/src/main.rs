//! `natter`: the binary. Parses arguments and hands over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod serve;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("natter: {e:#}");
            ExitCode::from(1)
        }
    }
}
