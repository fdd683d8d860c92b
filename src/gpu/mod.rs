//! Everything that talks to wgpu directly. Knows nothing about ops or models.

mod context;

pub use context::{
    choose_adapter, list_adapters, AdapterSummary, Context, CounterSnapshot, Shader, Tuning, WANTED_FEATURES,
};
