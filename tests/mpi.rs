//! Data-parallel training over MPI (issue 18): run by `.ci/run` under
//! `mpirun --allow-run-as-root --oversubscribe -np 2` (cargo's runner) with `--features mpi`:
//!   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="mpirun --allow-run-as-root --oversubscribe -np 2" \
//!       cargo test --release --features mpi --test mpi
//! Every rank runs this binary. MPI is initialised once per process and must be finalised before
//! it exits, so the checks run in one test, in order, on every rank (collectives must match).
#![cfg(feature = "mpi")]

mod common;

use std::collections::HashMap;

use common::*;
use sddpm_gpu::checkpoint::TensorFile;
use sddpm_gpu::diffusion::{TrainOptions, Trainer};
use sddpm_gpu::dist::{self, Comm, Single};
use sddpm_gpu::model::{init_weights, state_entries, EntryKind, ModelConfig, NeuronKind};

#[test]
fn data_parallel_over_mpi() {
    let comm = dist::mpi::Mpi::init().expect("MPI");
    assert!(comm.size() >= 2, "run under mpirun -np 2 or more (got {} rank)", comm.size());
    ddp_fixture_over_ranks(&comm);
    ranks_match_one_process_in_bn_groups(&comm);
    sums_and_agreements(&comm);
    println!("rank {}: all data-parallel checks passed", comm.rank());
}

/// The fixture's 2 steps with each rank on its share (rank r: rows r*B/N.. of every batch),
/// gradients averaged in buckets: every rank ends with the same parameters; rank 0's state
/// matches the reference's DDP run.
fn ddp_fixture_over_ranks(comm: &dyn Comm) {
    let fx = TensorFile::load(&fixture_in(ddp::DIR, "ddp_step.safetensors")).unwrap();
    let before = TensorFile::load(&fixture_in(ddp::DIR, "weights.safetensors")).unwrap();
    let (world, per, steps) = ddp::layout(&fx);
    let batch = world * per;
    let share = dist::share(batch, comm, "batch").unwrap();
    let cfg = before.config(None).unwrap();
    let size = fx.get("x0").unwrap().shape[2];
    // Each rank normalises its own share: its groups are the fixture's world / ranks.
    assert!(world.is_multiple_of(comm.size()), "the fixture's {world} ranks on {} MPI ranks", comm.size());
    let opts =
        TrainOptions { given_noise: true, bn_groups: world / comm.size(), ranks: comm.size(), ..Default::default() };
    let mut tr = Trainer::new(ctx(), &cfg, &before, share.len(), size, opts).unwrap();
    tr.image_base = share.start;
    assert!(!tr.buckets.is_empty(), "gradient buckets");
    let t_all: Vec<u32> = fx.get_ints("t").unwrap().data.iter().map(|&v| v as u32).collect();
    let mut got = Vec::new();
    for k in 0..steps {
        let r = k * batch + share.start..k * batch + share.end;
        let (x0, noise) = (ddp::rows(&fx, "x0", r.clone()), ddp::rows(&fx, "noise", r.clone()));
        let s = tr.step_with(ctx(), comm, &x0, &t_all[r], Some(&noise), 0).unwrap();
        got.push((s.loss, s.grad_norm));
    }
    comm.check_same(tr.param_checksum(ctx()).unwrap(), "the parameters").unwrap();
    // The global loss and grad norm are the same numbers on every rank.
    let bits = got.iter().map(|&(l, n)| (l.to_bits() as u64) << 32 | n.to_bits() as u64).fold(0u64, |a, v| a ^ v);
    comm.check_same(bits, "the logged loss and grad norm").unwrap();
    if comm.rank() == 0 {
        let path = tmp("mpi_ddp_after.safetensors");
        tr.save(ctx(), &path, HashMap::new()).unwrap();
        ddp::check(&fx, &before, &got, &TensorFile::load(&path).unwrap(), "2 MPI ranks");
    }
}

fn toy() -> ModelConfig {
    ModelConfig {
        diffusion_steps: 1000,
        ch: 8,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        snn_steps: 2,
        img_ch: 1,
        img_size: 16,
        attn: Vec::new(),
        heads: 1,
        neuron: NeuronKind::If,
        tau: 2.0,
    }
}

/// N ranks training on their shares with generated noise (keyed by global image index) end where
/// one process with N BatchNorm groups on the whole batch ends, within float rounding: the
/// gradient sums are the same terms added in another order (per rank, then across ranks), so
/// not bit for bit; Adam's sign flips on ~0 gradients bound the rest by lr per step.
fn ranks_match_one_process_in_bn_groups(comm: &dyn Comm) {
    let cfg = toy();
    let weights = init_weights(&cfg, 5);
    let (n, batch, steps) = (comm.size(), 2 * comm.size(), 3);
    let share = dist::share(batch, comm, "batch").unwrap();
    let mut r = rng(77);
    let data: Vec<(Vec<f32>, Vec<u32>)> = (0..steps)
        .map(|_| {
            (uniform(&mut r, batch * 16 * 16, -1.0, 1.0), (0..batch).map(|i| (i as u32 * 97 + 13) % 1000).collect())
        })
        .collect();
    let opts = TrainOptions { ranks: n, ..Default::default() };
    let mut ranked = Trainer::new(ctx(), &cfg, &weights, share.len(), 16, opts).unwrap();
    ranked.image_base = share.start;
    let opts = TrainOptions { bn_groups: n, ..Default::default() };
    let mut one = Trainer::new(ctx(), &cfg, &weights, batch, 16, opts).unwrap();
    let per = 16 * 16;
    for (x0, t) in &data {
        let a =
            ranked.step_with(ctx(), comm, &x0[share.start * per..share.end * per], &t[share.clone()], None, 3).unwrap();
        let b = one.step_with(ctx(), &Single, x0, t, None, 3).unwrap();
        assert!(((a.loss - b.loss) / b.loss).abs() < 1e-5, "loss: {} ranks {} vs one process {}", n, a.loss, b.loss);
        assert!(
            ((a.grad_norm - b.grad_norm) / b.grad_norm).abs() < 1e-4,
            "grad norm {} vs {}",
            a.grad_norm,
            b.grad_norm
        );
    }
    let lr = 2e-4f32;
    let (mut off, mut total) = (0, 0);
    // Running statistics follow group 0 = rank 0's share (DDP broadcasts rank 0's buffers; only
    // rank 0 saves them); the other ranks' copies follow their own shares.
    let keep = |k: EntryKind| k == EntryKind::Trainable || (k == EntryKind::RunningStat && comm.rank() == 0);
    for e in state_entries(&cfg).iter().filter(|e| keep(e.kind)) {
        let (a, b) = (ranked.read_state(ctx(), &e.name).unwrap(), one.read_state(ctx(), &e.name).unwrap());
        for (x, y) in a.iter().zip(&b) {
            total += 1;
            if (x - y).abs() > 2e-5 {
                off += 1;
                assert!((x - y).abs() <= 2.0 * lr * steps as f32, "{}: {x} vs {y}", e.name);
            }
        }
    }
    println!("rank {}: {off} of {total} values differ from one process by more than 2e-5", comm.rank());
    assert!(off * 100 < total, "{off} of {total} values differ from one process");
    assert_eq!(ranked.counters, one.counters);
}

/// The communicator's own operations across ranks: pipelined sums in order, agreements.
fn sums_and_agreements(comm: &dyn Comm) {
    let (rank, n) = (comm.rank() as f32, comm.size() as f32);
    let mut got = Vec::new();
    comm.sum_pipelined(
        &[3, 1],
        &mut |k, b| {
            b.iter_mut().enumerate().for_each(|(i, v)| *v = rank + (10 * k + i) as f32);
            Ok(())
        },
        &mut |k, s| {
            got.push((k, s.to_vec()));
            Ok(())
        },
    )
    .unwrap();
    let ranks_sum = n * (n - 1.0) / 2.0;
    assert_eq!(got, [(0, vec![ranks_sum, ranks_sum + n, ranks_sum + 2.0 * n]), (1, vec![ranks_sum + 10.0 * n])]);
    assert!(comm.any(comm.rank() == 1).unwrap(), "one rank's stop flag stops all");
    assert!(!comm.any(false).unwrap());
    assert!(comm.check_same(comm.rank() as u64, "the rank").is_err(), "differing checksums are an error");
}
