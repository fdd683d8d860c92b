//! The SDDPM spiking U-Net and its ANN counterpart (pytorch-ddpm's U-Net, [`DdpmConfig`]):
//! configuration and presets, structure, graph building; [`Net`] picks one.
//!
//! How close the models come to the PyTorch reference: docs/numerics.md (Parity).

mod arch;
mod config;
mod ddpm;
mod eval;
mod init;
mod load;
mod macs;
mod net;
mod params;
mod skeleton;
mod unet;

pub use arch::{arch, layer_macs, parameter_count, state_entries, Entry, EntryKind};
pub use config::{ModelConfig, NeuronKind, PRESETS};
pub use ddpm::{
    build_ddpm, ddpm_arch, ddpm_init_weights, ddpm_layer_macs, ddpm_parameter_count, ddpm_state_entries, DdpmConfig,
    DDPM_PRESETS,
};
pub use eval::{eval_graph, eval_graph_other, too_large, EvalNet};
pub use init::init_weights;
pub use macs::{graph_macs, LayerMacs};
pub use net::{Net, MODELS};
pub use skeleton::{skeleton, Arch, Block};
pub use unet::{build_eval, build_train, Fold, UNet};
