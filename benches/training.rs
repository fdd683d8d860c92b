//! Training speed: seconds per optimizer step (q_sample, forward, backward, clip, Adam) and
//! images/s, measured around whole steps including the loss readback.
//!
//! `cargo bench --bench training -- [--preset tiny] [--batch 8] [--steps 3] [--snn-steps 4]`
//! Compare with `python3 bench_torch.py --device cpu --what train --preset P --batch B`.

use std::time::Instant;

use sddpm_gpu::diffusion::{TrainOptions, Trainer};
use sddpm_gpu::gpu::Context;
use sddpm_gpu::model::{init_weights, parameter_count};

mod common;

fn main() {
    let (preset, batch, cfg) = common::model_from_args();
    let steps: usize = common::arg("--steps", "3").parse().unwrap();
    let ctx = Context::new(None).unwrap();
    let mut tr =
        Trainer::new(&ctx, &cfg, &init_weights(&cfg, 0), batch, cfg.img_size, TrainOptions::default()).unwrap();
    let per = cfg.img_ch * cfg.img_size * cfg.img_size;
    let x0: Vec<f32> = (0..batch * per).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
    let t: Vec<u32> = (0..batch as u32).map(|b| (b * 131) % 1000).collect();
    tr.step(&ctx, &x0, &t, None, 0).unwrap(); // warm-up
    let mut times = Vec::new();
    for _ in 0..steps {
        let start = Instant::now();
        tr.step(&ctx, &x0, &t, None, 0).unwrap();
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    println!(
        "{{\"preset\": \"{preset}\", \"batch\": {batch}, \"snn_steps\": {}, \"params\": {}, \"adapter\": \"{}\", \
         \"dispatches_per_step\": {}, \"median_s_per_step\": {:.3}, \"images_per_s\": {:.3}}}",
        cfg.snn_steps,
        parameter_count(&cfg),
        ctx.adapter.name,
        tr.plan.nodes().len(),
        median,
        batch as f64 / median
    );
}
