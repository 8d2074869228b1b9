//! `tidemark key add|list|remove`.

use anyhow::Result;
use tidemark_repo::key::{KdfParams, Secret};

use crate::context::{usage, Context};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Add a key: a password from --new-password-file, or a raw key from --new-key-file.
    Add {
        /// File with the new password.
        #[arg(long)]
        new_password_file: Option<std::path::PathBuf>,
        /// File with a new raw key (32 bytes or more, or 64+ hex digits).
        #[arg(long, conflicts_with = "new_password_file")]
        new_key_file: Option<std::path::PathBuf>,
    },
    /// List keys.
    List,
    /// Remove a key by id (not the last one, nor the one in use).
    Remove {
        /// Key id or unique prefix.
        id: String,
    },
}

pub async fn run(ctx: &Context, c: Command) -> Result<i32> {
    let repo = ctx.open().await?;
    match c {
        Command::Add {
            new_password_file,
            new_key_file,
        } => {
            let secret = match (new_password_file, new_key_file) {
                (Some(p), None) => {
                    let text = std::fs::read_to_string(&p).map_err(|e| {
                        usage(
                            format!("failed to read {}: {e}", p.display()),
                            "check the path",
                        )
                    })?;
                    Secret::password(text.lines().next().unwrap_or("").to_owned())
                }
                (None, Some(p)) => {
                    let raw = std::fs::read(&p).map_err(|e| {
                        usage(
                            format!("failed to read {}: {e}", p.display()),
                            "check the path",
                        )
                    })?;
                    let raw = hex::decode(String::from_utf8_lossy(&raw).trim())
                        .ok()
                        .filter(|d| d.len() >= 32)
                        .unwrap_or(raw);
                    Secret::Raw(zeroize::Zeroizing::new(raw))
                }
                _ => {
                    return Err(usage(
                        "no new secret given",
                        "pass --new-password-file or --new-key-file",
                    ))
                }
            };
            let id = repo.add_key(&secret, KdfParams::default()).await?;
            if ctx.json {
                super::print_json(&serde_json::json!({"id": id.to_hex()}))?;
            } else {
                println!("added key {}", id.short());
            }
        }
        Command::List => {
            let keys = repo.keys_list().await?;
            if ctx.json {
                let v: Vec<_> = keys
                    .iter()
                    .map(|(id, k)| serde_json::json!({"id": id.to_hex(), "current": *id == repo.key_id(), "kind": k.kind(), "created": k.created, "hostname": k.hostname, "username": k.username}))
                    .collect();
                super::print_json(&v)?;
            } else {
                println!(
                    "  {:<10} {:<9} {:<20} {:<14} user",
                    "id", "kind", "created (UTC)", "host"
                );
                for (id, k) in keys {
                    let cur = if id == repo.key_id() { "*" } else { " " };
                    println!(
                        "{cur} {:<10} {:<9} {:<20} {:<14} {}",
                        id.short(),
                        k.kind(),
                        k.created.format("%Y-%m-%d %H:%M:%S"),
                        k.hostname,
                        k.username
                    );
                }
            }
        }
        Command::Remove { id } => {
            let keys = repo.keys_list().await?;
            let matches: Vec<_> = keys
                .iter()
                .filter(|(k, _)| k.to_hex().starts_with(&id.to_ascii_lowercase()))
                .collect();
            let [(kid, _)] = matches.as_slice() else {
                return Err(usage(
                    format!("{} keys match {id:?}", matches.len()),
                    "list keys with `tidemark key list`",
                ));
            };
            repo.remove_key(*kid).await?;
            if !ctx.quiet {
                println!("removed key {}", kid.short());
            }
        }
    }
    Ok(crate::exit::OK)
}
