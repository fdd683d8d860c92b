//! The magnitudes the cooperative-matrix kernels' real operands take on a preset: for every conv
//! of a training step, its weights, the gradient dy of its output (the real operand of both its
//! input and its weight gradient) and, where it is not spikes, its input (the stem's x_t). What
//! the numerics rule of shaders/common/coop_fragment.wgsl rests on (README, "Cooperative
//! matrices"): weights and inputs inside f16's range need no pre-scale, gradients do.
//!
//!   cargo run --release --example coop_ranges -- PRESET [BATCH] [TRAIN_STEPS]
//!
//! Trains TRAIN_STEPS steps (default 20) from the preset's initial weights on the embedded MNIST
//! subset (grey images repeated over the channels of 3-channel presets), then runs one more step
//! with every conv's dy and input kept, and prints per conv: max |w| and the share of weights
//! below 2^-14 (subnormal in f16); max and smallest nonzero |dy| and the share of |dy| below
//! 2^-14 and below max|dy| * 2^-28 (what the block pre-scale leaves subnormal); max |x| of real
//! inputs. All magnitudes as powers of two.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use sddpm_gpu::diffusion::{Schedule, TrainOptions, Trainer};
use sddpm_gpu::gpu::Context;
use sddpm_gpu::graph::{backward, DType, Graph, Plan};
use sddpm_gpu::model::Net;
use sddpm_gpu::ops::{elementwise, reduce, sampler};

fn log2(v: f32) -> String {
    if v == 0.0 {
        "0".into()
    } else {
        format!("2^{:.1}", v.log2())
    }
}

/// (max |v|, smallest nonzero |v|, share of nonzero |v| below 2^-14, share below max * 2^-28).
fn stats(v: &[f32]) -> (f32, f32, f64, f64) {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let nz: Vec<f32> = v.iter().map(|x| x.abs()).filter(|&x| x > 0.0).collect();
    let min = nz.iter().copied().fold(f32::INFINITY, f32::min);
    let share = |t: f32| nz.iter().filter(|&&x| x < t).count() as f64 / nz.len().max(1) as f64;
    (max, if nz.is_empty() { 0.0 } else { min }, share(2f32.powi(-14)), share(max * 2f32.powi(-28)))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(preset) = args.first() else { bail!("usage: coop_ranges PRESET [BATCH] [TRAIN_STEPS]") };
    let batch: usize = args.get(1).map_or(Ok(4), |s| s.parse())?;
    let steps: u64 = args.get(2).map_or(Ok(20), |s| s.parse())?;
    let cfg = Net::preset("sddpm", preset)?;
    let size = cfg.img_size();
    let ch = cfg.img_ch();
    let ctx = Context::new(None)?;
    sddpm_gpu::tune::tuning(&ctx).lock().unwrap().enabled = false;
    let data = sddpm_gpu::data::load(None, size)?;
    let images = |step: u64| {
        let b = sddpm_gpu::data::batch_at(&data, batch, 1, step, cfg.diffusion_steps());
        let plane = size * size;
        let x0: Vec<f32> = (0..batch * ch * plane).map(|i| b.x0[(i / (ch * plane)) * plane + i % plane]).collect();
        (x0, b.t)
    };

    let mut weights = cfg.init_weights(0);
    if steps > 0 {
        let mut tr = Trainer::new(&ctx, &cfg, &weights, batch, size, TrainOptions::default())?;
        for s in 0..steps {
            let (x0, t) = images(s);
            let st = tr.step(&ctx, &x0, &t, None, 0)?;
            if s + 1 == steps {
                eprintln!("trained {steps} steps, loss {:.4}", st.loss);
            }
        }
        weights = tr.weights(&ctx, false)?;
    }

    // One step's graph (as the trainer builds it) with every conv's dy and input kept.
    let mut g = Graph::new();
    let x0 = g.input("x0", &[batch, ch, size, size]);
    let qcoef = g.input("q_sample.coef", &[batch, 2]);
    let t = g.input_as("t", &[batch], DType::U32);
    let noise = g.input("noise", &[batch, ch, size, size]);
    let one = g.param("loss.seed", &[1]);
    let (x_t, noise_used, _) = sampler::q_sample(&mut g, qcoef, x0, Some(noise));
    let unet = cfg.build_train(&mut g, x_t, t, sddpm_gpu::ops::batchnorm::BnGroups::ONE)?;
    let loss = reduce::mse_loss(&mut g, unet.eps, noise_used, "loss");
    let wrt: Vec<_> = unet.params.values().copied().collect();
    backward(&mut g, loss, one, &wrt, elementwise::add);
    // conv.rs: the weight-gradient node of conv LABEL is LABEL.grad_weight, reading [dy, x].
    let mut convs = BTreeMap::new();
    for n in &g.nodes {
        if let Some(label) = n.label.strip_suffix(".grad_weight") {
            // Linear layers (the time embedding's) name their gradients alike; convs have 4-D or
            // 5-D weights.
            if weights.tensors.get(&format!("{label}.weight")).is_some_and(|w| w.shape.len() >= 4) {
                convs.insert(label.to_string(), (n.reads[0], n.reads[1]));
            }
        }
    }
    for &(dy, x) in convs.values() {
        g.mark_output(dy);
        g.mark_output(x);
    }
    let plan = Plan::compile(&ctx, &g)?;
    unet.upload(&ctx, &plan, &weights)?;
    plan.write(&ctx, one, &[1f32])?;
    let (x0d, td) = images(steps);
    let schedule = Schedule::reference(cfg.diffusion_steps());
    let coef: Vec<f32> = td
        .iter()
        .flat_map(|&s| {
            [schedule.alphas_bar[s as usize].sqrt() as f32, (1.0 - schedule.alphas_bar[s as usize]).sqrt() as f32]
        })
        .collect();
    let noise_d: Vec<f32> = {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(3);
        (0..x0d.len()).map(|_| (0..12).map(|_| r.random::<f32>()).sum::<f32>() - 6.0).collect()
    };
    plan.write(&ctx, x0, &x0d)?;
    plan.write(&ctx, qcoef, &coef)?;
    plan.write(&ctx, t, &td)?;
    plan.write(&ctx, noise, &noise_d)?;
    plan.run(&ctx)?;

    println!("preset {preset}, batch {batch}, after {steps} training steps, on {}", ctx.describe());
    println!(
        "{:<34} {:>9} {:>8} | {:>9} {:>9} {:>8} {:>9} | {:>9}",
        "conv", "max|w|", "w<2^-14", "max|dy|", "min|dy|", "dy<2^-14", "dy<max/2^28", "max|x|"
    );
    let (mut w_max, mut dy_max, mut dy_min, mut x_max, mut dy_tail) = (0f32, 0f32, f32::INFINITY, 0f32, 0f64);
    for (label, &(dy, x)) in &convs {
        let wname = format!("{label}.weight");
        let w = weights.tensors.get(&wname).map(|t| stats(&t.data));
        let d = stats(&plan.read(&ctx, dy)?);
        let real = g.dtype(x) == DType::F32;
        let xs = real.then(|| plan.read(&ctx, x)).transpose()?.map(|v| stats(&v).0);
        if let Some(w) = w {
            w_max = w_max.max(w.0);
        }
        dy_max = dy_max.max(d.0);
        if d.1 > 0.0 {
            dy_min = dy_min.min(d.1);
        }
        dy_tail = dy_tail.max(d.3);
        if let Some(m) = xs {
            x_max = x_max.max(m);
        }
        println!(
            "{:<34} {:>9} {:>7.4}% | {:>9} {:>9} {:>7.2}% {:>10.6}% | {:>9}",
            label,
            w.map_or("-".into(), |w| log2(w.0)),
            w.map_or(0.0, |w| 100.0 * w.2),
            log2(d.0),
            log2(d.1),
            100.0 * d.2,
            100.0 * d.3,
            xs.map_or("spikes".into(), log2)
        );
    }
    println!(
        "overall: max|w| {}, max|dy| {}, smallest nonzero |dy| {}, worst share of |dy| below max/2^28 {:.6}%, max|x| of real inputs {}",
        log2(w_max),
        log2(dy_max),
        log2(dy_min),
        100.0 * dy_tail,
        log2(x_max)
    );
    Ok(())
}
