//! Sampling speed: milliseconds per network evaluation inside the on-GPU sampling loop (set t,
//! U-Net, fused update, advance; no host round trips), and images/s.
//!
//! `cargo bench --bench sampling -- [--preset tiny] [--batch 8] [--evals 5] [--snn-steps 4]`
//! Compare with `python3 bench_torch.py --device cpu --what forward --preset P --batch B` (its
//! images_per_s is batch / seconds per network evaluation, our "evals x images / s").

use std::time::Instant;

use sddpm_gpu::diffusion::{plan_steps, Sampler, SamplerKind, Schedule};
use sddpm_gpu::gpu::Context;
use sddpm_gpu::model::{init_weights, parameter_count};

mod common;

fn main() {
    let (preset, batch, cfg) = common::model_from_args();
    let evals: usize = common::arg("--evals", "5").parse().unwrap();
    let ctx = Context::new(None).unwrap();
    let weights = init_weights(&cfg, 0);
    let rows = plan_steps(&Schedule::reference(cfg.diffusion_steps), SamplerKind::Ddim, evals).unwrap();
    let sampler = Sampler::new(&ctx, &cfg, &weights, batch, cfg.img_size, 1.0, &rows).unwrap();
    sampler.sample_batch(&ctx, 0, 0, &mut |_| {}).unwrap(); // warm-up
    let mut best = f64::MAX;
    for rep in 0..3 {
        let start = Instant::now();
        sampler.sample_batch(&ctx, rep, 0, &mut |_| {}).unwrap();
        best = best.min(start.elapsed().as_secs_f64());
    }
    let per_eval = best / evals as f64;
    println!(
        "{{\"preset\": \"{preset}\", \"batch\": {batch}, \"snn_steps\": {}, \"params\": {}, \"adapter\": \"{}\", \
         \"dispatches_per_eval\": {}, \"ms_per_eval\": {:.1}, \"evals_x_images_per_s\": {:.2}, \
         \"images_per_s_1000_step_ddpm\": {:.5}}}",
        cfg.snn_steps,
        parameter_count(&cfg),
        ctx.adapter.name,
        sampler.dispatches_per_step,
        per_eval * 1e3,
        batch as f64 / per_eval,
        batch as f64 / (per_eval * 1000.0)
    );
}
