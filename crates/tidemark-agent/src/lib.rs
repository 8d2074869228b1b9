//! The agent: runs the schedules of one or more databases, keeps their retention, proves their
//! backups restore, tells people what happened. Design: docs/design/agent.md.

pub mod config;
pub mod cron;
