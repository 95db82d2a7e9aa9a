//! Test utilities (feature `test-utils`): a seeded random source, the in-memory form of a
//! store's view entries, and the deterministic replication simulator. Test code: a panic is
//! the report.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::should_implement_trait
)]

mod driver;
mod rng;
pub mod sim;
pub mod stored_view;

pub use driver::Driver;
pub use rng::Rng;

/// The time the test drivers pass when a test gives none.
pub fn sim_epoch() -> crate::Timestamp {
    crate::Timestamp::from_millis(1_700_000_000_000)
}
