//! Kernel throughput: conv2d and matmul GFLOP/s, neuron GB/s, against the device's copy bandwidth.
//!
//! `cargo bench --bench kernels` (add `-- --quick` for one repetition). Each case compiles a graph
//! holding REPS copies of one kernel (so per-submit overhead is amortised), warms up once, then
//! times whole runs including the final wait; the best of RUNS is reported. FLOPs and bytes come
//! from each node's own cost (bytes = the minimum the kernel must move). Prints a Markdown table
//! for BENCHMARKS.md.

use std::time::Instant;

use sddpm_gpu::gpu::Context;
use sddpm_gpu::graph::{Graph, Plan, TensorId};
use sddpm_gpu::ops::{conv, matmul, neuron};

const REPS: usize = 4;

struct Case {
    name: String,
    g: Graph,
    inputs: Vec<TensorId>,
}

fn time_case(ctx: &Context, case: &Case, runs: usize) -> (f64, u64, u64) {
    let plan = Plan::compile(ctx, &case.g).expect("compile");
    for &t in &case.inputs {
        let n = case.g.info(t).numel();
        let data: Vec<f32> = (0..n).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
        plan.write(ctx, t, &data).unwrap();
    }
    plan.run(ctx).unwrap();
    ctx.wait().unwrap();
    let mut best = f64::MAX;
    for _ in 0..runs {
        let start = Instant::now();
        plan.run(ctx).unwrap();
        ctx.wait().unwrap();
        best = best.min(start.elapsed().as_secs_f64());
    }
    let flops = case.g.nodes.iter().map(|n| n.cost.flops).sum();
    let bytes = case.g.nodes.iter().map(|n| n.cost.bytes).sum();
    (best, flops, bytes)
}

fn conv_case(n: usize, cin: usize, cout: usize, hw: usize, k: usize, stride: usize) -> Case {
    let mut g = Graph::new();
    let x = g.input("x", &[n, cin, hw, hw]);
    let w = g.input("w", &[cout, cin, k, k]);
    let b = g.input("b", &[cout]);
    for i in 0..REPS {
        let y = conv::conv2d(&mut g, x, w, Some(b), stride, k / 2, &format!("conv{i}"));
        g.mark_output(y);
    }
    Case { name: format!("conv2d {k}x{k}/s{stride} [{n},{cin},{hw},{hw}] -> {cout}"), g, inputs: vec![x, w, b] }
}

fn matmul_case(m: usize, n: usize, k: usize) -> Case {
    let mut g = Graph::new();
    let a = g.input("a", &[m, k]);
    let b = g.input("b", &[k, n]);
    for i in 0..REPS {
        let c = matmul::matmul(&mut g, a, b, None, [m, n, k], matmul::Strides::nn(k, n), &format!("mm{i}"));
        g.mark_output(c);
    }
    Case { name: format!("matmul {m}x{n}x{k}"), g, inputs: vec![a, b] }
}

fn neuron_case(t: usize, n: usize, train: bool) -> Case {
    let mut g = Graph::new();
    let x = g.input("x", &[t, n]);
    for i in 0..REPS {
        if train {
            let (s, h) = neuron::neuron_forward_train(&mut g, x, t, Default::default(), &format!("n{i}"));
            g.mark_output(s);
            g.mark_output(h);
        } else {
            let s = neuron::neuron_forward(&mut g, x, t, Default::default(), &format!("n{i}"));
            g.mark_output(s);
        }
    }
    Case { name: format!("neuron{} T={t} N={n}", if train { " (train)" } else { "" }), g, inputs: vec![x] }
}

/// Device-side copy bandwidth: the ceiling for bandwidth-bound kernels (read + write counted).
fn copy_bandwidth(ctx: &Context, bytes: u64) -> f64 {
    let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let a = ctx.create_buffer("copy a", bytes, usage).unwrap();
    let b = ctx.create_buffer("copy b", bytes, usage).unwrap();
    let mut best = f64::MAX;
    for _ in 0..4 {
        let start = Instant::now();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&a, 0, &b, 0, bytes);
        ctx.queue.submit([enc.finish()]);
        ctx.wait().unwrap();
        best = best.min(start.elapsed().as_secs_f64());
    }
    2.0 * bytes as f64 / best / 1e9
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 1 } else { 3 };
    let ctx = Context::new(None).expect("a GPU adapter");
    println!("adapter: {}\n", ctx.describe());
    println!("| kernel | best ms / call | GFLOP/s | GB/s |");
    println!("|---|---:|---:|---:|");
    let cases = vec![
        matmul_case(256, 256, 256),
        matmul_case(1024, 1024, 1024),
        matmul_case(8, 512, 512),
        conv_case(8, 16, 16, 32, 3, 1),
        conv_case(8, 64, 64, 16, 3, 1),
        conv_case(8, 128, 128, 32, 3, 1),
        conv_case(8, 128, 128, 32, 3, 2),
        conv_case(8, 256, 128, 16, 1, 1),
        neuron_case(4, 1 << 20, false),
        neuron_case(4, 1 << 20, true),
    ];
    for case in &cases {
        let (secs, flops, bytes) = time_case(&ctx, case, runs);
        let per_call = secs / REPS as f64;
        let gflops = if flops > 0 { format!("{:.2}", flops as f64 / secs / 1e9) } else { "-".into() };
        println!("| {} | {:.3} | {} | {:.2} |", case.name, per_call * 1e3, gflops, bytes as f64 / secs / 1e9);
    }
    println!("\ndevice copy_buffer_to_buffer (64 MiB, read + write): {:.2} GB/s", copy_bandwidth(&ctx, 64 << 20));
}
