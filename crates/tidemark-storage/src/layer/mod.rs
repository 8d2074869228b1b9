//! Layers: storages that wrap another storage to add one cross-cutting behaviour.
//!
//! `Location::open` stacks them as retry(throttle(timeout(backend))), so that every attempt has
//! its own deadline and retried bytes count against the bandwidth limit.

mod fault;
mod retry;
mod throttle;
mod timeout;

pub use fault::{FaultLayer, FaultPlan};
pub use retry::{RetryLayer, RetryPolicy};
pub use throttle::ThrottleLayer;
pub use timeout::TimeoutLayer;
