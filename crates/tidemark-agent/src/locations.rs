//! A repository's locations as the agent reaches them (format §9a). The first location is
//! opened with the secret when the agent starts and must open; the others are reached through
//! it, with its key, each time they are used. So a location that is down when the agent starts
//! is simply missing from the backups until it is back, an empty one is made a home of the
//! repository, and one holding another repository is refused by name.
//!
//! A location that could not be reached is left alone for [`RETRY_DOWN_AFTER`]: the steps in
//! that time get its last error at once instead of paying the storage retries (seconds) again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidemark_repo::key::Secret;
use tidemark_repo::Repository;
use tidemark_storage::{Location, Storage, StorageOptions};

use crate::config::{LocationConfig, RepositoryConfig};
use crate::runtime::StartError;

/// Each location of a repository, in config order, as reached at one moment: the repository
/// there, or why it could not be reached. Reached once and used for the steps that follow.
pub type Reached = Vec<(String, Result<Repository, String>)>;

/// How long after failing to reach a location the agent tries it again. Until then every step
/// gets the last error at once, so a dead location costs its storage retries once per period,
/// not once per step; a location that comes back is used again within this time.
pub const RETRY_DOWN_AFTER: Duration = Duration::from_secs(30);

/// The last failure to reach one location.
#[derive(Debug, Clone)]
struct Down {
    at: Instant,
    error: String,
}

/// One location of a repository, as configured.
#[derive(Debug)]
struct Site {
    name: String,
    location: Location,
    opts: StorageOptions,
}

impl Site {
    fn new(l: &LocationConfig) -> Result<Site, String> {
        let mut location = Location::parse(&l.url).map_err(|e| e.to_string())?;
        for (k, v) in &l.options {
            location.set_option(k, v);
        }
        let opts = StorageOptions {
            limit_upload: l
                .limit_upload
                .as_deref()
                .map(tidemark_storage::parse_rate)
                .transpose()?,
            ..Default::default()
        };
        Ok(Site {
            name: l.name.clone(),
            location,
            opts,
        })
    }

    fn storage(&self) -> Result<Arc<dyn Storage>, String> {
        self.location.open(&self.opts).map_err(|e| e.to_string())
    }
}

/// A repository and its locations. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Repo {
    name: String,
    primary: Repository,
    sites: Arc<Vec<Site>>,
    /// Per site (index as in `sites`), its last failure if it has not been reached since.
    down: Arc<Mutex<Vec<Option<Down>>>>,
    retry_after: Duration,
}

impl Repo {
    /// Open the repository at its first location.
    ///
    /// # Errors
    /// A message naming the repository and location: a missing secret, a wrong password, no
    /// repository there, an unreachable location.
    pub async fn open(name: &str, r: &RepositoryConfig) -> Result<Repo, StartError> {
        let secret = Secret::from_files(r.key_file.as_deref(), r.password_file.as_deref())?
            .ok_or_else(|| format!("repository {name:?} has no password_file or key_file"))?;
        let sites = r
            .locations
            .iter()
            .map(Site::new)
            .collect::<Result<Vec<_>, _>>()?;
        let first = &sites[0];
        let primary = Repository::open(first.storage()?, &secret)
            .await
            .map_err(|e| StartError {
                message: format!(
                    "failed to open repository {name:?} at location {:?}: {e}",
                    first.name
                ),
                cause: Some(e),
            })?;
        Ok(Repo {
            name: name.to_owned(),
            primary,
            down: Arc::new(Mutex::new(vec![None; sites.len()])),
            sites: Arc::new(sites),
            retry_after: RETRY_DOWN_AFTER,
        })
    }

    /// The same repository, trying a location again `after` a failure to reach it (tests).
    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Repo {
        self.retry_after = after;
        self
    }

    /// The repository's name in the config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The first location, opened at start.
    pub fn primary(&self) -> &Repository {
        &self.primary
    }

    /// The first location's name.
    pub fn primary_name(&self) -> &str {
        &self.sites[0].name
    }

    /// Whether the repository has more than one location.
    pub fn several(&self) -> bool {
        self.sites.len() > 1
    }

    /// Every location now, in config order: the first as opened, the others reached through
    /// it (their config checked every time, an empty one added).
    pub async fn reach_all(&self) -> Reached {
        let mut out = Vec::with_capacity(self.sites.len());
        out.push((self.sites[0].name.clone(), Ok(self.primary.clone())));
        let others =
            futures::future::join_all((1..self.sites.len()).map(|i| self.reach_or_recall(i))).await;
        for (s, r) in self.sites[1..].iter().zip(others) {
            out.push((s.name.clone(), r));
        }
        out
    }

    /// Site `i`: its last failure if that is more recent than `retry_after`, else reached now.
    async fn reach_or_recall(&self, i: usize) -> Result<Repository, String> {
        let recalled = self.lock_down()[i].clone();
        if let Some(d) = recalled {
            let ago = d.at.elapsed();
            if ago < self.retry_after {
                return Err(format!(
                    "{} (failed {} s ago; tried again {} s after a failure)",
                    d.error,
                    ago.as_secs(),
                    self.retry_after.as_secs()
                ));
            }
        }
        self.reach(i).await.map_err(|(_, e)| e)
    }

    fn lock_down(&self) -> std::sync::MutexGuard<'_, Vec<Option<Down>>> {
        self.down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reach every location once at start. A location that is down is reported and left for
    /// later; one that holds another repository, or is damaged, stops the start.
    ///
    /// # Errors
    /// The message naming the location and what to do.
    pub async fn check_at_start(&self) -> Result<Vec<(String, String)>, String> {
        let mut down = Vec::new();
        for (i, s) in self.sites.iter().enumerate().skip(1) {
            match self.reach(i).await {
                Ok(_) => {}
                Err((true, e)) => {
                    return Err(format!(
                        "repository {:?}, location {:?}: {e}",
                        self.name, s.name
                    ))
                }
                Err((false, e)) => down.push((s.name.clone(), e)),
            }
        }
        Ok(down)
    }

    /// Site `i`, other than the first, reached now: `Err((fatal, message))`, fatal when it
    /// holds something else than this repository. The outcome is remembered for
    /// [`Repo::reach_all`].
    async fn reach(&self, i: usize) -> Result<Repository, (bool, String)> {
        let s = &self.sites[i];
        let r = match s.storage() {
            Ok(storage) => self.primary.attach(storage).await.map_err(|e| {
                let fatal = matches!(e, tidemark_repo::Error::Invalid(_));
                (fatal, e.to_string())
            }),
            Err(e) => Err((true, e)),
        };
        self.lock_down()[i] = r.as_ref().err().map(|(_, e)| Down {
            at: Instant::now(),
            error: e.clone(),
        });
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_repo::config::InitOptions;
    use tidemark_repo::key::KdfParams;

    fn location(name: &str, path: &std::path::Path) -> LocationConfig {
        LocationConfig {
            name: name.into(),
            url: path.display().to_string(),
            options: Default::default(),
            limit_upload: None,
        }
    }

    #[tokio::test]
    async fn a_location_that_failed_is_left_alone_for_a_while_then_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "correct horse").unwrap();
        let first = dir.path().join("first");
        let storage = Location::parse(first.to_str().unwrap())
            .unwrap()
            .open(&StorageOptions::default())
            .unwrap();
        let opts = InitOptions {
            kdf: KdfParams::insecure_for_tests(),
            ..Default::default()
        };
        Repository::init(storage, &Secret::password("correct horse"), &opts)
            .await
            .unwrap();
        // The second location lies under a regular file: it cannot be reached.
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, "").unwrap();
        let second = blocker.join("second");
        let config = RepositoryConfig {
            locations: vec![location("first", &first), location("second", &second)],
            password_file: Some(password),
            key_file: None,
        };
        let after = Duration::from_secs(2);
        let repo = Repo::open("main", &config)
            .await
            .unwrap()
            .with_retry_after(after);

        let tried = Instant::now();
        let r = repo.reach_all().await;
        assert!(r[0].1.is_ok());
        let e = r[1].1.as_ref().unwrap_err().clone();
        assert!(!e.contains("s ago"), "{e}");

        // Reachable now, but within the wait the last error comes back at once, untried.
        std::fs::remove_file(&blocker).unwrap();
        let r = repo.reach_all().await;
        let recalled = r[1].1.as_ref().unwrap_err();
        assert!(tried.elapsed() < after, "the test machine is too slow");
        assert!(recalled.starts_with(&e), "{recalled}");
        assert!(
            recalled.contains("tried again 2 s after a failure"),
            "{recalled}"
        );
        assert!(!second.exists(), "the location was tried during the wait");

        // After the wait it is tried, made a home of the repository, and used.
        tokio::time::sleep(after).await;
        let r = repo.reach_all().await;
        assert!(r[1].1.is_ok(), "{:?}", r[1].1.as_ref().err());
        assert!(second.join("config").exists());
        let r = repo.reach_all().await;
        assert!(r[1].1.is_ok());
    }
}
