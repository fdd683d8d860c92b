//! Everything that talks to wgpu directly. Knows nothing about ops or models.

mod context;

pub use context::{
    check_backend_env, choose_adapter, choose_for_rank, list_adapters, rank_order, shader_checks_from_env,
    AdapterSummary, Context, CounterSnapshot, KernelPolicy, Shader, COOP_FEATURES, WANTED_FEATURES,
};
