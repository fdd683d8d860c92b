//! The SDDPM spiking U-Net: configuration and presets, structure, graph building.

mod arch;
mod config;
mod eval;
mod init;
mod unet;

pub use arch::{arch, layer_macs, parameter_count, state_entries, Arch, Block, Entry, EntryKind, LayerMacs};
pub use config::{ModelConfig, PRESETS};
pub use eval::{eval_graph, too_large, EvalNet};
pub use init::init_weights;
pub use unet::{build_eval, build_train, Fold, UNet};
