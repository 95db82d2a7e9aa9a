//! Test utilities (feature `test-utils`): a seeded random source, the in-memory form of a
//! store's view entries, and the deterministic replication simulator. Test code: a panic is
//! the report.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::should_implement_trait
)]

mod rng;
pub mod sim;
pub mod stored_view;

pub use rng::Rng;
