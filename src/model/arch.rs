//! The spiking U-Net's structure: its skeleton (shared with the ANN: [`skeleton`]), walked once
//! by the builder in src/model/unet.rs, which declares each module's parameters where it builds
//! it ([`state_entries`] is its recording pass), so names, shapes and graph cannot disagree.

pub use super::params::{Entry, EntryKind};
pub use super::skeleton::{skeleton, Arch, Block};
pub use super::unet::state_entries;
use super::ModelConfig;
use crate::ops::spike_attention::Dims;

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

/// Multiply-accumulates of one layer for one image and one spiking time step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMacs {
    /// Official module name of the conv / linear.
    pub name: String,
    pub macs: u64,
    /// The spiking neuron layer whose output this layer reads (None: its input is real-valued).
    pub fed_by: Option<String>,
}

/// Every conv and linear of the net at `size` x `size` input, with the neuron feeding it (the
/// paper's energy estimate charges a layer's MACs at its input's firing rate).
pub fn layer_macs(cfg: &ModelConfig, size: usize) -> Vec<LayerMacs> {
    let mut out = Vec::new();
    let mut conv = |name: String, cout: usize, cin: usize, k: usize, hw: usize, fed_by: Option<String>| {
        out.push(LayerMacs { name, macs: (cout * cin * k * k * hw * hw) as u64, fed_by });
    };
    let tdim = cfg.tdim();
    conv("conv".into(), cfg.ch, cfg.img_ch, 3, size, None);
    conv("conv_identity".into(), cfg.ch, cfg.ch, 3, size, Some("neuron".into()));
    let a = arch(cfg);
    let mut res = size;
    let mut products = Vec::new();
    let mut linears = vec![
        ("time_embedding.timembedding.1".to_string(), (cfg.ch * tdim) as u64),
        ("time_embedding.timembedding.3".to_string(), (tdim * tdim) as u64),
    ];
    for block in a.down.iter().chain(&a.middle).chain(&a.up) {
        match block {
            Block::Res { name, cin, cout, attn } => {
                conv(format!("{name}.conv1"), *cout, *cin, 3, res, Some(format!("{name}.neuron1")));
                conv(format!("{name}.conv2"), *cout, *cout, 3, res, Some(format!("{name}.neuron2")));
                if cin != cout {
                    conv(format!("{name}.shortcut"), *cout, *cin, 1, res, None);
                }
                if *attn {
                    let a = format!("{name}.attn");
                    for part in ["q", "k", "v"] {
                        conv(format!("{a}.{part}_conv"), *cout, *cout, 1, res, Some(format!("{a}.neuron")));
                    }
                    // The spike x spike products, as computed (the op says which input's
                    // spikes gate each; the third input is an operand, not charged again).
                    let dims = Dims { rows: 1, c: *cout, n: res * res, heads: cfg.heads };
                    for (op, gate, macs) in dims.products() {
                        let fed_by = Some(format!("{a}.{gate}_neuron"));
                        products.push(LayerMacs { name: format!("{a}.{op}"), macs, fed_by });
                    }
                    conv(format!("{a}.proj_conv"), *cout, *cout, 1, res, Some(format!("{a}.attn_neuron")));
                }
                linears.push((format!("{name}.temb_proj.1"), (tdim * cout) as u64));
            }
            Block::Down { name, c } => {
                res /= 2;
                conv(format!("{name}.conv"), *c, *c, 3, res, Some(format!("{name}.neuron")));
            }
            Block::Up { name, c } => {
                res *= 2;
                conv(format!("{name}.conv"), *c, *c, 3, res, Some(format!("{name}.neuron")));
            }
        }
    }
    conv("tail_conv".into(), cfg.img_ch, a.tail_ch, 3, size, None);
    conv("T_output_layer".into(), cfg.img_ch, cfg.img_ch, 3, size, None);
    out.extend(products);
    out.extend(linears.into_iter().map(|(name, macs)| LayerMacs { name, macs, fed_by: None }));
    out
}
