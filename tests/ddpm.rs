//! The ANN counterpart (pytorch-ddpm's U-Net, `--model ddpm`) against fixtures made with
//! pytorch-ddpm's own model.py (tests/fixtures-ddpm, see its README), and its bookkeeping:
//! parameter counts, config inference, training (loss falls, resume is bit-identical).
//!
//! No spikes, so an f32 port agrees closely: eps to 1e-5 relative L2 (the issue asks 1e-4),
//! loss to 1e-5, gradients to 1e-4 global relative L2, Adam-updated weights to 2e-6 absolute
//! (lr 2e-4; Adam's first step moves a weight by ~lr * sign(grad)).

mod common;

use std::collections::HashMap;

use common::*;
use sddpm_gpu::checkpoint::Checkpoint;
use sddpm_gpu::diffusion::{TrainOptions, Trainer};
use sddpm_gpu::model::{ddpm_layer_macs, ddpm_parameter_count, DdpmConfig, EntryKind, EvalNet, Net};

fn ddpm_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures-ddpm").join(name)
}

fn fixture_net() -> (Checkpoint, Net) {
    let ckpt = Checkpoint::load(&ddpm_fixture("weights.safetensors")).unwrap();
    let net = ckpt.net(None).unwrap();
    (ckpt, net)
}

#[test]
fn forward_matches_pytorch_ddpm() {
    let (ckpt, net) = fixture_net();
    assert!(matches!(net, Net::Ddpm(_)), "the fixture's metadata says ddpm");
    let fx = Checkpoint::load(&ddpm_fixture("forward.safetensors")).unwrap();
    let x = fx.get("x").unwrap();
    let t: Vec<u32> = fx.get_ints("t").unwrap().data.iter().map(|&v| v as u32).collect();
    let eval = EvalNet::new(ctx(), &net, &ckpt, x.shape[0], x.shape[2], 1.0).unwrap();
    let got = eval.forward(ctx(), &x.data, &t).unwrap();
    let err = rel_l2(&got, &fx.get("eps").unwrap().data);
    println!("eps relative L2 error vs pytorch-ddpm: {err:e}");
    assert!(err < 1e-5, "eps relative L2 error {err:e}");
}

#[test]
fn config_inferred_from_shapes_equals_metadata() {
    let (mut ckpt, from_meta) = fixture_net();
    ckpt.metadata.clear();
    let inferred = ckpt.net(None).unwrap();
    assert_eq!(inferred, from_meta);
    let Net::Ddpm(cfg) = inferred else { panic!("not inferred as ddpm") };
    assert_eq!((cfg.ch, cfg.ch_mult.clone(), cfg.attn.clone(), cfg.num_res_blocks), (32, vec![1, 2], vec![1], 1));
    assert!(ckpt.net(Some(4)).unwrap_err().to_string().contains("--snn-steps"));
    assert!(ckpt.config(None).unwrap_err().to_string().contains("DDPM"));
}

#[test]
fn mismatched_checkpoint_names_the_tensors() {
    let (mut ckpt, _) = fixture_net();
    ckpt.tensors.remove("middleblocks.0.attn.proj_k.weight");
    ckpt.tensors.get_mut("tail.2.bias").unwrap().shape = vec![4];
    let err = ckpt.net(None).unwrap_err().to_string();
    assert!(err.contains("missing middleblocks.0.attn.proj_k.weight"), "{err}");
    assert!(err.contains("tail.2.bias is [4]"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn parameter_counts() {
    assert_eq!(ddpm_parameter_count(&DdpmConfig::preset("cifar10").unwrap()), 67_602_691);
    // pytorch-ddpm's published CIFAR-10 net, counted with its model.py.
    assert_eq!(ddpm_parameter_count(&DdpmConfig::preset("pytorch-ddpm-cifar10").unwrap()), 35_874_307);
    // `small` (the SNN `small` shape at 1 channel), counted with model.py at 3 channels minus
    // the head's and tail's two extra channels.
    assert_eq!(ddpm_parameter_count(&DdpmConfig::preset("small").unwrap()), 1_094_497);
    // fixtures-ddpm's README.
    assert_eq!(ddpm_parameter_count(&DdpmConfig::preset("tiny").unwrap()), 734_499);
}

#[test]
fn cifar10_macs_match_paper() {
    let macs: u64 = ddpm_layer_macs(&DdpmConfig::preset("cifar10").unwrap(), 32).iter().map(|l| l.macs).sum();
    println!("ddpm cifar10 MACs at 32x32: {macs}");
    assert_eq!((macs as f64 / 1e9 * 1000.0).round() / 1000.0, 6.350, "{macs} MACs");
}

#[test]
fn train_step_matches_pytorch_ddpm() {
    let (ckpt, net) = fixture_net();
    let fx = Checkpoint::load(&ddpm_fixture("train_step.safetensors")).unwrap();
    let x0 = &fx.get("x0").unwrap().data;
    let noise = &fx.get("noise").unwrap().data;
    let t: Vec<u32> = fx.get_ints("t").unwrap().data.iter().map(|&v| v as u32).collect();
    let shape = fx.get("x0").unwrap().shape.clone();
    let opts = TrainOptions { given_noise: true, keep_grads: true, ..Default::default() };
    let mut tr = Trainer::new(ctx(), &net, &ckpt, shape[0], shape[2], opts).unwrap();
    let stats = tr.step(ctx(), x0, &t, Some(noise), 0).unwrap();

    let want_loss = fx.get("loss").unwrap().data[0];
    let want_norm = fx.get("grad_norm").unwrap().data[0];
    println!("loss {} vs {want_loss}; grad_norm {} vs {want_norm}", stats.loss, stats.grad_norm);
    assert!(((stats.loss - want_loss) / want_loss).abs() < 1e-5, "loss {} vs {want_loss}", stats.loss);
    assert!(((stats.grad_norm - want_norm) / want_norm).abs() < 1e-4, "grad_norm {} vs {want_norm}", stats.grad_norm);

    let (mut num, mut den) = (0f64, 0f64);
    for e in net.state_entries().iter().filter(|e| e.kind == EntryKind::Trainable) {
        let got = tr.grad(ctx(), &e.name).unwrap();
        let want = &fx.get(&format!("grad.{}", e.name)).unwrap().data;
        num += got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
        den += want.iter().map(|&b| (b as f64).powi(2)).sum::<f64>();
    }
    let grad_err = (num / den).sqrt();
    println!("gradients: global relative L2 {grad_err:e}");
    assert!(grad_err < 1e-4, "gradients differ: relative L2 {grad_err:e}");

    let lr = 2e-4f32;
    for e in net.state_entries() {
        let got = tr.read_state(ctx(), &e.name).unwrap();
        let want = &fx.get(&format!("after.{}", e.name)).unwrap().data;
        if e.kind == EntryKind::Frozen {
            assert_eq!(bits(&got), bits(want), "{} is frozen", e.name);
            continue;
        }
        let grad = &fx.get(&format!("grad.{}", e.name)).unwrap().data;
        let before = &ckpt.get(&e.name).unwrap().data;
        for i in 0..got.len() {
            // Where the gradient is rounding noise its sign is noise too: only the step size holds.
            if grad[i].abs() < 1e-6 {
                assert!((got[i] - before[i]).abs() <= lr * 1.01, "{}[{i}] moved more than lr", e.name);
            } else {
                let d = (got[i] - want[i]).abs();
                assert!(d <= 2e-6, "{}[{i}]: {} vs reference {} (grad {})", e.name, got[i], want[i], grad[i]);
            }
        }
    }
}

fn toy_config() -> DdpmConfig {
    DdpmConfig {
        diffusion_steps: 1000,
        ch: 32,
        ch_mult: vec![1, 2],
        attn: vec![1],
        num_res_blocks: 1,
        dropout: 0.0,
        img_ch: 1,
        img_size: 8,
    }
}

/// A fixed batch of smooth blobs in [-1, 1].
fn toy_batch(batch: usize, size: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(batch * size * size);
    for b in 0..batch {
        for y in 0..size {
            for xx in 0..size {
                let (cx, cy) = (2.0 + 3.0 * b as f32, 4.0);
                let d2 = (xx as f32 - cx).powi(2) + (y as f32 - cy).powi(2);
                x.push(2.0 * (-d2 / 6.0).exp() - 1.0);
            }
        }
    }
    x
}

#[test]
fn tiny_ddpm_loss_falls() {
    let net = Net::Ddpm(toy_config());
    let weights = net.init_weights(1);
    let opts = TrainOptions { lr: 2e-3, ..Default::default() };
    let mut tr = Trainer::new(ctx(), &net, &weights, 2, 8, opts).unwrap();
    let x0 = toy_batch(2, 8);
    let t = [300u32, 600];
    let losses: Vec<f32> = (0..20).map(|_| tr.step(ctx(), &x0, &t, None, 3).unwrap().loss).collect();
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = losses[15..].iter().sum::<f32>() / 5.0;
    println!("losses: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(last < 0.8 * first, "loss must fall: first 5 average {first}, last 5 average {last}");
}

#[test]
fn ddpm_resume_is_bit_identical() {
    let net = Net::Ddpm(toy_config());
    let weights = net.init_weights(2);
    let x0 = toy_batch(2, 8);
    let ts = |k: u32| [(k * 37) % 1000, (k * 91 + 5) % 1000];
    let mut straight = Trainer::new(ctx(), &net, &weights, 2, 8, TrainOptions::default()).unwrap();
    for k in 0..4 {
        straight.step(ctx(), &x0, &ts(k), None, 9).unwrap();
    }
    let mut first = Trainer::new(ctx(), &net, &weights, 2, 8, TrainOptions::default()).unwrap();
    for k in 0..2 {
        first.step(ctx(), &x0, &ts(k), None, 9).unwrap();
    }
    let path = tmp("ddpm-resume.safetensors");
    first.save(ctx(), &path, HashMap::new()).unwrap();
    let ckpt = Checkpoint::load(&path).unwrap();
    let resumed_net = ckpt.net(None).unwrap();
    assert_eq!(resumed_net, net, "the checkpoint's config says ddpm");
    let mut resumed = Trainer::new(ctx(), &resumed_net, &ckpt, 2, 8, TrainOptions::default()).unwrap();
    assert_eq!(resumed.step, 2);
    for k in 2..4 {
        resumed.step(ctx(), &x0, &ts(k), None, 9).unwrap();
    }
    for e in net.state_entries() {
        let a = straight.read_state(ctx(), &e.name).unwrap();
        let b = resumed.read_state(ctx(), &e.name).unwrap();
        assert_eq!(bits(&a), bits(&b), "{} differs after resume", e.name);
    }
}

#[test]
fn training_with_dropout_is_deterministic_per_seed() {
    // pytorch-ddpm's CIFAR-10 config trains with dropout 0.1: masks come from (seed, step).
    let net = Net::Ddpm(DdpmConfig { dropout: 0.1, ..toy_config() });
    let weights = net.init_weights(0);
    let x0 = toy_batch(2, 8);
    let run = |seed: u64| {
        let mut tr = Trainer::new(ctx(), &net, &weights, 2, 8, TrainOptions::default()).unwrap();
        let losses: Vec<f32> = (0..2).map(|_| tr.step(ctx(), &x0, &[100, 900], None, seed).unwrap().loss).collect();
        (losses, tr.read_state(ctx(), "downblocks.0.block2.3.weight").unwrap())
    };
    let (a, b, c) = (run(4), run(4), run(5));
    assert_eq!(bits(&a.1), bits(&b.1), "same seed, same weights");
    assert_eq!(a.0, b.0);
    assert_ne!(bits(&a.1), bits(&c.1), "another seed draws other noise and masks");
    // Without dropout the same seed trains block2.3 (which reads the dropped activations)
    // differently: the masks are in the graph.
    let plain = Net::Ddpm(toy_config());
    let mut tr = Trainer::new(ctx(), &plain, &weights, 2, 8, TrainOptions::default()).unwrap();
    for _ in 0..2 {
        tr.step(ctx(), &x0, &[100, 900], None, 4).unwrap();
    }
    assert_ne!(bits(&tr.read_state(ctx(), "downblocks.0.block2.3.weight").unwrap()), bits(&a.1));
}
