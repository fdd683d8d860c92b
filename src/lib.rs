//! sddpm-gpu: Spiking Denoising Diffusion Probabilistic Models on any GPU wgpu reaches.
//!
//! Data flows one way: CLI -> diffusion -> model -> graph -> gpu. `gpu` owns the wgpu device,
//! `graph` plans and replays kernel dispatches, `ops` holds one kernel family per file (each with
//! a CPU reference beside it).
//!
//! # Layers
//!
//! Every arrow points down: a module uses only modules of lower layers, never one of its own
//! layer or above. tests/layering.rs reads the list below and fails on any `crate::` path in src/
//! (`sddpm_gpu::` in the binary) that breaks it; a new module gets a line here. Top first:
//!
//! - 7 `cli`: the binary (src/main.rs parses and dispatches, src/cli/ one module per command).
//! - 6 `run`: a training run: its folder, lock, checkpoints, sample grids and FID log.
//! - 5 `diffusion`, `energy`, `weights`, `gpu_model`: schedule, sampler and trainer; firing
//!   rates and the energy estimate; opening official and our checkpoints as a model; the dry
//!   run's estimate of each dispatch on a table of GPUs (above `profile`, whose layers it uses).
//! - 4 `model`, `fid`, `profile`: the U-Nets, their parameters and graphs (and a model from a
//!   checkpoint file); FID/KID with the Inception-v3; per-kernel timing and the dry run.
//! - 3 `ops`, `tune`: one kernel family per file with its CPU reference; the autotuner, its
//!   per-device policy (`tune::tuning`), cache and the adapter's peak record.
//! - 2 `graph`, `data`: the static graph, memory planner, autodiff and replay; datasets.
//! - 1 `gpu`, `checkpoint`, `images`, `plot`, `dist`: the wgpu device; safetensors files;
//!   PNG/JPEG; charts; the communicator between data-parallel ranks (MPI) and their agreements.
//! - 0 `fsutil`, `signal`, `progress`, `shard`: atomic writes and output checks, interrupts,
//!   progress bars, shard ranges.

pub mod checkpoint;
pub mod data;
pub mod diffusion;
pub mod dist;
pub mod energy;
pub mod fid;
pub mod fsutil;
pub mod gpu;
pub mod gpu_model;
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
