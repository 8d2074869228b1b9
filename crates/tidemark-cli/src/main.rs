//! The `tidemark` command: parse arguments, run one subcommand, map failures to exit codes.

mod cmd;
mod context;
mod exit;
mod output;
mod targets;

use clap::Parser;

/// Run again with glibc's malloc limited to two arenas, once, before anything else. Restores
/// allocate buffers on decoding threads and free them on writer threads, and glibc kept the
/// freed memory in one arena per thread (up to 16 on two cores): a 1.3 GB physical restore
/// peaked at 141 MB, and at 80 MB with two arenas, at the same speed (docs/benchmarks.md;
/// mimalloc, tried instead, peaked at over 400 MB). glibc reads the setting only at process
/// start, hence the exec; the process, its id and its arguments stay the same. A setting the
/// user made is kept.
fn limit_malloc_arenas() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "MALLOC_ARENA_MAX";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    // Only returns when the exec failed: then run as we are.
    let _ = std::process::Command::new(exe)
        .arg0(arg0)
        .args(args)
        .env(VAR, "2")
        .exec();
}

fn main() {
    limit_malloc_arenas();
    let cli = cmd::Cli::parse();
    // A server says what it does: the agent logs at info unless told otherwise.
    let server = matches!(cli.command, cmd::Command::Agent(_));
    let filter = match (cli.global.quiet, cli.global.verbose) {
        (true, _) => "error",
        (_, 0) if server => "info",
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
            eprintln!("tidemark: {}", exit::message(&e));
            if let Some(hint) = hint {
                eprintln!("hint: {hint}");
            }
            std::process::exit(code);
        }
    }
}
