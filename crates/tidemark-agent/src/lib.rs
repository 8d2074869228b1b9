//! The agent: runs the schedules of one or more databases, keeps their retention, proves their
//! backups restore, tells people what happened. Design: docs/design/agent.md.

pub mod config;
pub mod cron;
pub mod http;
pub mod jobs;
pub mod locations;
pub mod notify;
pub mod runtime;
pub mod schedule;
pub mod status;
pub mod timeline;
pub mod verify;
mod verify_pg;
pub mod wal;

/// Wait until the stop flag is true (or its sender is gone). Holds no borrow across an await,
/// so the futures that use it stay `Send`.
pub async fn until_stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
