//! Test support shared by the crates' integration tests: real servers started on 127.0.0.1 in
//! temporary directories, stopped by PID when dropped.
//!
//! A missing server binary is a test failure with a message saying how to install it, never a
//! silent skip: `.ci/run` installs everything.

pub mod fuzz;
mod postgres;
mod process;
mod servers;

pub use postgres::{as_owner, pg_bin, Postgres, SUPERUSER_PASSWORD};
pub use process::{find_binary, free_port, Server};
pub use servers::{Azurite, FakeGcs, Moto};
