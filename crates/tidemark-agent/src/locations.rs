//! A repository's locations as the agent reaches them (format §9a). The first location is
//! opened with the secret when the agent starts and must open; the others are reached through
//! it, with its key, each time they are used. So a location that is down when the agent starts
//! is simply missing from the backups until it is back, an empty one is made a home of the
//! repository, and one holding another repository is refused by name.

use std::sync::Arc;

use tidemark_repo::key::Secret;
use tidemark_repo::Repository;
use tidemark_storage::{Location, Storage, StorageOptions};

use crate::config::{LocationConfig, RepositoryConfig};

/// Each location of a repository, in config order, as reached at one moment: the repository
/// there, or why it could not be reached. Reached once and used for the steps that follow.
pub type Reached = Vec<(String, Result<Repository, String>)>;

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
}

impl Repo {
    /// Open the repository at its first location.
    ///
    /// # Errors
    /// A message naming the repository and location: a missing secret, a wrong password, no
    /// repository there, an unreachable location.
    pub async fn open(name: &str, r: &RepositoryConfig) -> Result<Repo, String> {
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
            .map_err(|e| {
                format!(
                    "failed to open repository {name:?} at location {:?}: {e}",
                    first.name
                )
            })?;
        Ok(Repo {
            name: name.to_owned(),
            primary,
            sites: Arc::new(sites),
        })
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
        let others = futures::future::join_all(self.sites[1..].iter().map(|s| self.reach(s))).await;
        for (s, r) in self.sites[1..].iter().zip(others) {
            out.push((s.name.clone(), r.map_err(|(_, e)| e)));
        }
        out
    }

    /// Reach every location once at start. A location that is down is reported and left for
    /// later; one that holds another repository, or is damaged, stops the start.
    ///
    /// # Errors
    /// The message naming the location and what to do.
    pub async fn check_at_start(&self) -> Result<Vec<(String, String)>, String> {
        let mut down = Vec::new();
        for s in &self.sites[1..] {
            match self.reach(s).await {
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

    /// A location other than the first: `Err((fatal, message))`, fatal when it holds something
    /// else than this repository.
    async fn reach(&self, s: &Site) -> Result<Repository, (bool, String)> {
        let storage = s.storage().map_err(|e| (true, e))?;
        self.primary.attach(storage).await.map_err(|e| {
            let fatal = matches!(e, tidemark_repo::Error::Invalid(_));
            (fatal, e.to_string())
        })
    }
}
