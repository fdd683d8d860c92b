//! Diffusion schedule, samplers and the on-GPU noise generator, against the reference fixtures
//! and CPU references.

mod common;

use std::path::Path;

use common::*;
use safetensors::SafeTensors;
use sddpm_gpu::checkpoint::Checkpoint;
use sddpm_gpu::diffusion::{plan_steps, timesteps, torch_linspace, Sampler, SamplerKind, Schedule};
use sddpm_gpu::graph::{DType, Graph};
use sddpm_gpu::ops::sampler::{self, Mode, NoiseKey};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).unwrap()
}

fn f64s(st: &SafeTensors, name: &str) -> Vec<f64> {
    bytemuck::pod_collect_to_vec(st.tensor(name).unwrap().data())
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(st.tensor(name).unwrap().data())
}

#[test]
fn schedule_matches_reference_in_f64() {
    let bytes = fixture("schedule.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let sch = Schedule::reference(1000);
    for (name, ours) in [
        ("betas", &sch.betas),
        ("alphas_bar", &sch.alphas_bar),
        ("post_c1", &sch.post_c1),
        ("post_c2", &sch.post_c2),
        ("var_large", &sch.var_large),
    ] {
        let want = f64s(&st, name);
        assert_eq!(want.len(), ours.len());
        let worst = ours.iter().zip(&want).map(|(a, b)| (a - b).abs() / b.abs().max(1e-12)).fold(0.0, f64::max);
        println!("{name}: max relative difference {worst:e}");
        assert!(worst < 1e-6, "{name}: relative difference {worst:e}");
    }
}

#[test]
fn linspace_is_exact_at_both_ends() {
    let v = torch_linspace(1e-4, 0.02, 1000);
    assert_eq!(v[0], 1e-4);
    assert_eq!(v[999], 0.02);
    assert_eq!(torch_linspace(0.0, 1.0, 5), [0.0, 0.25, 0.5, 0.75, 1.0]);
}

#[test]
fn ancestral_steps_match_reference() {
    // The fused update kernel, fed the fixture's z, against the reference's x_prev.
    let bytes = fixture("schedule.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let sch = Schedule::reference(1000);
    let rows = plan_steps(&sch, SamplerKind::Ddpm, 1000).unwrap();
    assert_eq!(rows.len(), 1000);
    for t in [999usize, 500, 1, 0] {
        let shape = st.tensor(&format!("step{t}.x_t")).unwrap().shape().to_vec();
        let (x, e, z) =
            (f32s(&st, &format!("step{t}.x_t")), f32s(&st, &format!("step{t}.eps")), f32s(&st, &format!("step{t}.z")));
        let want = f32s(&st, &format!("step{t}.x_prev"));
        let k = 999 - t; // row of this t in the 1000-step plan
        assert_eq!(rows[k].t as usize, t);
        assert_eq!(rows[k].mode, if t == 0 { Mode::Final } else { Mode::Ancestral });
        let mut g = Graph::new();
        let coef = g.param("coef", &[1, 8]);
        let step = g.input_as("step", &[1], DType::U32);
        let xt = g.input("x", &shape);
        let et = g.input("eps", &shape);
        let zt = g.input("z", &shape);
        sampler::update(&mut g, coef, step, et, xt, Some(zt), NoiseKey { seed: 0, image_base: 0 });
        let got = run_graph(
            g,
            &[(coef, bits(&rows[k].row())), (step, vec![0]), (xt, bits(&x)), (et, bits(&e)), (zt, bits(&z))],
            &[xt],
        )
        .remove(0);
        assert_close(&format!("x_prev at t={t}"), &got, &want, 1e-6, 1e-6);
        assert_close(&format!("CPU x_prev at t={t}"), &sampler::update_cpu(&rows[k], &x, &e, &z), &want, 1e-6, 1e-6);
    }
}

#[test]
fn timesteps_follow_the_reference_stride() {
    assert_eq!(timesteps(1000, 1000).unwrap(), (0..1000).rev().collect::<Vec<_>>());
    let t50 = timesteps(1000, 50).unwrap();
    assert_eq!(t50.len(), 51);
    assert_eq!(&t50[..3], [999, 979, 959]);
    assert_eq!(&t50[49..], [19, 0]);
    assert!(timesteps(1000, 0).is_err() && timesteps(1000, 1001).is_err());
}

#[test]
fn strided_ddpm_reduces_to_reference_at_full_length() {
    let sch = Schedule::reference(1000);
    let rows = plan_steps(&sch, SamplerKind::Ddpm, 1000).unwrap();
    // t = 500 row: the reference's own coefficients, rounded to f32.
    let r = rows[499];
    assert_eq!(r.t, 500);
    assert_eq!(r.c1, sch.post_c1[500] as f32);
    assert_eq!(r.c2, sch.post_c2[500] as f32);
    assert_eq!(r.sigma, sch.var_large[500].sqrt() as f32);
    // Strided: the posterior weights must still sum to a mean-preserving combination:
    // for x_t = sqrt(ab_t) x0 (no noise), mean = sqrt(ab_s) x0.
    let rows = plan_steps(&sch, SamplerKind::Ddpm, 10).unwrap();
    let ts = timesteps(1000, 10).unwrap();
    for (i, r) in rows.iter().enumerate().filter(|(_, r)| r.mode == Mode::Ancestral) {
        let (t, s) = (ts[i], ts[i + 1]);
        let mean = r.c1 as f64 + r.c2 as f64 * sch.alphas_bar[t].sqrt();
        assert!((mean - sch.alphas_bar[s].sqrt()).abs() < 1e-5, "t={t} s={s}: {mean}");
    }
    let ddim = plan_steps(&sch, SamplerKind::Ddim, 50).unwrap();
    assert_eq!(ddim.len(), 50, "DDIM evaluates the net once per step, none at t = 0");
}

#[test]
fn philox_known_answers() {
    // Random123 known-answer vectors for Philox4x32-10.
    assert_eq!(sampler::philox4x32([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
    assert_eq!(sampler::philox4x32([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
    assert_eq!(
        sampler::philox4x32([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    );
}

#[test]
fn gpu_noise_equals_cpu_reference_and_is_gaussian() {
    let (images, per_image) = (3usize, 20000usize);
    let key = NoiseKey { seed: 0x1234_5678_9abc, image_base: 7 };
    let mut g = Graph::new();
    let out = g.intermediate("noise", &[images, per_image]);
    sampler::gaussian_fill(&mut g, out, per_image, 42, key);
    let got = run_graph(g, &[], &[out]).remove(0);
    let want: Vec<f32> = (0..images * per_image)
        .map(|i| {
            sampler::gaussian_cpu(
                key.seed,
                (i % per_image) as u32,
                7 + (i / per_image) as u32,
                42,
                sampler::STREAM_STEP,
            )
        })
        .collect();
    // log/cos differ by a few ulps between adapters and libm.
    assert_close("gaussian noise", &got, &want, 1e-5, 1e-5);
    let n = got.len() as f64;
    let mean = got.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = got.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.03, "mean {mean}, var {var}");
}

fn tiny_sampler(batch: usize, kind: SamplerKind, steps: usize, v_th: f32) -> (Sampler, sddpm_gpu::model::ModelConfig) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weights.safetensors");
    let ckpt = Checkpoint::load(&path).unwrap();
    let cfg = ckpt.config(None).unwrap();
    let rows = plan_steps(&Schedule::reference(1000), kind, steps).unwrap();
    (Sampler::new(ctx(), &cfg, &ckpt, batch, 16, v_th, &rows).unwrap(), cfg)
}

#[test]
fn sampling_is_deterministic_per_seed_and_batch_independent() {
    let (s4, _) = tiny_sampler(4, SamplerKind::Ddim, 4, 1.0);
    let (s2, _) = tiny_sampler(2, SamplerKind::Ddim, 4, 1.0);
    let a = s4.sample_batch(ctx(), 7, 0, &mut |_| {}).unwrap();
    let b = s4.sample_batch(ctx(), 7, 0, &mut |_| {}).unwrap();
    assert_eq!(bits(&a), bits(&b), "same seed, same adapter: identical samples");
    let c = s4.sample_batch(ctx(), 8, 0, &mut |_| {}).unwrap();
    assert!(rel_l2(&c, &a) > 0.1, "another seed gives other images");
    // Images 2 and 3 sampled in a batch of 2 (image_base 2) equal those of the batch of 4.
    let d = s2.sample_batch(ctx(), 7, 2, &mut |_| {}).unwrap();
    let half = a.len() / 2;
    assert_eq!(bits(&d), bits(&a[half..]), "an image must not depend on its batch");
    assert!(a.iter().all(|v| v.is_finite()));
}

#[test]
fn ddpm_sampling_runs_and_threshold_changes_it() {
    let (s, _) = tiny_sampler(2, SamplerKind::Ddpm, 5, 1.0);
    let mut calls = Vec::new();
    let a = s.sample_batch(ctx(), 1, 0, &mut |k| calls.push(k)).unwrap();
    assert_eq!(s.steps, 6, "5 strided steps plus the final t = 0 evaluation");
    assert_eq!(*calls.last().unwrap(), 6);
    assert!(a.iter().all(|v| (-1.0..=1.0).contains(v)), "DDPM's final x0 is clipped");
    let (g, _) = tiny_sampler(2, SamplerKind::Ddpm, 5, 0.997);
    let b = g.sample_batch(ctx(), 1, 0, &mut |_| {}).unwrap();
    assert_ne!(bits(&a), bits(&b), "threshold guidance must change the samples");
}

#[test]
fn q_sample_matches_cpu_with_given_and_generated_noise() {
    let (b, per) = (3usize, 50usize);
    let mut r = rng(7);
    let x0 = uniform(&mut r, b * per, -1.0, 1.0);
    let z = normalish(&mut r, b * per, 1.0);
    let sch = Schedule::reference(1000);
    let ts = [0usize, 500, 999];
    let coef: Vec<f32> =
        ts.iter().flat_map(|&t| [sch.alphas_bar[t].sqrt() as f32, (1.0 - sch.alphas_bar[t]).sqrt() as f32]).collect();
    for given in [true, false] {
        let mut g = Graph::new();
        let qc = g.input("coef", &[b, 2]);
        let xt0 = g.input("x0", &[b, per]);
        let zt = g.input("z", &[b, per]);
        let (x_t, used, _) = sampler::q_sample(&mut g, qc, xt0, given.then_some(zt));
        let out = run_graph(g, &[(qc, bits(&coef)), (xt0, bits(&x0)), (zt, bits(&z))], &[x_t, used]);
        let noise: Vec<f32> = if given {
            z.clone()
        } else {
            (0..b * per)
                .map(|i| sampler::gaussian_cpu(0, (i % per) as u32, (i / per) as u32, 0, sampler::STREAM_TRAIN))
                .collect()
        };
        assert_close("noise used", &out[1], &noise, 1e-5, 1e-5);
        let want: Vec<f32> =
            (0..b * per).map(|i| coef[2 * (i / per)] * x0[i] + coef[2 * (i / per) + 1] * out[1][i]).collect();
        assert_close("x_t", &out[0], &want, 1e-6, 1e-6);
    }
}
