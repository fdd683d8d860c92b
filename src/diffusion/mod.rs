//! Diffusion: the schedule (f64) and the samplers (DDPM ancestral, strided DDPM, DDIM) running
//! entirely on the GPU.

mod sampler;
mod schedule;
mod trainer;

pub use sampler::Sampler;
pub use schedule::{plan_steps, timesteps, torch_linspace, SamplerKind, Schedule};
pub use trainer::{
    train_graph, train_graph_arenas, train_graph_other, NonFinite, StepStats, TrainOptions, Trainer, BUCKET_BYTES,
};
