//! Sampling on the GPU: one compiled graph holds a whole sampling step (set t, U-Net, fused
//! update, advance the step counter); the host replays it once per network evaluation, many steps
//! per submit, with no reads until the batch is done.

use anyhow::{bail, Result};

use crate::checkpoint::Checkpoint;
use crate::gpu::Context;
use crate::graph::{DType, Graph, Plan, TensorId};
use crate::model::{too_large, Net};
use crate::ops::sampler::{self, NoiseKey, StepCoef, COEF_ROW};

pub struct Sampler {
    pub batch: usize,
    pub steps: usize,
    plan: Plan,
    x: TensorId,
    step: TensorId,
    begin_node: usize,
    update_node: usize,
    x_numel: usize,
    /// Nodes per sampling step (for reports).
    pub dispatches_per_step: usize,
}

impl Sampler {
    /// Compile the sampling step for `batch` images of `size` with every neuron at threshold
    /// `v_th`, upload the weights and the coefficient table `rows` (one per evaluation).
    pub fn new(
        ctx: &Context,
        cfg: impl Into<Net>,
        ckpt: &Checkpoint,
        batch: usize,
        size: usize,
        v_th: f32,
        rows: &[StepCoef],
    ) -> Result<Sampler> {
        let cfg: Net = cfg.into();
        cfg.validate_run(size, batch)?;
        if rows.is_empty() {
            bail!("sampling needs at least one step");
        }
        let mut g = Graph::new();
        let coef = g.param("sampler.coef", &[rows.len(), COEF_ROW]);
        let step = g.input_as("sampler.step", &[1], DType::U32);
        let x = g.input("x", &[batch, cfg.img_ch(), size, size]);
        let t = g.input_as("t", &[batch], DType::U32);
        let key = NoiseKey { seed: 0, image_base: 0 };
        let begin_node = sampler::begin_step(&mut g, coef, step, x, t, key);
        let unet = cfg.build_eval(&mut g, x, t, v_th);
        let update_node = sampler::update(&mut g, coef, step, unet.eps, x, None, key);
        sampler::advance(&mut g, step);
        g.mark_output(x);
        g.check().map_err(|e| too_large(e, &cfg, batch, size))?;
        let (other, other_batch) = crate::model::eval_graph_other(&cfg, batch, size, v_th)?;
        let plan =
            crate::tune::compile_batched(ctx, crate::tune::Batched { graph: &g, batch, other: &other, other_batch })?;
        unet.upload(ctx, &plan, ckpt)?;
        let table: Vec<f32> = rows.iter().flat_map(|r| r.row()).collect();
        plan.write(ctx, coef, &table)?;
        Ok(Sampler {
            batch,
            steps: rows.len(),
            dispatches_per_step: g.nodes.len(),
            plan,
            x,
            step,
            begin_node,
            update_node,
            x_numel: g.info(x).numel(),
        })
    }

    /// Sample one batch: images `image_base ..` of the run keyed by `seed`. Returns x0 in
    /// [-1, 1], [B, C, H, W]. `progress(steps_done)` is called as the GPU finishes steps.
    pub fn sample_batch(
        &self,
        ctx: &Context,
        seed: u64,
        image_base: u32,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<f32>> {
        let params = sampler::batch_params(self.x_numel, self.batch, NoiseKey { seed, image_base });
        self.plan.set_params(ctx, self.begin_node, &params);
        self.plan.set_params(ctx, self.update_node, &params);
        self.plan.write(ctx, self.step, &[0u32])?;
        self.plan.run_repeated(ctx, self.steps, progress)?;
        self.plan.read(ctx, self.x)
    }
}
