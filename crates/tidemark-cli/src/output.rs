//! What people see: progress bars on a terminal, nothing in a pipe, sizes in units.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tidemark_repo::progress::Progress;

/// A progress bar that follows `progress.bytes`, shown only when stderr is a terminal.
pub struct Bar {
    bar: Option<ProgressBar>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Bar {
    /// Start showing `what`; `total` bytes if known now. A total that a producer sets later
    /// (`progress.total`) turns the rate-only bar into one with a percentage and an ETA.
    pub fn start(what: &str, total: Option<u64>, progress: Arc<Progress>, quiet: bool) -> Bar {
        if quiet || !std::io::stderr().is_terminal() {
            return Bar {
                bar: None,
                task: None,
            };
        }
        let sized = |bar: &ProgressBar, t: u64| {
            bar.set_length(t);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
        };
        let bar = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec} {elapsed}")
                .expect("template"),
        );
        let mut known = total.filter(|t| *t > 0);
        if let Some(t) = known {
            sized(&bar, t);
        }
        bar.set_message(what.to_owned());
        let b = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                let t = Progress::get(&progress.total);
                if known.is_none() && t > 0 {
                    sized(&b, t);
                    known = Some(t);
                }
                b.set_position(Progress::get(&progress.bytes));
                b.tick();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Bar {
            bar: Some(bar),
            task: Some(task),
        }
    }

    /// Remove the bar.
    pub fn finish(self) {
        if let Some(t) = self.task {
            t.abort();
        }
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// Bytes in binary units.
pub fn size(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}
