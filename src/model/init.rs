//! Fresh weights exactly as the reference initialises them (distributions, not values: PyTorch's
//! generator is not reproduced), deterministic for a seed.
//!
//! - Conv2d/Linear in ResBlocks (incl. temb_proj and the 1x1 shortcut), Down/Up convs, the stem
//!   conv and the time-MLP Linears: xavier_uniform, bias 0;
//! - tail_conv: xavier_uniform with gain 1e-5, bias 0;
//! - conv_identity and T_output_layer: PyTorch's default (kaiming_uniform(a = sqrt 5), i.e.
//!   U(+-1/sqrt(fan_in)) for weight and bias);
//! - BatchNorm: weight 1, bias 0, running mean 0, running var 1; the time table: sinusoidal.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{state_entries, EntryKind, ModelConfig};
use crate::checkpoint::{IntTensor, Tensor, TensorFile};
use crate::ops::embedding::timestep_table;

fn uniform(rng: &mut StdRng, n: usize, bound: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-bound..=bound)).collect()
}

/// fan_in and fan_out of a weight [out, in, k...].
fn fans(shape: &[usize]) -> (usize, usize) {
    let receptive: usize = shape[2..].iter().product();
    (shape[1] * receptive, shape[0] * receptive)
}

/// Every state_dict entry of a freshly initialised model, as an in-memory checkpoint.
pub fn init_weights(cfg: &ModelConfig, seed: u64) -> TensorFile {
    let mut rng = StdRng::seed_from_u64(seed);
    let entries = state_entries(cfg);
    let shapes: BTreeMap<&str, &[usize]> = entries.iter().map(|e| (e.name.as_str(), &e.shape[..])).collect();
    let is_bn = |module: &str| shapes.contains_key(format!("{module}.running_mean").as_str());
    let mut tensors = BTreeMap::new();
    let mut ints = BTreeMap::new();
    for e in &entries {
        let n: usize = e.shape.iter().product();
        let (module, leaf) = e.name.rsplit_once('.').unwrap_or(("", &e.name));
        let weight_shape = shapes.get(format!("{module}.weight").as_str()).copied().unwrap_or(&[]);
        let data = match (e.kind, leaf) {
            (EntryKind::Counter, _) => {
                ints.insert(e.name.clone(), IntTensor { shape: vec![], data: vec![0] });
                continue;
            }
            (EntryKind::Frozen, _) => timestep_table(cfg.diffusion_steps, cfg.ch),
            (EntryKind::RunningStat, "running_var") => vec![1.0; n],
            (EntryKind::RunningStat, _) => vec![0.0; n],
            (_, "weight") if is_bn(module) => vec![1.0; n],
            (_, "bias") if is_bn(module) => vec![0.0; n],
            (_, _) if module == "conv_identity" || module == "T_output_layer" => {
                uniform(&mut rng, n, 1.0 / (fans(weight_shape).0 as f32).sqrt())
            }
            (_, "weight") => {
                let (fan_in, fan_out) = fans(&e.shape);
                let gain = if module == "tail_conv" { 1e-5 } else { 1.0 };
                uniform(&mut rng, n, gain * (6.0 / (fan_in + fan_out) as f32).sqrt())
            }
            _ => vec![0.0; n],
        };
        tensors.insert(e.name.clone(), Tensor { shape: e.shape.clone(), data });
    }
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("config".into(), serde_json::to_string(cfg).expect("config serializes"));
    TensorFile { path: format!("<fresh model, seed {seed}>").into(), tensors, ints, metadata }
}
