//! The `tidemark` command: parse arguments, run one subcommand, map failures to exit codes.

mod cmd;
mod context;
mod exit;
mod output;
mod targets;

use clap::Parser;

fn main() {
    let cli = cmd::Cli::parse();
    let filter = match (cli.global.quiet, cli.global.verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDEMARK_LOG")
                .unwrap_or_else(|_| filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tidemark: failed to start the async runtime: {e}");
            std::process::exit(exit::FAILURE);
        }
    };
    let result = runtime.block_on(cmd::run(cli));
    // Background tasks (lock refreshers) must not outlive the command.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => std::process::exit(code),
        // `tidemark dump … | head` closing the pipe early is the reader's choice, not a failure.
        Err(e) if exit::is_broken_pipe(&e) => std::process::exit(exit::OK),
        Err(e) => {
            let (code, hint) = exit::classify(&e);
            eprintln!("tidemark: {}", exit::one_line(&e));
            if let Some(hint) = hint {
                eprintln!("hint: {hint}");
            }
            std::process::exit(code);
        }
    }
}
