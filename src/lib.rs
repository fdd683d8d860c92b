//! sddpm-gpu: Spiking Denoising Diffusion Probabilistic Models on any GPU wgpu reaches.
//!
//! Data flows one way: CLI -> diffusion -> model -> graph -> gpu. `gpu` owns the wgpu device,
//! `graph` plans and replays kernel dispatches, `ops` holds one kernel family per file (each with
//! a CPU reference beside it).

pub mod checkpoint;
pub mod data;
pub mod diffusion;
pub mod dist;
pub mod energy;
pub mod fid;
pub mod fsutil;
pub mod gpu;
pub mod graph;
pub mod images;
pub mod model;
pub mod ops;
pub mod plot;
pub mod profile;
pub mod progress;
pub mod run;
pub mod shard;
pub mod signal;
pub mod tune;
pub mod weights;
