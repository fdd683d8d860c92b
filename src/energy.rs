//! Firing rates and the paper's energy estimate ([SDM] section 5, sddpm-spec.md section 5).
//!
//! Spikes are counted on the GPU during the forward pass: each spiking layer's output gets a
//! per-channel sum (exact: spikes are 0/1 and each partial stays far below 2^24), added up on
//! the host in f64. For each neuron layer, the layer it feeds has MACs per image and spiking
//! step; its synaptic operations are SOPs = rate x T x MACs. The estimate (45 nm costs) is
//!   E_SNN = 4.6 pJ x MACs(first conv) x T + 0.9 pJ x sum SOPs
//!   E_ANN = 4.6 pJ x all MACs                  (the same net evaluated once, non-spiking)
//! per image and network evaluation. As in the paper, layers whose inputs are real-valued (1x1
//! shortcuts, tail conv, the (3,3,1) conv, the time-embedding MLP) are not charged; their MACs
//! are reported as `unaccounted_macs`.
//!
//! The ANN counterpart (`--model ddpm`) has no spikes: [`ann_energy`] charges every MAC of one
//! evaluation (convs, linears and the attention products) at 4.6 pJ, needing no weights.
//!
//! How each layer is charged: docs/evaluation.md (Energy).

use anyhow::{bail, Result};
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::gpu::Context;
use crate::graph::{Plan, TensorId};
use crate::model::{eval_graph, graph_macs, state_entries, DdpmConfig, LayerMacs, ModelConfig};
use crate::ops::reduce;

pub const E_MAC_PJ: f64 = 4.6;
pub const E_AC_PJ: f64 = 0.9;

#[derive(Debug, Clone, Serialize)]
pub struct LayerEnergy {
    /// Official module path of the spiking layer, e.g. `downblocks.0.neuron1`.
    pub name: String,
    pub firing_rate: f64,
    /// The convs (or attention products) it feeds, official names joined by " + "; "-" for none.
    pub feeds: String,
    /// MACs of those layers per image and spiking step.
    pub macs: u64,
    /// Synaptic operations per image and network evaluation: rate x T x MACs.
    pub sops: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EnergyReport {
    pub snn_steps: usize,
    pub images: usize,
    pub threshold: f32,
    pub layers: Vec<LayerEnergy>,
    /// MACs of the first conv (analog input) per image and spiking step.
    pub first_conv_macs: u64,
    /// All conv and linear MACs per image and spiking step.
    pub total_macs: u64,
    /// MACs of layers with real-valued inputs (not charged, as in the paper).
    pub unaccounted_macs: u64,
    pub total_sops: f64,
    /// Spike-weighted mean firing rate over the charged layers.
    pub mean_firing_rate: f64,
    pub energy_snn_mj: f64,
    pub energy_ann_mj: f64,
}

/// A compiled forward pass that also counts every spiking layer's spikes.
pub struct SpikeCounter {
    cfg: ModelConfig,
    batch: usize,
    v_th: f32,
    plan: Plan,
    x: TensorId,
    t: TensorId,
    /// (layer name, spikes tensor, per-channel sum tensor, elements)
    layers: Vec<(String, TensorId, TensorId, usize)>,
    /// MACs of every conv, linear and attention product of this very graph, with the spiking
    /// layer feeding each.
    macs: Vec<LayerMacs>,
}

impl SpikeCounter {
    /// `keep_spikes` keeps every spike tensor readable (for tests comparing counts on the CPU).
    pub fn new(
        ctx: &Context,
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        batch: usize,
        size: usize,
        v_th: f32,
        keep_spikes: bool,
    ) -> Result<SpikeCounter> {
        let (mut g, x, t, unet) = eval_graph(cfg, batch, size, v_th)?;
        let mut layers = Vec::new();
        for (name, s) in &unet.spikes {
            let sums = reduce::group_sum(&mut g, *s, 1, &format!("{name}.spike_count"));
            g.mark_output(sums);
            if keep_spikes {
                g.mark_output(*s);
            }
            layers.push((name.clone(), *s, sums, g.info(*s).numel()));
        }
        let macs = graph_macs(&g, &unet.spikes, &state_entries(cfg));
        let (other, other_batch) = crate::model::eval_graph_other(&cfg.clone().into(), batch, size, v_th)?;
        let plan =
            crate::tune::compile_batched(ctx, crate::tune::Batched { graph: &g, batch, other: &other, other_batch })?;
        unet.upload(ctx, &plan, ckpt)?;
        Ok(SpikeCounter { cfg: cfg.clone(), batch, v_th, plan, x, t, layers, macs })
    }

    /// Run the forward on x [B, C, S, S] at timesteps t and report rates, SOPs and energy.
    pub fn measure(&self, ctx: &Context, x: &[f32], t: &[u32]) -> Result<EnergyReport> {
        if let Some(&bad) = t.iter().find(|&&v| v as usize >= self.cfg.diffusion_steps) {
            bail!("timestep {bad} is outside 0..{}", self.cfg.diffusion_steps);
        }
        self.plan.write(ctx, self.x, x)?;
        self.plan.write(ctx, self.t, t)?;
        self.plan.run(ctx)?;
        let macs = &self.macs;
        let steps = self.cfg.snn_steps as f64;
        let mut layers = Vec::new();
        for (name, _, sums, numel) in &self.layers {
            let count: f64 = self.plan.read(ctx, *sums)?.iter().map(|&v| v as f64).sum();
            // Most layers feed one conv; an attention's input neuron feeds three (q, k, v), and one
            // of its q/k/v neurons is an operand of a product another gates (graph_macs).
            let fed: Vec<_> = macs.iter().filter(|m| m.fed_by.as_deref() == Some(name.as_str())).collect();
            let fed_macs: u64 = fed.iter().map(|m| m.macs).sum();
            let feeds = fed.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(" + ");
            let rate = count / *numel as f64;
            layers.push(LayerEnergy {
                name: name.clone(),
                firing_rate: rate,
                feeds: if feeds.is_empty() { "-".into() } else { feeds },
                macs: fed_macs,
                sops: rate * steps * fed_macs as f64,
            });
        }
        let first_conv_macs = macs.iter().find(|m| m.name == "conv").map_or(0, |m| m.macs);
        let total_macs: u64 = macs.iter().map(|m| m.macs).sum();
        let charged: u64 = layers.iter().map(|l| l.macs).sum();
        let total_sops: f64 = layers.iter().map(|l| l.sops).sum();
        Ok(EnergyReport {
            snn_steps: self.cfg.snn_steps,
            images: self.batch,
            threshold: self.v_th,
            first_conv_macs,
            total_macs,
            unaccounted_macs: total_macs - charged - first_conv_macs,
            total_sops,
            mean_firing_rate: total_sops / (steps * charged.max(1) as f64),
            energy_snn_mj: (E_MAC_PJ * first_conv_macs as f64 * steps + E_AC_PJ * total_sops) * 1e-9,
            energy_ann_mj: E_MAC_PJ * total_macs as f64 * 1e-9,
            layers,
        })
    }

    /// A spiking layer's spikes from the last `measure` (needs `keep_spikes`).
    pub fn spikes(&self, ctx: &Context, name: &str) -> Result<Vec<f32>> {
        let Some((_, s, _, _)) = self.layers.iter().find(|l| l.0 == name) else { bail!("no spiking layer {name}") };
        self.plan.read(ctx, *s)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AnnLayer {
    /// Official module name (`{block}.attn.bmm`: the two attention products).
    pub name: String,
    pub macs: u64,
}

/// The estimate for the ANN counterpart, per image and network evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct AnnEnergyReport {
    pub model: &'static str,
    pub size: usize,
    pub layers: Vec<AnnLayer>,
    pub total_macs: u64,
    /// 4.6 pJ x all MACs.
    pub energy_ann_mj: f64,
}

/// MACs and energy of pytorch-ddpm's U-Net at `size` x `size`: a function of the shape alone.
pub fn ann_energy(cfg: &DdpmConfig, size: usize) -> AnnEnergyReport {
    let layers: Vec<AnnLayer> =
        crate::model::ddpm_layer_macs(cfg, size).into_iter().map(|l| AnnLayer { name: l.name, macs: l.macs }).collect();
    let total_macs = layers.iter().map(|l| l.macs).sum();
    AnnEnergyReport { model: "ddpm", size, layers, total_macs, energy_ann_mj: E_MAC_PJ * total_macs as f64 * 1e-9 }
}
