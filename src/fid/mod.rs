//! Evaluation: FID and KID as the tools people compare against compute them (pytorch-fid's
//! statistics and matrix square root, torch-fidelity's KID), and pytorch-fid's `.npz` files.
//!
//! How FID and KID are computed, and how close they come to the reference: docs/evaluation.md.

pub mod inception;
pub mod inputs;
pub mod npz;
pub mod pickle;
pub mod stats;
pub mod torchzip;

pub use stats::{fid, kid, Kid, Stats};
