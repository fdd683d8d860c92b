//! A compiled inference network: weights uploaded once, then `forward` as often as needed.

use anyhow::{bail, Result};

use super::{Net, UNet};
use crate::checkpoint::Checkpoint;
use crate::gpu::Context;
use crate::graph::{DType, Graph, Plan, TensorId};
use crate::tune::Batched;

pub struct EvalNet {
    pub cfg: Net,
    pub batch: usize,
    pub size: usize,
    pub graph: Graph,
    pub plan: Plan,
    pub x: TensorId,
    pub t: TensorId,
    pub eps: TensorId,
}

impl EvalNet {
    /// Build and compile the U-Net for `batch` images of `size` x `size`, with every neuron's
    /// threshold at `v_th`, and upload the checkpoint's weights.
    pub fn new(
        ctx: &Context,
        cfg: impl Into<Net>,
        ckpt: &Checkpoint,
        batch: usize,
        size: usize,
        v_th: f32,
    ) -> Result<EvalNet> {
        let cfg = cfg.into();
        let (mut g, x, t, unet) = eval_graph(&cfg, batch, size, v_th)?;
        g.mark_output(unet.eps);
        let (other, other_batch) = eval_graph_other(&cfg, batch, size, v_th)?;
        let plan = crate::tune::compile_batched(ctx, Batched { graph: &g, batch, other: &other, other_batch })?;
        unet.upload(ctx, &plan, ckpt)?;
        Ok(EvalNet { cfg, batch, size, graph: g, plan, x, t, eps: unet.eps })
    }

    /// eps_hat for x [B, C, H, W] and integer timesteps t [B].
    pub fn forward(&self, ctx: &Context, x: &[f32], t: &[u32]) -> Result<Vec<f32>> {
        if let Some(&bad) = t.iter().find(|&&v| v as usize >= self.cfg.diffusion_steps()) {
            bail!("timestep {bad} is out of range 0..{}", self.cfg.diffusion_steps());
        }
        self.plan.write(ctx, self.x, x)?;
        self.plan.write(ctx, self.t, t)?;
        self.plan.run(ctx)?;
        self.plan.read(ctx, self.eps)
    }
}

/// A graph holding the inference U-Net for `batch` images of `size` px with every neuron's
/// threshold at `v_th` (the ANN has none): (graph, x [B, C, S, S] input, t [B] input, the U-Net's
/// tensors). Callers add what they need (outputs, spike counters) before compiling.
pub fn eval_graph(
    cfg: impl Into<Net>,
    batch: usize,
    size: usize,
    v_th: f32,
) -> Result<(Graph, TensorId, TensorId, UNet)> {
    let cfg = cfg.into();
    cfg.validate_run(size, batch)?;
    let mut g = Graph::new();
    let x = g.input("x", &[batch, cfg.img_ch(), size, size]);
    let t = g.input_as("t", &[batch], DType::U32);
    let unet = cfg.build_eval(&mut g, x, t, v_th);
    g.check().map_err(|e| too_large(e, &cfg, batch, size))?;
    Ok((g, x, t, unet))
}

/// The inference U-Net's graph for another batch than `batch` (and that batch), from which tuning
/// keys learn which numbers follow the batch (crate::tune::Batched): every graph holding the
/// U-Net (sampler, spike counter) tunes its kernels with it, so they share their measurements.
pub fn eval_graph_other(cfg: &Net, batch: usize, size: usize, v_th: f32) -> Result<(Graph, usize)> {
    let other = crate::tune::other_batch(batch);
    Ok((eval_graph(cfg.clone(), other, size, v_th)?.0, other))
}

/// A graph-building error of a net too large for `batch` images of `size` px, with the flags
/// that shrink it.
pub fn too_large(e: anyhow::Error, cfg: &Net, batch: usize, size: usize) -> anyhow::Error {
    e.context(match cfg.snn_steps() {
        Some(t) => format!(
            "batch {batch} of {size}x{size} images at T = {t} is too large to build; lower --batch (or --size, --snn-steps)"
        ),
        None => format!("batch {batch} of {size}x{size} images is too large to build; lower --batch (or --size)"),
    })
}
