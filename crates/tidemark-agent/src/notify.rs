//! Notifications: a generic JSON webhook and Slack's incoming-webhook format, for failures,
//! recoveries, verification failures and the dead man's switch. Messages are deduplicated and
//! rate-limited per channel, database and event, delivered by one background task with retries,
//! and never block a backup. Webhook URLs are secrets: read from files, never logged (reqwest's
//! errors are stripped of the URL).

use std::collections::BTreeMap;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::config::{Config, NotifierKind};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A backup failed after all its retries.
    BackupFailed,
    /// A backup succeeded after the previous one of its kind had failed.
    BackupRecovered,
    /// A verification restore failed.
    VerificationFailed,
    /// No backup of the database succeeded for longer than `alert_after`.
    NoRecentBackup,
    /// A location of the repository missed a backup the others took.
    LocationFailed,
}

/// One event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// What happened.
    pub event: EventKind,
    /// The database's name in the config.
    pub database: String,
    /// The kind of backup, when it concerns one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// One line for people.
    pub message: String,
    /// When.
    pub time: DateTime<Utc>,
    /// The host the agent runs on.
    pub host: String,
    /// Messages like this one dropped by the rate limit since the last one sent.
    pub suppressed: u32,
}

impl Event {
    /// An event now.
    pub fn new(event: EventKind, database: &str, kind: Option<&str>, message: String) -> Event {
        Event {
            event,
            database: database.to_owned(),
            kind: kind.map(str::to_owned),
            message,
            time: Utc::now(),
            host: tidemark_repo::key::hostname(),
            suppressed: 0,
        }
    }

    fn title(&self) -> &'static str {
        match self.event {
            EventKind::BackupFailed => ":red_circle: backup failed",
            EventKind::BackupRecovered => ":large_green_circle: backup recovered",
            EventKind::VerificationFailed => ":red_circle: verification restore failed",
            EventKind::NoRecentBackup => ":warning: no recent backup",
            EventKind::LocationFailed => ":warning: a backup location missed a backup",
        }
    }

    /// Slack's incoming-webhook body.
    pub fn slack(&self) -> serde_json::Value {
        let mut text = format!(
            "*{}*: database `{}`{} on {}\n{}",
            self.title(),
            self.database,
            self.kind
                .as_deref()
                .map(|k| format!(" ({k})"))
                .unwrap_or_default(),
            self.host,
            self.message
        );
        if self.suppressed > 0 {
            text.push_str(&format!(
                "\n({} similar message(s) suppressed)",
                self.suppressed
            ));
        }
        serde_json::json!({ "text": text })
    }
}

struct Channel {
    name: String,
    kind: NotifierKind,
    url: Zeroizing<String>,
    min_interval: Duration,
}

/// When a (channel, database, event) last sent, and how many were dropped since.
#[derive(Default)]
struct Sent {
    at: Option<DateTime<Utc>>,
    suppressed: u32,
}

/// The notifier: cheap to clone, sends to the background delivery task.
#[derive(Clone)]
pub struct Notifier {
    tx: Option<mpsc::Sender<(Vec<String>, Event)>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notifier(..)")
    }
}

/// Attempts per message, and the first wait between them (doubled each time).
const ATTEMPTS: u32 = 5;
const FIRST_RETRY: StdDuration = StdDuration::from_secs(1);

impl Notifier {
    /// A notifier that drops everything (no channels configured).
    pub fn none() -> Notifier {
        Notifier { tx: None }
    }

    /// Start the delivery task for the channels of `config`.
    ///
    /// # Errors
    /// A message when a channel's URL file cannot be read (it was checked on load).
    pub fn start(config: &Config) -> Result<Notifier, String> {
        if config.notifications.is_empty() {
            return Ok(Notifier::none());
        }
        let mut channels = Vec::new();
        for (name, n) in &config.notifications {
            channels.push(Channel {
                name: name.clone(),
                kind: n.kind,
                url: crate::config::read_url(&n.url_file)
                    .map_err(|e| format!("notifications.{name}.url_file: {e}"))?,
                min_interval: n.min_interval.unwrap_or(Duration::minutes(15)),
            });
        }
        let http = reqwest::Client::builder()
            .timeout(StdDuration::from_secs(10))
            .build()
            .map_err(|e| format!("failed to set up the HTTP client for notifications: {e}"))?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(deliver(channels, http, rx));
        Ok(Notifier { tx: Some(tx) })
    }

    /// Queue `event` for the named channels. Never waits: when the queue is full the event is
    /// dropped with a log line (a flood of events is what the rate limit would drop anyway).
    pub fn send(&self, channels: &[String], event: Event) {
        let Some(tx) = &self.tx else { return };
        if channels.is_empty() {
            return;
        }
        if tx.try_send((channels.to_vec(), event)).is_err() {
            tracing::warn!("notification queue full; an event was dropped");
        }
    }
}

async fn deliver(
    channels: Vec<Channel>,
    http: reqwest::Client,
    mut rx: mpsc::Receiver<(Vec<String>, Event)>,
) {
    let mut sent: BTreeMap<(String, String, EventKind), Sent> = BTreeMap::new();
    while let Some((names, event)) = rx.recv().await {
        for c in channels.iter().filter(|c| names.contains(&c.name)) {
            let key = (c.name.clone(), event.database.clone(), event.event);
            let s = sent.entry(key).or_default();
            let now = Utc::now();
            if let Some(at) = s.at {
                if now - at < c.min_interval {
                    // Within the interval: a repeat is dropped, and so is a new message
                    // (counted, and said in the next one sent).
                    s.suppressed += 1;
                    tracing::debug!(channel = %c.name, database = %event.database, "notification suppressed by the rate limit");
                    continue;
                }
            }
            let mut e = event.clone();
            e.suppressed = std::mem::take(&mut s.suppressed);
            s.at = Some(now);
            let body = match c.kind {
                NotifierKind::Slack => e.slack(),
                NotifierKind::Webhook => serde_json::to_value(&e).expect("event serializes"),
            };
            post(&http, c, &body).await;
        }
    }
}

/// POST with retries (5 attempts, 1 s doubling). A 4xx other than 429 is not retried: the
/// URL or the payload is wrong, and repeating will not help.
async fn post(http: &reqwest::Client, c: &Channel, body: &serde_json::Value) {
    let bytes = serde_json::to_vec(body).expect("json serializes");
    let mut wait = FIRST_RETRY;
    for attempt in 1..=ATTEMPTS {
        let r = http
            .post(c.url.as_str())
            .header("content-type", "application/json")
            .body(bytes.clone())
            .send()
            .await;
        let outcome = match r {
            Ok(resp) if resp.status().is_success() => return,
            Ok(resp) => {
                let code = resp.status();
                if code.is_client_error() && code.as_u16() != 429 {
                    tracing::error!(channel = %c.name, "notification refused with HTTP {code}; check the channel's URL file");
                    return;
                }
                format!("HTTP {code}")
            }
            // Never the URL: it is the secret.
            Err(e) => e.without_url().to_string(),
        };
        tracing::warn!(channel = %c.name, attempt, "failed to deliver a notification: {outcome}");
        if attempt < ATTEMPTS {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    tracing::error!(channel = %c.name, "gave up delivering a notification after {ATTEMPTS} attempts");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slack_messages_say_what_where_and_how_many_were_suppressed() {
        let mut e = Event::new(
            EventKind::BackupFailed,
            "app",
            Some("physical"),
            "failed to connect".into(),
        );
        e.suppressed = 2;
        let t = e.slack()["text"].as_str().unwrap().to_owned();
        assert!(
            t.contains("backup failed") && t.contains("`app` (physical)"),
            "{t}"
        );
        assert!(
            t.contains("failed to connect") && t.contains("2 similar"),
            "{t}"
        );
    }
}
