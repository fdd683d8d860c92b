//! What the data-parallel gradient exchange costs per training step (issue 18, BENCHMARKS.md):
//! for the gradients of the tiny, small and cifar10 presets, each rank reads its gradient arena
//! back from the GPU in 25 MB buckets, sums each bucket across ranks with a non-blocking
//! all-reduce started as soon as it is read, and writes the averaged buckets back: exactly what
//! `Trainer::step_with` does between the backward and the optimizer (without the backward to
//! hide behind). Also the all-reduce alone, on host buffers.
//!
//!   cargo build --release --features mpi --example exchange_cost
//!   mpirun -np 2 target/release/examples/exchange_cost [ITERS]

use std::time::Instant;

use anyhow::Result;
use sddpm_gpu::diffusion::BUCKET_BYTES;
use sddpm_gpu::dist;
use sddpm_gpu::gpu::Context;
use sddpm_gpu::model::Net;

fn main() -> Result<()> {
    let comm = dist::world()?;
    let iters: usize = std::env::args().nth(1).map_or(Ok(3), |s| s.parse())?;
    let ctx = Context::for_rank(None, (comm.size() > 1).then(dist::local_rank))?;
    if comm.rank() == 0 {
        println!("{} ranks, adapter {}, {iters} iterations after one warm-up", comm.size(), ctx.describe());
        println!(
            "| preset | gradients | buckets | exchange per step (GPU read + all-reduce + write) | all-reduce alone |"
        );
        println!("|---|---:|---:|---:|---:|");
    }
    for preset in ["tiny", "small", "cifar10"] {
        let params = Net::preset("sddpm", preset)?.parameter_count();
        let bytes = 4 * params as u64;
        let per = BUCKET_BYTES / 4;
        let sizes: Vec<usize> =
            (0..(params as u64).div_ceil(per)).map(|k| per.min(params as u64 - k * per) as usize).collect();
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let grads = ctx.create_buffer("gradients", bytes, usage)?;
        let scale = 1.0 / comm.size() as f32;
        let exchange = || -> Result<()> {
            comm.sum_pipelined(
                &sizes,
                &mut |k, buf| {
                    let words = ctx.read_buffer_range(&grads, k as u64 * BUCKET_BYTES, 4 * buf.len() as u64)?;
                    buf.iter_mut().zip(words).for_each(|(b, w)| *b = f32::from_bits(w));
                    Ok(())
                },
                &mut |k, sums| {
                    let mean: Vec<f32> = sums.iter().map(|v| v * scale).collect();
                    ctx.queue.write_buffer(&grads, k as u64 * BUCKET_BYTES, bytemuck::cast_slice(&mean));
                    Ok(())
                },
            )?;
            // The writes have landed once a read after them returns.
            ctx.read_buffer_range(&grads, 0, 4)?;
            Ok(())
        };
        let host: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![1f32; n]).collect();
        let reduce_only = || -> Result<()> {
            comm.sum_pipelined(
                &sizes,
                &mut |k, buf| {
                    buf.copy_from_slice(&host[k]);
                    Ok(())
                },
                &mut |_, _| Ok(()),
            )
        };
        let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            f()?;
            comm.any(false)?;
            let t = Instant::now();
            for _ in 0..iters {
                f()?;
            }
            // The slowest rank's time is the step's.
            let ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
            Ok(comm.min_max((ms * 1e3) as u64)?.1 as f64 / 1e3)
        };
        let (full, mpi) = (time(&exchange)?, time(&reduce_only)?);
        if comm.rank() == 0 {
            println!(
                "| {preset} | {params} ({:.1} MB) | {} | {full:.1} ms | {mpi:.1} ms |",
                bytes as f64 / 1e6,
                sizes.len()
            );
        }
    }
    Ok(())
}
