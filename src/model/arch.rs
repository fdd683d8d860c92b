//! The spiking U-Net's structure: its skeleton (shared with the ANN: [`skeleton`]), walked once
//! by the builder in src/model/unet.rs, which declares each module's parameters where it builds
//! it ([`state_entries`] is its recording pass), so names, shapes and graph cannot disagree; the
//! MAC counts are read off the built graph ([`layer_macs`]).

use super::macs::{net_macs, LayerMacs};
pub use super::params::{Entry, EntryKind};
use super::skeleton::{skeleton, Arch};
pub use super::unet::state_entries;
use super::ModelConfig;

/// The spiking U-Net's skeleton ([`skeleton`]): attention on the config's levels, none in the
/// middle blocks (the reference's constructor).
pub fn arch(cfg: &ModelConfig) -> Arch {
    skeleton(cfg.ch, &cfg.ch_mult, cfg.num_res_blocks, &cfg.attn, [false, false])
}

/// Number of values in `.parameters()` (trainable + the frozen table), as the paper counts.
pub fn parameter_count(cfg: &ModelConfig) -> usize {
    state_entries(cfg)
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Trainable | EntryKind::Frozen))
        .map(|e| e.shape.iter().product::<usize>())
        .sum()
}

/// Every conv, linear and attention product of the net at `size` x `size` input, with the
/// neuron feeding it (the paper's energy estimate charges a layer's MACs at its input's firing
/// rate): read off the inference graph (src/model/macs.rs).
pub fn layer_macs(cfg: &ModelConfig, size: usize) -> Vec<LayerMacs> {
    net_macs(&cfg.into(), size)
}
